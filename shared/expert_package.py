"""The expert travels as its adapter files, byte for byte, with their content digest: the
coordinator packs them, a device checks the digest before it caches them and refuses a
mismatch or a corrupt file, so a device never computes token weights with a wrong expert."""

from __future__ import annotations

import logging
from pathlib import Path

from shared.adapter_files import ADAPTER_FILES, adapter_digest
from shared.paths import atomic_directory, data_dir

DIGEST_KEY = "digest"
log = logging.getLogger(__name__)


class ExpertDigestError(ValueError):
    """The expert received is not the one announced."""


def pack_expert(adapter_dir: Path) -> dict[str, bytes | str]:
    """The expert's files and digest, as the values of a Flower ConfigRecord."""
    adapter_dir = Path(adapter_dir)
    package: dict[str, bytes | str] = {name: (adapter_dir / name).read_bytes() for name in ADAPTER_FILES}
    package[DIGEST_KEY] = adapter_digest(adapter_dir)
    return package


def expert_cache_dir(digest: str) -> Path:
    if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise ExpertDigestError(f"{digest!r} is not a sha256 digest")
    return data_dir() / "experts" / digest


def cached_expert(digest: str) -> Path | None:
    """The cached expert with this digest, re-checked, or None if this device lacks it."""
    path = expert_cache_dir(digest)
    if not path.is_dir():
        return None
    if adapter_digest(path) != digest:
        raise ExpertDigestError(f"cached expert {path} no longer matches its digest {digest[:16]}...")
    return path


def holds_expert(digest: str) -> bool:
    """Whether this device holds the expert with `digest`, intact (a corrupt copy counts as
    missing, so that the coordinator sends it again)."""
    try:
        return cached_expert(digest) is not None
    except ExpertDigestError as error:
        log.warning("%s; asking for it again", error)
        return False


def unpack_expert(package: dict[str, bytes | str]) -> Path:
    """Verify and cache a received expert; returns its directory. A missing file, a corrupt
    file or a digest mismatch raises ExpertDigestError and caches nothing."""
    digest = package.get(DIGEST_KEY)
    if not isinstance(digest, str):
        raise ExpertDigestError("expert package without a digest")
    missing = [name for name in ADAPTER_FILES if not isinstance(package.get(name), bytes)]
    if missing:
        raise ExpertDigestError(f"expert package lacks {missing}")
    target = expert_cache_dir(digest)
    try:
        if cached_expert(digest) is not None:
            return target
    except ExpertDigestError:
        pass  # a corrupt cached copy: replaced below by the verified one
    with atomic_directory(target, overwrite=True) as staging:
        for name in ADAPTER_FILES:
            (staging / name).write_bytes(package[name])
        actual = adapter_digest(staging)
        if actual != digest:
            raise ExpertDigestError(f"expert files hash to {actual[:16]}..., not the announced {digest[:16]}...")
    return target
