"""What a device derives from its user's store with the expert (token probabilities, generic
history texts), cached in the store: one JSON file per kind, named by the key of (format,
expert digest, base, prompt budgets), so that a changed expert or prompt finds no file of its
own; writing one removes the kind's stale files. The cache never leaves the device."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.config import PromptConfig
from shared.paths import atomic_write_json
from shared.user_store import UserStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DerivedCache:
    """One kind of derived data of one store, for one (expert, base, prompt)."""

    folder: Path
    header: dict[str, Any]  # format, expert digest, base, prompt: what the file is for

    @classmethod
    def of(cls, store: UserStore, kind: str, data_format: str, expert_digest: str, base_id: str,
           prompt: PromptConfig) -> DerivedCache:
        return cls(store.cache_dir / kind, {"format": data_format, "expert_digest": expert_digest, "base": base_id,
                                            "prompt": asdict(prompt)})

    @property
    def path(self) -> Path:
        material = json.dumps({"format": self.header["format"], "expert": self.header["expert_digest"],
                               "base": self.header["base"], "prompt": self.header["prompt"]}, sort_keys=True)
        return self.folder / f"{hashlib.sha256(material.encode()).hexdigest()[:20]}.json"

    def read(self, field: str) -> dict[str, Any]:
        """The cached `field` (a mapping), or {} when there is none or it is unreadable."""
        if not self.path.is_file():
            return {}
        try:
            return dict(json.loads(self.path.read_text())[field])
        except (ValueError, KeyError, TypeError):
            log.warning("cache %s is unreadable; computing it again", self.path)
            return {}

    def write(self, field: str, value: dict[str, Any]) -> None:
        """Write `value` as `field` atomically, and remove this kind's files of other keys."""
        atomic_write_json(self.path, {**self.header, field: dict(sorted(value.items()))})
        for stale in self.folder.glob("*.json"):
            if stale != self.path:
                stale.unlink(missing_ok=True)
