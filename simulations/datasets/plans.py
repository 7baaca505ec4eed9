"""What every builder of user stores shares: a plan per user (checked in full before
anything is written), store folder names, the chronological train / test split."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from shared.paths import refuse_to_replace
from shared.user_store import HistoryItem, Sample, prepare_store, write_user_store

log = logging.getLogger(__name__)

TEST_FRACTION = 0.1  # of each user's samples, the latest, held out

@dataclass
class UserPlan:
    """A store to be written: everything `write_user_store` needs."""

    user_id: str
    source: str
    samples: list[Sample]
    history: list[HistoryItem]
    extra_meta: dict


def _slug(user_id: str) -> str:
    parts = [re.sub(r"[^a-z0-9]+", "-", part.lower()).strip("-") for part in user_id.split("/")]
    slug = "--".join(part for part in parts if part)
    digest = hashlib.sha1(user_id.encode("utf-8")).hexdigest()[:8]
    if not slug:
        return f"user-{digest}"
    return slug if len(slug) <= 80 else f"{slug[:80]}-{digest}"


def _store_names(user_ids: list[str]) -> list[str]:
    """Folder names, one per user id; ids whose slugs collide get a hash suffix."""
    slugs = [_slug(u) for u in user_ids]
    clashing = {s for s in slugs if slugs.count(s) > 1}
    return [
        f"{s}-{hashlib.sha1(u.encode('utf-8')).hexdigest()[:8]}" if s in clashing else s
        for s, u in zip(slugs, user_ids, strict=True)
    ]


def test_count(n: int, test_fraction: float) -> int:
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    return min(n, max(1, round(test_fraction * n)))


def chronological_samples(
    entries: list[tuple[str, float, str, str, tuple]], test_fraction: float
) -> list[Sample]:
    """Samples from (id, time, x, y, preference_spans) in time order; each sees all earlier
    ones as history, and the latest are test."""
    n_test = test_count(len(entries), test_fraction)
    ids = [entry[0] for entry in entries]
    return [
        Sample(
            id=sample_id,
            time=time,
            x=x,
            y=y,
            split="test" if i >= len(entries) - n_test else "train",
            history_ids=tuple(ids[:i]),
            preference_spans=spans,
        )
        for i, (sample_id, time, x, y, spans) in enumerate(entries)
    ]


def write_plans(out_dir: str | Path, plans: list[UserPlan], overwrite: bool) -> list[Path]:
    """Check every plan, then write the stores. Existing stores are kept unless `overwrite`; a
    path in the way that is not a store (a file, a folder with files) is refused unless
    `overwrite`, before anything is written."""
    out_dir = Path(out_dir)
    paths = [out_dir / name for name in _store_names([plan.user_id for plan in plans])]
    for path, plan in zip(paths, plans, strict=True):
        prepare_store(path, plan.user_id, plan.source, plan.samples, plan.history, plan.extra_meta)
    pending = [(path, plan) for path, plan in zip(paths, plans, strict=True)
               if overwrite or not (path / "user.json").is_file()]
    for path, _ in pending:
        refuse_to_replace(path, overwrite, why="that is not a user store")
    for path, plan in pending:
        write_user_store(path, plan.user_id, plan.source, plan.samples, plan.history, plan.extra_meta,
                         overwrite=overwrite)
    log.info("%d user stores in %s (%d written, %d kept)", len(paths), out_dir, len(pending),
             len(paths) - len(pending))
    return paths
