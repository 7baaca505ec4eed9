"""LaMP / LongLaMP-style JSON (input, output, profile) for users who bring the real
benchmark files: one store per user, records in time order, the latest held out."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.user_store import DataError, HistoryItem, Sample, is_finite_number, required_field, required_text
from simulations.datasets.plans import TEST_FRACTION, UserPlan, test_count, write_plans


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
    value = required_field(record, key, where)
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value) == "":
        raise DataError(f"{where}: field '{key}' must be a non-empty string or an integer, got {value!r}")
    return str(value)


def _parse_time(value: Any, where: str) -> float:
    """A time in seconds since 1970 (UTC). The rule: a JSON number is seconds (or any number
    that orders the records); a string of four digits is that year ("2020": 1 January 2020),
    "YYYY-MM" that month, any other ISO 8601 date or time is what it says (without a zone:
    UTC); a string of other digits is seconds."""
    if is_finite_number(value):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d{4}(-\d{2})?", text):
            text = text + ("-01-01" if len(text) == 4 else "-01")
        elif re.fullmatch(r"[+-]?\d+(\.\d+)?", text):
            return float(text)
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return moment.timestamp()
    raise DataError(f"{where}: time {value!r} is neither a number, a year nor an ISO date")


@dataclass
class _LampRecord:
    id: str
    user_id: str
    input: str
    output: str
    time: float | None
    profile: list[tuple[str, float | None, str, str]]  # (history id, time, text, item input/title)
    where: str = ""  # the record's place in its file, for errors


def _parse_record(record: Any, where: str, output: str | None) -> _LampRecord:
    """Check one record; `output` comes from the golds file when there is one."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    record_id = _record_id(record, "id", where)
    where = f"{where} (id {record_id!r})"
    text_input = required_text(record, "input", where)
    if output is None:
        output = required_text(record, "output", where)
    user_id = _record_id(record, "user_id", where) if "user_id" in record else record_id
    time = _parse_time(record["time"], where) if "time" in record else None
    profile = required_field(record, "profile", where)
    if not isinstance(profile, list):
        raise DataError(f"{where}: field 'profile' must be a list, got {type(profile).__name__}")
    items = []
    for k, item in enumerate(profile):
        item_where = f"{where}, profile item {k}"
        if not isinstance(item, dict):
            raise DataError(f"{item_where}: must be a JSON object, got {type(item).__name__}")
        text = required_text(item, "text", item_where)
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
    return _LampRecord(record_id, user_id, text_input, output, time, items, where)


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
        outputs[gold_id] = required_text(gold, "output", where)
    return outputs


def _lamp_plan(user_id: str, records: list[_LampRecord], test_fraction: float, sources: dict) -> UserPlan:
    """One user's store: records in time order (file order without times), latest are test."""
    if all(r.time is not None for r in records):
        records = sorted(records, key=lambda r: r.time)
    first_seen: dict[str, tuple[float | None, str, str]] = {}
    seen_in: dict[str, str] = {}
    for record in records:
        for k, (item_id, item_time, text, title) in enumerate(record.profile):
            if item_id in first_seen and first_seen[item_id][1] != text:
                raise DataError(f"{record.where}, profile item {k}: id {item_id!r} is used with another text at "
                                f"{seen_in[item_id]}; a user's profile id names one text")
            if item_id not in first_seen:
                first_seen[item_id] = (item_time, text, title)
                seen_in[item_id] = f"{record.where}, profile item {k}"
    # Profile times are used only when every item has one; else the order items were met in.
    dated = all(t is not None for t, _, _ in first_seen.values())
    history = sorted(
        (
            HistoryItem(id=item_id, time=t if dated else float(order), text=text)
            for order, (item_id, (t, text, _)) in enumerate(first_seen.items())
        ),
        key=lambda h: h.time,
    )
    n_test = test_count(len(records), test_fraction)
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
    return UserPlan(user_id, "lamp-json", samples, history, extra)


def import_lamp_json(
    out_dir: str | Path,
    records_path: str | Path,
    golds_path: str | Path | None = None,
    test_fraction: float = TEST_FRACTION,
    overwrite: bool = False,
) -> list[Path]:
    """User stores from LaMP / LongLaMP-style JSON (`read_lamp_json`), everything checked before
    any write."""
    return write_plans(out_dir, read_lamp_json(records_path, golds_path, test_fraction), overwrite)


def read_lamp_json(
    records_path: str | Path, golds_path: str | Path | None = None, test_fraction: float = TEST_FRACTION,
) -> list[UserPlan]:
    """The users of LaMP / LongLaMP-style JSON, checked in full; nothing is written.

    `records_path` alone: a JSON list or JSON Lines of {"id", "input", "output", "profile",
    "user_id", optional "time"}. With `golds_path`: LaMP's questions file (no "output") and
    its outputs file {"task", "golds": [{"id", "output"}]}, joined on id. A record without
    "user_id" is its own user (LaMP's convention). Times: `_parse_time`.
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
    return [_lamp_plan(user_id, user_records, test_fraction, sources) for user_id, user_records in by_user.items()]
