"""What every builder of user stores shares: a plan per user (checked in full before
anything is written), store folder names, the chronological train / test split."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from shared.paths import data_dir, ensure_folder, file_lock, refuse_to_replace, remove_stale_staging
from shared.user_store import HistoryItem, Sample, prepare_store, write_prepared_store

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
    clashing = {s for s, count in Counter(slugs).items() if count > 1}
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
    `overwrite`, before anything is written.

    Each store appears in one rename, so a kill at any point leaves whole stores and no half
    one; a rerun keeps the stores written and first removes what a kill left staged. The files
    are synced to the disk once, after the last store (a sync per file made 100,000 stores take
    an hour)."""
    out_dir = Path(out_dir)
    paths = [out_dir / name for name in _store_names([plan.user_id for plan in plans])]
    prepared = [prepare_store(path, plan.user_id, plan.source, plan.samples, plan.history, plan.extra_meta)
                for path, plan in zip(paths, plans, strict=True)]
    pending = [k for k, path in enumerate(paths) if overwrite or not (path / "user.json").is_file()]
    for k in pending:
        refuse_to_replace(paths[k], overwrite, why="that is not a user store")
    if pending:
        ensure_folder(out_dir)
        # The lock lives in the data directory: the user's folder holds stores only.
        folder_key = hashlib.sha1(str(out_dir.resolve()).encode("utf-8")).hexdigest()[:16]
        with file_lock(data_dir() / "locks" / f"user-stores-{folder_key}.lock"):
            stale = remove_stale_staging(out_dir)
            if stale:
                log.info("removed %d folders an interrupted write left staged in %s", len(stale), out_dir)
            for k in tqdm(pending, desc=f"user stores in {out_dir.name}", unit="store", disable=len(pending) < 100):
                write_prepared_store(paths[k], *prepared[k], overwrite=overwrite, sync=False)
            os.sync()
    log.info("%d user stores in %s (%d written, %d kept)", len(paths), out_dir, len(pending),
             len(paths) - len(pending))
    return paths
