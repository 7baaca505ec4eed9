"""The user store: what `UserStore.open` accepts and refuses, and atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.user_store import DataError, HistoryItem, Sample, UserStore, list_user_stores, write_user_store
from tests.samples import leftovers, tiny_store


def test_write_then_open_round_trips(tmp_path):
    written = tiny_store(tmp_path / "u")
    opened = UserStore.open(tmp_path / "u")
    assert opened.user_id == written.user_id == "user/1"
    assert opened.samples() == written.samples()
    assert opened.samples("test")[0].preference_spans == ((0, 5),)
    assert [s.id for s in opened.samples("train")] == ["s0"]
    assert opened.meta["n_train"] == 1 and opened.meta["n_test"] == 1 and opened.meta["n_history"] == 2
    assert opened.meta["note"] == "x"
    assert [h.id for h in opened.history_for(opened.samples()[1])] == ["h1", "h0"]


def test_history_ties_go_to_the_item_later_in_the_file(tmp_path):
    history = [HistoryItem("a", 0.0, "one"), HistoryItem("b", 0.0, "two"), HistoryItem("c", -1.0, "zero")]
    samples = [Sample("s", 1.0, "x", "y", "test", ("a", "c", "b"))]
    store = write_user_store(tmp_path / "u", "u", "lamp-json", samples, history)
    assert [h.id for h in store.history_for(store.samples()[0])] == ["b", "a", "c"]


def test_write_refuses_an_existing_store_unless_overwrite(tmp_path):
    tiny_store(tmp_path / "u")
    with pytest.raises(FileExistsError):
        tiny_store(tmp_path / "u")
    tiny_store(tmp_path / "u", overwrite=True)
    assert leftovers(tmp_path) == ["u"]


def test_the_cache_dir_is_inside_the_store_and_made_only_by_a_write(tmp_path):
    store = tiny_store(tmp_path / "u")
    assert store.cache_dir == tmp_path / "u" / "cache" and not store.cache_dir.exists()


def test_list_user_stores_finds_only_folders_with_user_json(tmp_path):
    tiny_store(tmp_path / "b")
    tiny_store(tmp_path / "a")
    (tmp_path / "not-a-store").mkdir()
    (tmp_path / "file.txt").write_text("")
    assert list_user_stores(tmp_path) == [tmp_path / "a", tmp_path / "b"]
    assert list_user_stores(tmp_path / "missing") == []


@pytest.mark.parametrize(
    ("bad_sample", "message"),
    [
        (Sample("s", 1.0, "x", "  ", "train", ()), "field 'y' is empty"),
        (Sample("s", 1.0, "x", "y", "valid", ()), "field 'split'"),
        (Sample("s", 1.0, "x", "y", "train", ("nope",)), "history id 'nope'"),
        (Sample("s", 1.0, "x", "abc", "train", (), ((1, 4),)), "out of range"),
        (Sample("s", float("nan"), "x", "y", "train", ()), "field 'time'"),
        (Sample("s", 1.0, None, "y", "train", ()), "field 'x' must be a string"),  # type: ignore[arg-type]
    ],
)
def test_write_rejects_bad_samples_and_writes_nothing(tmp_path, bad_sample, message):
    with pytest.raises(DataError, match=message) as caught:
        write_user_store(tmp_path / "u", "u", "synthetic", [bad_sample], [])
    assert "samples.jsonl" in str(caught.value) and "'s'" in str(caught.value)
    assert leftovers(tmp_path) == []


def _cut_last_line(path: Path) -> None:
    path.write_text(path.read_text()[:-10])


def _replace_in(name: str, old: str, new: str):
    def edit(store: Path) -> None:
        path = store / name
        path.write_text(path.read_text().replace(old, new, 1))

    return edit


@pytest.mark.parametrize(
    ("edit", "file_name", "message"),
    [
        (lambda store: _cut_last_line(store / "samples.jsonl"), "samples.jsonl, line 2", "truncated"),
        (lambda store: _cut_last_line(store / "history.jsonl"), "history.jsonl, line 2", "truncated"),
        (_replace_in("samples.jsonl", '"x": "cue one", ', ""), "samples.jsonl, line 1", "missing field 'x'"),
        (_replace_in("samples.jsonl", '"reply two"', '""'), "samples.jsonl, line 2", "field 'y' is empty"),
        (_replace_in("samples.jsonl", '"test"', '"dev"'), "samples.jsonl, line 2", "field 'split'"),
        (_replace_in("samples.jsonl", '"h1"', '"h9"'), "samples.jsonl, line 2", "history id 'h9'"),
        (_replace_in("samples.jsonl", "[[0, 5]]", "[[0, 50]]"), "samples.jsonl, line 2", "out of range"),
        (_replace_in("samples.jsonl", '"time": 1.0', '"time": "1"'), "samples.jsonl, line 1", "field 'time'"),
        (_replace_in("samples.jsonl", "{", "{{"), "samples.jsonl, line 1, column 2", "invalid JSON"),
        (_replace_in("history.jsonl", '"first words"', "3"), "history.jsonl, line 1", "must be a string"),
        (_replace_in("user.json", '"n_train": 1', '"n_train": 5'), "user.json", "'n_train' says 5"),
        (lambda store: (store / "history.jsonl").unlink(), "history.jsonl", "missing"),
    ],
)
def test_open_rejects_a_damaged_store_naming_file_and_line(tmp_path, edit, file_name, message):
    tiny_store(tmp_path / "u")
    edit(tmp_path / "u")
    with pytest.raises(DataError, match=message) as caught:
        UserStore.open(tmp_path / "u")
    assert file_name in str(caught.value)
