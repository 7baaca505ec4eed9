"""The user store: the one thing a device knows about its user, a folder with its samples
(x, y, in time order) and its history, read and checked in full when opened.

    <store>/user.json      {"format": "nextquill-user-store/1", "user_id", "source",
                            "n_train", "n_test", "n_history", plus source-specific info}
    <store>/samples.jsonl  {"id", "time", "x", "y", "split", "history_ids", "preference_spans"}
    <store>/history.jsonl  {"id", "time", "text"}

`preference_spans` are character offsets [start, end) into `y` (only synthetic users have
them); `history_ids` are the history items the sample may see. A store is written through
`atomic_directory` after the same checks `UserStore.open` makes, so bad content never
reaches the disk. The builders of stores (Shakespeare, synthetic, LaMP-style JSON) are in
`simulations/datasets/`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.paths import atomic_directory, atomic_write_text, json_text, jsonl_text

STORE_FORMAT = "nextquill-user-store/1"
SOURCES = ("shakespeare", "synthetic", "lamp-json", "chitchat")
SPLITS = ("train", "test")
CORE_META = ("format", "user_id", "source", "n_train", "n_test", "n_history")


class DataError(ValueError):
    """Bad user data; the message names the file, the record and what is wrong."""


@dataclass(frozen=True)
class HistoryItem:
    """One piece of the user's own past text (a profile item, an earlier line)."""

    id: str
    time: float
    text: str


@dataclass(frozen=True)
class Sample:
    """One personalization example: context `x`, the user's target `y`."""

    id: str
    time: float
    x: str
    y: str
    split: str  # "train" or "test"
    history_ids: tuple[str, ...]
    preference_spans: tuple[tuple[int, int], ...] = ()  # character offsets [start, end) into y




def is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def required_text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if key not in row:
        raise DataError(f"{where}: missing field '{key}'")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def required_field(row: dict, key: str, where: str) -> Any:
    if key not in row:
        raise DataError(f"{where}: missing field '{key}'")
    return row[key]


def _id_and_time(row: Any, kind: str, where: str) -> tuple[str, float, str]:
    """The id and time every store record has, and `where` extended with the record's id."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a {kind} must be a JSON object, got {type(row).__name__}")
    record_id = required_text(row, "id", where)
    where = f"{where} ({kind} {record_id!r})"
    time = required_field(row, "time", where)
    if not is_finite_number(time):
        raise DataError(f"{where}: field 'time' must be a finite number, got {time!r}")
    return record_id, time, where


def _sample_from_row(row: Any, where: str) -> Sample:
    sample_id, time, where = _id_and_time(row, "sample", where)
    x = required_field(row, "x", where)
    if not isinstance(x, str):
        raise DataError(f"{where}: field 'x' must be a string, got {type(x).__name__}")
    y = required_text(row, "y", where)
    split = required_field(row, "split", where)
    if split not in SPLITS:
        raise DataError(f"{where}: field 'split' must be one of {SPLITS}, got {split!r}")
    history_ids = required_field(row, "history_ids", where)
    if not isinstance(history_ids, list | tuple) or not all(isinstance(h, str) for h in history_ids):
        raise DataError(f"{where}: field 'history_ids' must be a list of strings")
    if len(set(history_ids)) != len(history_ids):
        raise DataError(f"{where}: field 'history_ids' repeats an id")
    spans = required_field(row, "preference_spans", where)
    if not isinstance(spans, list | tuple):
        raise DataError(f"{where}: field 'preference_spans' must be a list of [start, end] pairs")
    for span in spans:
        ok_shape = isinstance(span, list | tuple) and len(span) == 2
        if not ok_shape or not all(isinstance(v, int) and not isinstance(v, bool) for v in span):
            raise DataError(f"{where}: preference span {span!r} is not a pair of integers")
        if not 0 <= span[0] < span[1] <= len(y):
            raise DataError(
                f"{where}: preference span {list(span)} is out of range for y of {len(y)} characters"
            )
    return Sample(
        id=sample_id,
        time=time,
        x=x,
        y=y,
        split=split,
        history_ids=tuple(history_ids),
        preference_spans=tuple((int(s), int(e)) for s, e in spans),
    )


def _history_from_row(row: Any, where: str) -> HistoryItem:
    item_id, time, where = _id_and_time(row, "history item", where)
    return HistoryItem(id=item_id, time=time, text=required_text(row, "text", where))


def _check_store(
    samples_file: Path,
    history_file: Path,
    samples: list[tuple[str, Sample]],
    history: list[tuple[str, HistoryItem]],
) -> None:
    """Checks across records; each entry carries the label of where it came from."""
    seen: dict[str, str] = {}
    for where, item in history:
        where = f"{where} (history item {item.id!r})"
        if item.id in seen:
            raise DataError(f"{where}: history id {item.id!r} already used at {seen[item.id]}")
        seen[item.id] = where
    seen_samples: dict[str, str] = {}
    previous_time = -math.inf
    for where, sample in samples:
        where = f"{where} (sample {sample.id!r})"
        if sample.id in seen_samples:
            raise DataError(f"{where}: sample id {sample.id!r} already used at {seen_samples[sample.id]}")
        seen_samples[sample.id] = where
        if sample.time < previous_time:
            raise DataError(
                f"{where}: samples must be in time order, but time {sample.time} comes after "
                f"{previous_time} in {samples_file}"
            )
        previous_time = sample.time
        missing = [h for h in sample.history_ids if h not in seen]
        if missing:
            raise DataError(f"{where}: history id {missing[0]!r} is not in {history_file}")




def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    """(label naming file and line, parsed row) for each line of a store file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file is missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read: {error}") from None
    lines = text.split("\n")
    if lines[-1]:
        raise DataError(
            f"{path}, line {len(lines)}: last line has no newline at the end; the file looks truncated"
        )
    rows = []
    for number, line in enumerate(lines[:-1], start=1):
        where = f"{path}, line {number}"
        if not line.strip():
            raise DataError(f"{where}: blank line")
        try:
            rows.append((where, json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataError(f"{where}, column {error.colno}: invalid JSON ({error.msg})") from None
    return rows


def _check_meta(meta: Any, where: str) -> dict:
    if not isinstance(meta, dict):
        raise DataError(f"{where}: must be a JSON object")
    if meta.get("format") != STORE_FORMAT:
        raise DataError(f"{where}: field 'format' must be {STORE_FORMAT!r}, got {meta.get('format')!r}")
    required_text(meta, "user_id", where)
    if meta.get("source") not in SOURCES:
        raise DataError(f"{where}: field 'source' must be one of {SOURCES}, got {meta.get('source')!r}")
    for key in ("n_train", "n_test", "n_history"):
        value = required_field(meta, key, where)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataError(f"{where}: field '{key}' must be a non-negative integer, got {value!r}")
    return meta


@dataclass(frozen=True, eq=False)
class UserStore:
    """One user's samples and history, read and checked in full when opened."""

    path: Path
    user_id: str
    meta: dict
    _samples: tuple[Sample, ...] = field(repr=False)
    _history: dict[str, tuple[int, HistoryItem]] = field(repr=False)  # id -> (line order, item)

    @classmethod
    def open(cls, path: str | Path) -> UserStore:
        """Read and check a store; DataError names the file and line of any problem."""
        path = Path(path)
        meta_file = path / "user.json"
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{meta_file}: file is missing (is {path} a user store?)") from None
        except json.JSONDecodeError as error:
            raise DataError(
                f"{meta_file}, line {error.lineno}, column {error.colno}: invalid JSON ({error.msg})"
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"{meta_file}: cannot read: {error}") from None
        meta = _check_meta(meta, str(meta_file))
        samples_file, history_file = path / "samples.jsonl", path / "history.jsonl"
        history = [(where, _history_from_row(row, where)) for where, row in _read_jsonl(history_file)]
        samples = [(where, _sample_from_row(row, where)) for where, row in _read_jsonl(samples_file)]
        _check_store(samples_file, history_file, samples, history)
        counts = {
            "n_train": sum(s.split == "train" for _, s in samples),
            "n_test": sum(s.split == "test" for _, s in samples),
            "n_history": len(history),
        }
        for key, count in counts.items():
            if meta[key] != count:
                raise DataError(f"{meta_file}: field '{key}' says {meta[key]} but the store holds {count}")
        return cls._from_checked(path, meta, [s for _, s in samples], [h for _, h in history])

    @classmethod
    def _from_checked(
        cls, path: Path, meta: dict, samples: list[Sample], history: list[HistoryItem]
    ) -> UserStore:
        return cls(
            path=path,
            user_id=meta["user_id"],
            meta=meta,
            _samples=tuple(samples),
            _history={item.id: (order, item) for order, item in enumerate(history)},
        )

    def samples(self, split: str | None = None) -> list[Sample]:
        """The samples in time order, all of them or those of one split ("train" / "test")."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        return [s for s in self._samples if split is None or s.split == split]

    def history(self) -> list[HistoryItem]:
        """Every history item, in the order of the store's file."""
        return [item for _, item in sorted(self._history.values(), key=lambda entry: entry[0])]

    def history_for(self, sample: Sample) -> list[HistoryItem]:
        """The history items `sample` may see, most recent first (ties: later in the file first)."""
        try:
            entries = [self._history[h] for h in sample.history_ids]
        except KeyError as error:
            raise ValueError(f"history item {error.args[0]!r} is not in the store {self.path}") from None
        entries.sort(key=lambda entry: (entry[1].time, entry[0]), reverse=True)
        return [item for _, item in entries]

    @property
    def cache_dir(self) -> Path:
        """<store>/cache, for what a device derives from the store (token probabilities...);
        made by the first write into it, so that a refused command leaves the store as it was."""
        return self.path / "cache"


def _sample_row(sample: Sample) -> dict[str, Any]:
    return {
        "id": sample.id,
        "time": sample.time,
        "x": sample.x,
        "y": sample.y,
        "split": sample.split,
        "history_ids": list(sample.history_ids),
        "preference_spans": [list(span) for span in sample.preference_spans],
    }


def _history_row(item: HistoryItem) -> dict[str, Any]:
    return {"id": item.id, "time": item.time, "text": item.text}


def prepare_store(
    path: Path,
    user_id: str,
    source: str,
    samples: Iterable[Sample],
    history: Iterable[HistoryItem],
    extra_meta: dict | None,
) -> tuple[dict, list[dict], list[dict]]:
    """Check a store's content exactly as `UserStore.open` would; return what to write."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    clash = set(extra_meta or {}) & set(CORE_META)
    if clash:
        raise ValueError(f"extra_meta may not set {sorted(clash)}")
    samples_file, history_file = path / "samples.jsonl", path / "history.jsonl"
    sample_rows = [_sample_row(s) for s in sorted(samples, key=lambda s: s.time)]
    history_rows = [_history_row(h) for h in sorted(history, key=lambda h: h.time)]
    checked_samples = [(f"{samples_file}, sample {i}", row) for i, row in enumerate(sample_rows)]
    checked_samples = [(where, _sample_from_row(row, where)) for where, row in checked_samples]
    checked_history = [(f"{history_file}, item {i}", row) for i, row in enumerate(history_rows)]
    checked_history = [(where, _history_from_row(row, where)) for where, row in checked_history]
    _check_store(samples_file, history_file, checked_samples, checked_history)
    meta = {
        "format": STORE_FORMAT,
        "user_id": user_id,
        "source": source,
        "n_train": sum(row["split"] == "train" for row in sample_rows),
        "n_test": sum(row["split"] == "test" for row in sample_rows),
        "n_history": len(history_rows),
        **(extra_meta or {}),
    }
    _check_meta(meta, f"{path / 'user.json'}")
    return meta, sample_rows, history_rows


def write_user_store(
    path: str | Path,
    user_id: str,
    source: str,
    samples: list[Sample],
    history: list[HistoryItem],
    extra_meta: dict | None = None,
    overwrite: bool = False,
) -> UserStore:
    """Check, then write a store at `path` in one rename (samples sorted by time).

    Raises DataError for bad content and FileExistsError when `path` exists and not `overwrite`.
    """
    path = Path(path)
    meta, sample_rows, history_rows = prepare_store(path, user_id, source, samples, history, extra_meta)
    write_prepared_store(path, meta, sample_rows, history_rows, overwrite, sync=True)
    return UserStore.open(path)


def write_prepared_store(path: Path, meta: dict, sample_rows: list[dict], history_rows: list[dict], overwrite: bool,
                         sync: bool) -> None:
    """Write what `prepare_store` returned, as one rename of a folder staged beside `path`.
    `sync`: each file reaches the disk before the rename; without it, the caller syncs once
    after a batch (a store is still never seen half written by a reader or a rerun)."""
    files = {"user.json": json_text(meta), "samples.jsonl": jsonl_text(sample_rows),
             "history.jsonl": jsonl_text(history_rows)}
    with atomic_directory(path, overwrite=overwrite) as staging:
        for name, text in files.items():
            if sync:
                atomic_write_text(staging / name, text)
            else:  # a private folder until the rename: nothing can read it half written
                (staging / name).write_text(text, encoding="utf-8")


def list_user_stores(root: str | Path) -> list[Path]:
    """The user stores directly under `root` (folders holding a user.json), sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "user.json").is_file()
    )
