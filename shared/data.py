"""User stores: one directory per user with its samples (x, y, in time order) and history.

A store is the only thing a device knows about its user:

    <store>/user.json      {"format": "nextquill-user-store/1", "user_id", "source",
                            "n_train", "n_test", "n_history", plus source-specific info}
    <store>/samples.jsonl  {"id", "time", "x", "y", "split", "history_ids", "preference_spans"}
    <store>/history.jsonl  {"id", "time", "text"}

`preference_spans` are character offsets [start, end) into `y` (only synthetic users have
them); `history_ids` are the history items the sample may see.

Three builders fill stores: Shakespeare characters from the user plays of `shared.corpus`,
synthetic users with known preference words, and LaMP / LongLaMP-style JSON files. Every
input is checked before anything is written, and every store is written through
`atomic_directory`, so bad input leaves the disk as it was.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared import corpus
from shared.paths import atomic_directory, atomic_write_json, atomic_write_jsonl, refuse_to_replace

log = logging.getLogger(__name__)

STORE_FORMAT = "nextquill-user-store/1"
SOURCES = ("shakespeare", "synthetic", "lamp-json")
SPLITS = ("train", "test")
_CORE_META = ("format", "user_id", "source", "n_train", "n_test", "n_history")


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


# ---------------------------------------------------------------- validation


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _nonempty_str(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if key not in row:
        raise DataError(f"{where}: missing field '{key}'")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def _field(row: dict, key: str, where: str) -> Any:
    if key not in row:
        raise DataError(f"{where}: missing field '{key}'")
    return row[key]


def _id_and_time(row: Any, kind: str, where: str) -> tuple[str, float, str]:
    """The id and time every store record has, and `where` extended with the record's id."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a {kind} must be a JSON object, got {type(row).__name__}")
    record_id = _nonempty_str(row, "id", where)
    where = f"{where} ({kind} {record_id!r})"
    time = _field(row, "time", where)
    if not _is_number(time):
        raise DataError(f"{where}: field 'time' must be a finite number, got {time!r}")
    return record_id, time, where


def _sample_from_row(row: Any, where: str) -> Sample:
    sample_id, time, where = _id_and_time(row, "sample", where)
    x = _field(row, "x", where)
    if not isinstance(x, str):
        raise DataError(f"{where}: field 'x' must be a string, got {type(x).__name__}")
    y = _nonempty_str(row, "y", where)
    split = _field(row, "split", where)
    if split not in SPLITS:
        raise DataError(f"{where}: field 'split' must be one of {SPLITS}, got {split!r}")
    history_ids = _field(row, "history_ids", where)
    if not isinstance(history_ids, list | tuple) or not all(isinstance(h, str) for h in history_ids):
        raise DataError(f"{where}: field 'history_ids' must be a list of strings")
    if len(set(history_ids)) != len(history_ids):
        raise DataError(f"{where}: field 'history_ids' repeats an id")
    spans = _field(row, "preference_spans", where)
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
    return HistoryItem(id=item_id, time=time, text=_nonempty_str(row, "text", where))


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


# ---------------------------------------------------------------- the store


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
    _nonempty_str(meta, "user_id", where)
    if meta.get("source") not in SOURCES:
        raise DataError(f"{where}: field 'source' must be one of {SOURCES}, got {meta.get('source')!r}")
    for key in ("n_train", "n_test", "n_history"):
        value = _field(meta, key, where)
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
        """<store>/cache, for what a device derives from the store (token probabilities...)."""
        cache = self.path / "cache"
        cache.mkdir(exist_ok=True)
        return cache


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


def _prepare_store(
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
    clash = set(extra_meta or {}) & set(_CORE_META)
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
    meta, sample_rows, history_rows = _prepare_store(path, user_id, source, samples, history, extra_meta)
    with atomic_directory(path, overwrite=overwrite) as staging:
        atomic_write_json(staging / "user.json", meta)
        atomic_write_jsonl(staging / "samples.jsonl", sample_rows)
        atomic_write_jsonl(staging / "history.jsonl", history_rows)
    return UserStore.open(path)


def list_user_stores(root: str | Path) -> list[Path]:
    """The user stores directly under `root` (folders holding a user.json), sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "user.json").is_file()
    )


# ---------------------------------------------------------------- shared builder steps


@dataclass
class _UserPlan:
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


def _n_test(n: int, test_fraction: float) -> int:
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    return min(n, max(1, round(test_fraction * n)))


def _chronological_samples(
    entries: list[tuple[str, float, str, str, tuple]], test_fraction: float
) -> list[Sample]:
    """Samples from (id, time, x, y, preference_spans) in time order; each sees all earlier
    ones as history, and the latest are test."""
    n_test = _n_test(len(entries), test_fraction)
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


def _write_plans(out_dir: str | Path, plans: list[_UserPlan], overwrite: bool) -> list[Path]:
    """Check every plan, then write the stores. Existing stores are kept unless `overwrite`; a
    path in the way that is not a store (a file, a folder with files) is refused unless
    `overwrite`, before anything is written."""
    out_dir = Path(out_dir)
    paths = [out_dir / name for name in _store_names([plan.user_id for plan in plans])]
    for path, plan in zip(paths, plans, strict=True):
        _prepare_store(path, plan.user_id, plan.source, plan.samples, plan.history, plan.extra_meta)
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


# ---------------------------------------------------------------- Shakespeare


def build_shakespeare_users(
    out_dir: str | Path,
    min_samples: int = 30,
    test_fraction: float = 0.1,
    max_users: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """One store per (user play, speaker) with at least `min_samples` speeches.

    x is the cue (the speech before, or the scene heading), y the speech, time its index
    in the play; history is the speaker's earlier speeches; the latest speeches are test.
    Users come in play order, then speaker order; `max_users` keeps the first ones.
    """
    plans: list[_UserPlan] = []
    for play in corpus.user_plays():
        play_speeches = corpus.speeches(play)
        for speaker, own in sorted(corpus.speeches_by_speaker(play).items()):
            if len(own) < min_samples:
                continue
            entries = [
                (f"speech-{s.index:05d}", float(s.index), corpus.cue_for(play_speeches, s.index), s.text, ())
                for s in own
            ]
            samples = _chronological_samples(entries, test_fraction)
            history = [HistoryItem(id=s.id, time=s.time, text=s.y) for s in samples]
            extra = {"play": play, "speaker": speaker}
            plans.append(_UserPlan(f"{play}/{speaker}", "shakespeare", samples, history, extra))
    if max_users is not None:
        plans = plans[:max_users]
    return _write_plans(out_dir, plans, overwrite)


# ---------------------------------------------------------------- synthetic users

# Each signature phrase uses words no other phrase uses, so users' markers never overlap.
# fmt: off
_SIGNATURE_PHRASES = (
    "Forsooth, sweeting!", "By my troth!", "Marry, anon!", "Good faith, coz!", "Alack, alas!",
    "Fie upon't!", "Zounds!", "Prithee, hark!", "Godamercy!", "Well met, friend!", "Odds bodkins!",
    "Gramercy, neighbour!", "What ho, there!", "Soft you now!", "Ay, verily!", "Hey nonny nonny!",
    "Lo, behold!", "Adieu, adieu!", "Mark me!", "Ods pittikins!", "Sirrah, attend!", "Nay, peace!",
    "Tush, tush!", "O sweet lady!",
)
_FAVOURITE_ADJECTIVES = (
    "gallant", "comely", "goodly", "sprightly", "wondrous", "noble", "merry", "dainty", "brave",
    "gentle", "fair", "rare", "bonny", "jocund", "pretty", "stately", "quaint", "rich", "fine",
    "lusty", "nimble", "rosy", "bright", "princely", "peerless", "precious", "seemly", "honest",
    "worthy", "pleasant", "splendid", "glorious", "lovely", "handsome", "excellent", "matchless",
    "curious", "admirable", "delicate", "trim", "neat", "cunning", "fresh", "mellow", "lively",
    "blithe", "courtly", "modest",
)
_ADJECTIVES_PER_USER = 2
# Items and their facts are shared by all users: words a model can copy from x.
_ITEMS = (
    "lantern", "cloak", "dagger", "goblet", "lute", "saddle", "ring", "bonnet", "quill", "casket",
    "candlestick", "mirror", "cushion", "sword", "flagon", "cradle", "chair", "bell", "drum",
    "purse",
)
_COLOURS = ("red", "green", "blue", "black", "white", "grey", "yellow", "purple", "brown", "silver")
_MATERIALS = ("oak", "iron", "leather", "silk", "wool", "brass", "pewter", "linen", "clay", "velvet")
_PLACES = (
    "Verona", "Padua", "Milan", "Venice", "London", "Windsor", "Athens", "Mantua", "Bohemia",
    "Ephesus",
)
# fmt: on
# Reply templates: {phrase} and {adj0}/{adj1} are the user's markers, the rest restates x.
_REPLY_TEMPLATES = (
    "{phrase} The {item} is {colour} and made of {material}, brought here from {place}; "
    "a {adj0}, {adj1} piece indeed.",
    "This {colour} {item} of {material} came from {place}. {phrase} I call it {adj0} and {adj1}.",
    "From {place} comes the {item}, all {colour} {material}, so {adj0} and so {adj1}. {phrase}",
)
_WORD = re.compile(r"[A-Za-z']+")


def _compose(template: str, markers: dict[str, str], facts: dict[str, str]) -> tuple[str, tuple]:
    """Fill `template`; return the text and the character spans of every marker word."""
    text, spans = "", []
    for piece in re.split(r"(\{\w+\})", template):
        name = piece[1:-1] if piece.startswith("{") else None
        if name in markers:
            spans += [(len(text) + m.start(), len(text) + m.end()) for m in _WORD.finditer(markers[name])]
            text += markers[name]
        else:
            text += facts[name] if name else piece
    return text, tuple(spans)


def build_synthetic_users(
    out_dir: str | Path,
    n_users: int = 8,
    samples_per_user: int = 40,
    test_fraction: float = 0.1,
    seed: int = 0,
    overwrite: bool = False,
) -> list[Path]:
    """Users whose replies carry known preference words (ground truth for DCE).

    Each user has a signature phrase and favourite adjectives no other user has (up to 24
    users; beyond, each user's combination of them is unique, the words recur); x asks
    about an item with its facts, y restates the facts and adds the user's markers, whose
    character spans are the samples' `preference_spans`.
    """
    pairs = list(itertools.combinations(_FAVOURITE_ADJECTIVES, _ADJECTIVES_PER_USER))
    disjoint = min(len(_SIGNATURE_PHRASES), len(_FAVOURITE_ADJECTIVES) // _ADJECTIVES_PER_USER)
    capacity = len(_SIGNATURE_PHRASES) * len(pairs)
    if not 1 <= n_users <= capacity:
        raise ValueError(f"n_users must be between 1 and {capacity}, got {n_users}")
    if samples_per_user < 1:
        raise ValueError(f"samples_per_user must be at least 1, got {samples_per_user}")
    rng = random.Random(seed)
    if n_users <= disjoint:  # no marker word shared by two users
        phrases = rng.sample(_SIGNATURE_PHRASES, n_users)
        adjectives = rng.sample(_FAVOURITE_ADJECTIVES, n_users * _ADJECTIVES_PER_USER)
        favourite_sets = [adjectives[u * _ADJECTIVES_PER_USER : (u + 1) * _ADJECTIVES_PER_USER] for u in range(n_users)]
    else:  # simulations at scale: markers recur across users, each user's combination is unique
        rng.shuffle(pairs)
        phrases = [_SIGNATURE_PHRASES[u % len(_SIGNATURE_PHRASES)] for u in range(n_users)]
        favourite_sets = [list(pairs[u // len(_SIGNATURE_PHRASES)]) for u in range(n_users)]
    plans = []
    for u in range(n_users):
        favourites = favourite_sets[u]
        entries = []
        for i in range(samples_per_user):
            facts = {
                "item": rng.choice(_ITEMS),
                "colour": rng.choice(_COLOURS),
                "material": rng.choice(_MATERIALS),
                "place": rng.choice(_PLACES),
            }
            x = "Tell me about the {item}: it is {colour}, made of {material}, from {place}.".format(**facts)
            adj0, adj1 = rng.sample(favourites, 2)
            markers = {"phrase": phrases[u], "adj0": adj0, "adj1": adj1}
            y, spans = _compose(rng.choice(_REPLY_TEMPLATES), markers, facts)
            entries.append((f"sample-{i:04d}", float(i), x, y, spans))
        samples = _chronological_samples(entries, test_fraction)
        history = [HistoryItem(id=s.id, time=s.time, text=s.y) for s in samples]
        extra = {"seed": seed, "signature_phrase": phrases[u], "favourite_adjectives": favourites}
        width = max(2, len(str(n_users - 1)))  # names sort in user order
        plans.append(_UserPlan(f"synthetic-user-{u:0{width}d}", "synthetic", samples, history, extra))
    return _write_plans(out_dir, plans, overwrite)


# ---------------------------------------------------------------- LaMP / LongLaMP JSON


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read: {error}") from None
    return text


def _json_error(path: Path, error: json.JSONDecodeError, line_offset: int = 0) -> DataError:
    return DataError(
        f"{path}, line {error.lineno + line_offset}, column {error.colno}: invalid JSON "
        f"({error.msg}); is the file truncated?"
    )


def _load_records(path: Path) -> list[tuple[str, Any]]:
    """(label, record) for a JSON list or JSON Lines file of records."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise _json_error(path, error) from None
        if not isinstance(records, list):
            raise DataError(f"{path}: must hold a JSON list of records")
        rows = [(f"{path}, record {i}", record) for i, record in enumerate(records)]
    else:
        rows = _load_json_lines(path, text)
    if not rows:
        raise DataError(f"{path}: holds no records")
    return rows


def _load_json_lines(path: Path, text: str) -> list[tuple[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}, line {number} (record {len(rows)})", json.loads(line)))
        except json.JSONDecodeError as error:
            raise _json_error(path, error, line_offset=number - 1) from None
    return rows


def _record_id(record: Any, key: str, where: str) -> str:
    value = _field(record, key, where)
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value) == "":
        raise DataError(f"{where}: field '{key}' must be a non-empty string or an integer, got {value!r}")
    return str(value)


def _parse_time(value: Any, where: str) -> float:
    """A number, or a date string (ISO 8601; dates without a zone are taken as UTC) in seconds."""
    if _is_number(value):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        try:
            moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return moment.timestamp()
    raise DataError(f"{where}: time {value!r} is neither a number nor an ISO date")


@dataclass
class _LampRecord:
    id: str
    user_id: str
    input: str
    output: str
    time: float | None
    profile: list[tuple[str, float | None, str, str]]  # (history id, time, text, item input/title)


def _parse_record(record: Any, where: str, output: str | None) -> _LampRecord:
    """Check one record; `output` comes from the golds file when there is one."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    record_id = _record_id(record, "id", where)
    where = f"{where} (id {record_id!r})"
    text_input = _nonempty_str(record, "input", where)
    if output is None:
        output = _nonempty_str(record, "output", where)
    user_id = _record_id(record, "user_id", where) if "user_id" in record else record_id
    time = _parse_time(record["time"], where) if "time" in record else None
    profile = _field(record, "profile", where)
    if not isinstance(profile, list):
        raise DataError(f"{where}: field 'profile' must be a list, got {type(profile).__name__}")
    items = []
    for k, item in enumerate(profile):
        item_where = f"{where}, profile item {k}"
        if not isinstance(item, dict):
            raise DataError(f"{item_where}: must be a JSON object, got {type(item).__name__}")
        text = _nonempty_str(item, "text", item_where)
        if "id" in item:
            item_id = _record_id(item, "id", item_where)
        else:
            item_id = "text-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
        stamp = item.get("time", item.get("date"))
        item_time = _parse_time(stamp, item_where) if stamp is not None else None
        title = item.get("input", item.get("title", ""))
        if not isinstance(title, str):
            raise DataError(
                f"{item_where}: field 'input'/'title' must be a string, got {type(title).__name__}"
            )
        items.append((item_id, item_time, text, title))
    return _LampRecord(record_id, user_id, text_input, output, time, items)


def _load_golds(golds_path: Path) -> dict[str, str]:
    text = _read_text(golds_path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise _json_error(golds_path, error) from None
    golds = document.get("golds") if isinstance(document, dict) else None
    if not isinstance(golds, list):
        raise DataError(f"{golds_path}: must be a JSON object with a list 'golds'")
    outputs: dict[str, str] = {}
    for i, gold in enumerate(golds):
        where = f"{golds_path}, gold {i}"
        if not isinstance(gold, dict):
            raise DataError(f"{where}: must be a JSON object, got {type(gold).__name__}")
        gold_id = _record_id(gold, "id", where)
        where = f"{where} (id {gold_id!r})"
        if gold_id in outputs:
            raise DataError(f"{where}: id {gold_id!r} appears twice")
        outputs[gold_id] = _nonempty_str(gold, "output", where)
    return outputs


def _lamp_plan(user_id: str, records: list[_LampRecord], test_fraction: float, sources: dict) -> _UserPlan:
    """One user's store: records in time order (file order without times), latest are test."""
    if all(r.time is not None for r in records):
        records = sorted(records, key=lambda r: r.time)
    first_seen: dict[str, tuple[float | None, str, str]] = {}
    for record in records:
        for item_id, item_time, text, title in record.profile:
            first_seen.setdefault(item_id, (item_time, text, title))
    # Profile times are used only when every item has one; else the order items were met in.
    dated = all(t is not None for t, _, _ in first_seen.values())
    history = sorted(
        (
            HistoryItem(id=item_id, time=t if dated else float(order), text=text)
            for order, (item_id, (t, text, _)) in enumerate(first_seen.items())
        ),
        key=lambda h: h.time,
    )
    n_test = _n_test(len(records), test_fraction)
    profile_samples: list[tuple[str, str, str, tuple[str, ...]]] = []
    if n_test == len(records):
        # No train record: the user's own profile is the training text (as OPPU does).
        profile_samples = [
            (f"profile-{item.id}", first_seen[item.id][2], item.text, tuple(h.id for h in history[:k]))
            for k, item in enumerate(history)
        ]
    # Sample times are ranks: profile items first, then the records in time order.
    samples = [
        Sample(id=sample_id, time=float(rank), x=x, y=y, split="train", history_ids=seen)
        for rank, (sample_id, x, y, seen) in enumerate(profile_samples)
    ]
    for k, record in enumerate(records):
        own_history = tuple(dict.fromkeys(item_id for item_id, _, _, _ in record.profile))
        samples.append(
            Sample(
                id=record.id,
                time=float(len(profile_samples) + k),
                x=record.input,
                y=record.output,
                split="test" if k >= len(records) - n_test else "train",
                history_ids=own_history,
            )
        )
    extra = {
        **sources,
        "sample_time": "rank in the user's time order (record 'time' when all records have one, "
        "else file order)",
        "profile_train_samples": len(profile_samples),
    }
    return _UserPlan(user_id, "lamp-json", samples, history, extra)


def import_lamp_json(
    out_dir: str | Path,
    records_path: str | Path,
    golds_path: str | Path | None = None,
    test_fraction: float = 0.1,
    overwrite: bool = False,
) -> list[Path]:
    """User stores from LaMP / LongLaMP-style JSON.

    `records_path` alone: a JSON list or JSON Lines of {"id", "input", "output", "profile",
    "user_id", optional "time"}. With `golds_path`: LaMP's questions file (no "output") and
    its outputs file {"task", "golds": [{"id", "output"}]}, joined on id. A record without
    "user_id" is its own user (LaMP's convention). Everything is checked before any write.
    """
    records_path = Path(records_path)
    rows = _load_records(records_path)
    sources: dict[str, Any] = {"records_file": records_path.name}
    outputs: dict[str, str] | None = None
    if golds_path is not None:
        golds_path = Path(golds_path)
        outputs = _load_golds(golds_path)
        sources["golds_file"] = golds_path.name
    records: list[_LampRecord] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        output = None
        if outputs is not None:
            record_id = _record_id(row, "id", where) if isinstance(row, dict) else None
            if record_id is not None and record_id not in outputs:
                raise DataError(f"{where}: question id {record_id!r} has no gold output in {golds_path}")
            output = outputs.get(record_id) if record_id is not None else None
        record = _parse_record(row, where, output)
        if record.id in seen:
            raise DataError(f"{where}: id {record.id!r} already used at {seen[record.id]}")
        seen[record.id] = where
        records.append(record)
    if outputs is not None:
        orphans = [gold_id for gold_id in outputs if gold_id not in seen]
        if orphans:
            raise DataError(f"{golds_path}: gold id {orphans[0]!r} has no question in {records_path}")
    by_user: dict[str, list[_LampRecord]] = {}
    for record in records:
        by_user.setdefault(record.user_id, []).append(record)
    plans = [
        _lamp_plan(user_id, user_records, test_fraction, sources) for user_id, user_records in by_user.items()
    ]
    return _write_plans(out_dir, plans, overwrite)
