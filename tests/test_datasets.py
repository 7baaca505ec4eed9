"""The builders of user stores (Shakespeare, synthetic, LaMP-style JSON) behind `build_users`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shared import corpus
from shared.user_store import DataError, UserStore, list_user_stores
from simulations.datasets import build_shakespeare_users, build_synthetic_users, build_users, import_lamp_json
from tests.samples import leftovers


@pytest.fixture(scope="module")
def shakespeare_stores(tmp_path_factory) -> list[Path]:
    return build_shakespeare_users(tmp_path_factory.mktemp("shakespeare"))


def test_shakespeare_stores_hold_only_user_plays_with_enough_speeches(shakespeare_stores):
    assert shakespeare_stores == list_user_stores(shakespeare_stores[0].parent)
    user_plays = set(corpus.user_plays())
    for path in shakespeare_stores:
        store = UserStore.open(path)
        assert store.meta["source"] == "shakespeare"
        assert store.meta["play"] in user_plays
        assert store.user_id == f"{store.meta['play']}/{store.meta['speaker']}"
        assert len(store.samples()) >= 30
    assert {UserStore.open(p).meta["play"] for p in shakespeare_stores} <= user_plays


def test_shakespeare_test_samples_are_each_users_latest(shakespeare_stores):
    for path in shakespeare_stores:
        samples = UserStore.open(path).samples()
        n_test = max(1, round(0.1 * len(samples)))
        assert [s.split for s in samples] == ["train"] * (len(samples) - n_test) + ["test"] * n_test
        assert [s.time for s in samples] == sorted(s.time for s in samples)


def test_shakespeare_sample_is_the_speech_and_its_cue(shakespeare_stores):
    store = UserStore.open(shakespeare_stores[0])
    play = corpus.speeches(store.meta["play"])
    for sample in store.samples():
        speech = play[int(sample.time)]
        assert speech.speaker == store.meta["speaker"]
        assert sample.y == speech.text
        before = play[speech.index - 1] if speech.index else None
        if before is not None and (before.act, before.scene) == (speech.act, speech.scene):
            assert sample.x == f"{before.speaker}: {before.text}"
        else:
            assert sample.x == speech.scene_heading


def test_history_of_a_sample_is_strictly_earlier_and_most_recent_first(shakespeare_stores):
    store = UserStore.open(shakespeare_stores[0])
    samples = store.samples()
    for position, sample in enumerate(samples):
        history = store.history_for(sample)
        assert {h.id for h in history} == {s.id for s in samples[:position]}
        assert all(h.time < sample.time for h in history)
        assert [h.time for h in history] == sorted((h.time for h in history), reverse=True)
    latest = store.history_for(samples[-1])
    assert latest[0].text == samples[-2].y


def test_shakespeare_builder_names_stores_by_slug_and_respects_max_users(tmp_path):
    paths = build_shakespeare_users(tmp_path, max_users=2)
    assert len(paths) == 2
    for path in paths:
        store = UserStore.open(path)
        assert re.fullmatch(r"[a-z0-9-]+--[a-z0-9-]+", path.name)
        assert path.name.split("--")[0] == store.meta["play"]


def test_builders_keep_existing_stores_unless_overwrite(tmp_path):
    (path,) = build_shakespeare_users(tmp_path, max_users=1)
    meta_file = path / "user.json"
    meta = json.loads(meta_file.read_text())
    meta["marker"] = "kept"
    meta_file.write_text(json.dumps(meta))
    assert build_shakespeare_users(tmp_path, max_users=1) == [path]
    assert UserStore.open(path).meta["marker"] == "kept"
    build_shakespeare_users(tmp_path, max_users=1, overwrite=True)
    assert "marker" not in UserStore.open(path).meta
    assert leftovers(tmp_path) == [path.name]


def test_a_folder_in_the_way_of_a_new_store_is_refused_before_any_store_is_written(tmp_path):
    paths = build_synthetic_users(tmp_path / "first", n_users=2, samples_per_user=8)
    in_the_way = tmp_path / "users" / paths[1].name
    in_the_way.mkdir(parents=True)
    (in_the_way / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{in_the_way} already holds a folder with files that is not a user "
                                              "store; .* pass --overwrite"):
        build_synthetic_users(tmp_path / "users", n_users=2, samples_per_user=8)
    assert sorted(p.name for p in (tmp_path / "users").iterdir()) == [paths[1].name]
    assert (in_the_way / "notes.txt").read_text() == "mine"
    build_synthetic_users(tmp_path / "users", n_users=2, samples_per_user=8, overwrite=True)
    assert UserStore.open(in_the_way).user_id and not (in_the_way / "notes.txt").exists()




def test_synthetic_preference_spans_point_at_marker_words_and_differ_between_users(tmp_path):
    paths = build_synthetic_users(tmp_path, n_users=4, samples_per_user=12)
    markers_by_user = []
    for path in paths:
        store = UserStore.open(path)
        markers = {w.lower() for w in re.findall(r"[A-Za-z']+", store.meta["signature_phrase"])}
        markers |= set(store.meta["favourite_adjectives"])
        marked = set()
        for sample in store.samples():
            words = {sample.y[a:b].lower() for a, b in sample.preference_spans}
            assert words and words <= markers
            marked |= words
            assert all(fact in sample.y for fact in re.findall(r"the (\w+):", sample.x))  # item restated
            assert 10 <= len(sample.y.split()) <= 30
            assert [h.id for h in store.history_for(sample)] == [
                s.id for s in reversed(store.samples()) if s.time < sample.time
            ]
        assert marked == markers
        markers_by_user.append(markers)
    for i, mine in enumerate(markers_by_user):
        for theirs in markers_by_user[i + 1 :]:
            assert not mine & theirs


def test_synthetic_users_scale_past_the_disjoint_markers_with_unique_combinations(tmp_path):
    paths = build_synthetic_users(tmp_path, n_users=120, samples_per_user=2)
    metas = [UserStore.open(p).meta for p in paths]
    combos = {(m["signature_phrase"], tuple(m["favourite_adjectives"])) for m in metas}
    assert len(combos) == 120 and [p.name for p in paths] == sorted(p.name for p in paths)


def test_synthetic_users_are_deterministic_from_the_seed(tmp_path):
    def contents(seed: int, folder: str) -> list[str]:
        paths = build_synthetic_users(tmp_path / folder, n_users=2, samples_per_user=5, seed=seed)
        return [(p / "samples.jsonl").read_text() for p in paths]

    assert contents(3, "a") == contents(3, "b")
    assert contents(3, "a") != contents(4, "c")




def _record(record_id: str, user: str | None, output: str, profile: list, time=None) -> dict:
    record = {"id": record_id, "input": f"question {record_id}", "output": output, "profile": profile}
    if user is not None:
        record["user_id"] = user
    if time is not None:
        record["time"] = time
    return record


def _lamp_records() -> list[dict]:
    p1 = {"id": "p1", "text": "old review", "date": "2001-01-01"}
    p2 = {"id": "p2", "text": "newer review", "date": "2002-01-01"}
    return [
        _record("r3", "alice", "third", [p1, p2], time=30),
        _record("r1", "alice", "first", [p1], time=10),
        _record("r2", "alice", "second", [p1], time=20),
        _record("b1", "bob", "only", [{"text": "bob's note"}, {"text": "bob's other note"}]),
    ]


@pytest.mark.parametrize("as_lines", [False, True])
def test_lamp_single_file_groups_users_and_latest_are_test(tmp_path, as_lines):
    records_file = tmp_path / ("records.jsonl" if as_lines else "records.json")
    records = _lamp_records()
    text = "".join(json.dumps(r) + "\n" for r in records) if as_lines else json.dumps(records)
    records_file.write_text(text)
    paths = import_lamp_json(tmp_path / "out", records_file, test_fraction=0.34)
    assert [p.name for p in paths] == ["alice", "bob"]
    alice, bob = (UserStore.open(p) for p in paths)
    assert [(s.id, s.split) for s in alice.samples()] == [("r1", "train"), ("r2", "train"), ("r3", "test")]
    assert [h.text for h in alice.history_for(alice.samples("test")[0])] == ["newer review", "old review"]
    assert alice.meta["profile_train_samples"] == 0
    # Bob has no train record: his profile becomes his training data.
    assert bob.meta["profile_train_samples"] == 2
    train, test = bob.samples("train"), bob.samples("test")
    assert [s.y for s in train] == ["bob's note", "bob's other note"]
    assert [h.text for h in bob.history_for(train[1])] == ["bob's note"]
    assert [s.id for s in test] == ["b1"] and test[0].time > train[-1].time
    assert [h.text for h in bob.history_for(test[0])] == ["bob's other note", "bob's note"]


def _write_questions_and_golds(folder: Path, questions: list, golds: list) -> tuple[Path, Path]:
    questions_file, golds_file = folder / "dev_questions.json", folder / "dev_outputs.json"
    questions_file.write_text(json.dumps(questions))
    golds_file.write_text(json.dumps({"task": "LaMP_7", "golds": golds}))
    return questions_file, golds_file


def _lamp_questions() -> tuple[list, list]:
    questions = [
        {"id": "q1", "input": "Paraphrase: a", "profile": [{"id": "t1", "text": "tweet one"}]},
        {"id": "q2", "input": "Paraphrase: b", "profile": [{"id": "t2", "text": "tweet two"}]},
    ]
    golds = [{"id": "q2", "output": "gold b"}, {"id": "q1", "output": "gold a"}]
    return questions, golds


def test_lamp_questions_and_golds_make_one_user_per_question(tmp_path):
    questions_file, golds_file = _write_questions_and_golds(tmp_path, *_lamp_questions())
    paths = import_lamp_json(tmp_path / "out", questions_file, golds_file)
    assert [p.name for p in paths] == ["q1", "q2"]
    store = UserStore.open(paths[1])
    assert store.user_id == "q2" and store.meta["golds_file"] == "dev_outputs.json"
    (test,) = store.samples("test")
    assert (test.x, test.y) == ("Paraphrase: b", "gold b")
    assert [s.y for s in store.samples("train")] == ["tweet two"]
    assert import_lamp_json(tmp_path / "out", questions_file, golds_file) == paths


_GOOD = _lamp_records()


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([*_GOOD[:3], {**_GOOD[3], "output": ""}], "field 'output' is empty"),
        ([*_GOOD[:3], {k: v for k, v in _GOOD[3].items() if k != "output"}], "missing field 'output'"),
        ([*_GOOD[:3], {**_GOOD[3], "input": 7}], "field 'input' must be a string"),
        ([*_GOOD[:3], {**_GOOD[3], "profile": "text"}], "field 'profile' must be a list"),
        ([*_GOOD[:3], {**_GOOD[3], "profile": [{"title": "t"}]}], "profile item 0: missing field 'text'"),
        ([*_GOOD[:3], {**_GOOD[3], "user_id": ["bob"]}], "field 'user_id'"),
        ([*_GOOD[:3], {**_GOOD[3], "time": "yesterday"}], "neither a number, a year nor an ISO date"),
        ([*_GOOD[:3], {**_GOOD[3], "id": "r1"}], "id 'r1' already used"),
        ([*_GOOD[:3], {**_GOOD[3], "profile": [{"id": "n", "text": "a"}, {"id": "n", "text": "b"}]}],
         "profile item 1: id 'n' is used with another text at .*record 3 .*, profile item 0"),
    ],
)
def test_invalid_lamp_record_names_file_and_record_and_writes_nothing(tmp_path, records, message):
    records_file = tmp_path / "records.json"
    records_file.write_text(json.dumps(records))
    out_dir = tmp_path / "out"
    with pytest.raises(DataError, match=message) as caught:
        import_lamp_json(out_dir, records_file)
    assert "records.json, record 3" in str(caught.value)
    assert leftovers(out_dir) == []


def test_truncated_lamp_file_is_rejected_with_line_and_column(tmp_path):
    records_file = tmp_path / "records.json"
    records_file.write_text(json.dumps(_GOOD, indent=1)[:-40])
    with pytest.raises(DataError, match=r"records\.json, line \d+, column \d+: invalid JSON"):
        import_lamp_json(tmp_path / "out", records_file)
    lines_file = tmp_path / "records.jsonl"
    lines_file.write_text("".join(json.dumps(r) + "\n" for r in _GOOD)[:-20])
    with pytest.raises(DataError, match=r"records\.jsonl, line 4, column \d+: invalid JSON"):
        import_lamp_json(tmp_path / "out", lines_file)
    assert leftovers(tmp_path / "out") == []


def test_unreadable_lamp_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"missing\.json: cannot read"):
        import_lamp_json(tmp_path / "out", tmp_path / "missing.json")


@pytest.mark.parametrize("drop", ["question", "gold"])
def test_question_and_gold_must_pair_up(tmp_path, drop):
    questions, golds = _lamp_questions()
    if drop == "question":
        questions = questions[1:]
    else:
        golds = golds[:1]
    questions_file, golds_file = _write_questions_and_golds(tmp_path, questions, golds)
    with pytest.raises(DataError, match="'q1'") as caught:
        import_lamp_json(tmp_path / "out", questions_file, golds_file)
    assert "dev_questions.json" in str(caught.value) and "dev_outputs.json" in str(caught.value)
    assert leftovers(tmp_path / "out") == []


def test_an_error_in_the_last_user_leaves_earlier_users_unwritten(tmp_path):
    records_file = tmp_path / "records.jsonl"
    bad = {**_GOOD[3], "profile": [{"text": ""}]}
    records_file.write_text("".join(json.dumps(r) + "\n" for r in [*_GOOD[:3], bad]))
    with pytest.raises(DataError, match=r"records\.jsonl, line 4 \(record 3\) \(id 'b1'\), profile item 0"):
        import_lamp_json(tmp_path / "out", records_file)
    assert not (tmp_path / "out").exists()


def test_build_users_dispatches_by_dataset_and_names_what_it_needs(tmp_path):
    synthetic = build_users("synthetic", tmp_path / "synthetic", max_users=3, seed=1)
    assert [UserStore.open(p).meta["source"] for p in synthetic] == ["synthetic"] * 3
    assert build_users("synthetic", tmp_path / "synthetic", max_users=3, seed=1) == synthetic  # kept, not rebuilt
    with pytest.raises(ValueError, match="lamp-json needs a records file"):
        build_users("lamp-json", tmp_path / "lamp")
    with pytest.raises(ValueError, match="dataset must be one of"):
        build_users("reddit", tmp_path / "reddit")
    assert not (tmp_path / "lamp").exists() and not (tmp_path / "reddit").exists()


def test_reviewers_mix_content_from_the_input_with_style_words_of_user_specific_taste(tmp_path):
    from simulations.datasets.reviewers import ADJECTIVES, CLOSERS, OPENERS, TICS

    stores = [UserStore.open(p) for p in build_users("reviewers", tmp_path / "r", max_users=4, seed=2)]
    style_words = {w.lower().strip(",.") for phrase in (*OPENERS, *ADJECTIVES, *CLOSERS, *TICS) for w in phrase.split()}
    for store in stores:
        for sample in store.samples():
            marked = [sample.y[s:e] for s, e in sample.preference_spans]
            assert marked and all(w.lower() in style_words for w in marked)
            item = re.search(r"Review the (.+?): it has (.+?) and (.+?), priced at \$(\d+)", sample.x).groups()
            assert all(fact in sample.y for fact in item)  # the content is the input's
    # Each user favours a few adjectives: their own reviews use them far more than others' do.
    def share(store, words):
        used = [sample.y[s:e] for sample in store.samples() for s, e in sample.preference_spans]
        return sum(w in words for w in used) / len(used)

    for store in stores:
        mine = set(store.meta["favourites"]["adjectives"])
        others = [share(other, mine) for other in stores if other is not store]
        assert share(store, mine) > 2 * max(others)
    again = [UserStore.open(p) for p in build_users("reviewers", tmp_path / "again", max_users=4, seed=2)]
    assert [s.samples()[0].y for s in again] == [s.samples()[0].y for s in stores]


def test_chitchat_users_are_real_senders_with_history_from_earlier_conversations_only(tmp_path):
    from shared.user_store import UserStore
    from simulations.datasets import build_users

    paths = build_users("chitchat", tmp_path / "a", max_users=3, seed=1)
    assert len(paths) == 3
    for path in paths:
        store = UserStore.open(path)
        samples = store.samples()
        assert store.samples("train") and store.samples("test")
        assert max(s.time for s in store.samples("train")) <= min(s.time for s in store.samples("test"))
        for sample in samples:
            assert sample.x.startswith("Conversation topic: ") and len(sample.y.split()) >= 4
            # Never a message of the same conversation: a conversation's samples share an id prefix.
            assert all(not h.startswith(sample.id.split("-")[0]) for h in sample.history_ids)
        assert store.history_for(samples[-1])
    # Another seed draws other users; the same seed the same ones.
    again = build_users("chitchat", tmp_path / "b", max_users=3, seed=1)
    other = build_users("chitchat", tmp_path / "c", max_users=3, seed=2)
    assert [p.name for p in again] == [p.name for p in paths] != [p.name for p in other]


def test_chitchat_refuses_more_users_than_it_has(tmp_path):
    from simulations.datasets import build_users

    with pytest.raises(ValueError, match="fewer than the 1000 users"):
        build_users("chitchat", tmp_path, max_users=1000)
    assert not (tmp_path / "chitchat-000").exists()


def test_reviewers_at_full_preference_strength_use_only_their_favourites(tmp_path):
    from shared.metrics import span_words
    from shared.user_store import UserStore
    from simulations.datasets import build_users
    from simulations.datasets.reviewers import non_personal_review, oracle_review

    (path,) = build_users("reviewers", tmp_path, max_users=1, preference_strength=1.0)
    store = UserStore.open(path)
    used = {w for s in store.samples() for w in span_words(s.y, s.preference_spans)}
    tic_words = set(store.meta["tic"].lower().split())
    assert used - tic_words <= {w for words in store.meta["favourites"].values() for word in words
                                for w in span_words(word, [(0, len(word))])}
    sample = store.samples("test")[0]
    assert "$" in non_personal_review(sample.x) and store.meta["tic"] in oracle_review(sample.x, store.meta)
    with pytest.raises(ValueError, match="preference strength"):
        build_users("reviewers", tmp_path / "x", max_users=1, preference_strength=1.5)
    with pytest.raises(ValueError, match="applies to the reviewers"):
        build_users("synthetic", tmp_path / "y", max_users=1, preference_strength=1.0)


@pytest.mark.parametrize(("stamp", "meant"), [
    ("2020", "2020-01-01T00:00:00+00:00"), ("2020-06", "2020-06-01T00:00:00+00:00"),
    ("2020-06-15", "2020-06-15T00:00:00+00:00"), ("2020-06-15T12:30:00Z", "2020-06-15T12:30:00+00:00"),
    ("2020-06-15T12:30:00+02:00", "2020-06-15T10:30:00+00:00"), (2020, "1970-01-01T00:33:40+00:00"),
    ("1592224200", "2020-06-15T12:30:00+00:00"),
])
def test_lamp_times_mean_what_they_say_a_four_digit_string_is_a_year(stamp, meant):
    from datetime import datetime

    from simulations.datasets.lamp import _parse_time

    assert _parse_time(stamp, "here") == datetime.fromisoformat(meant).timestamp()


def test_lamp_profile_times_given_as_years_order_the_history(tmp_path):
    from shared.user_store import UserStore

    profile = [{"id": "late", "text": "late text", "date": "2019"}, {"id": "early", "text": "early text",
                                                                     "date": "1999"}]
    records_file = tmp_path / "records.json"
    records_file.write_text(json.dumps([_record(f"r{k}", "u", f"out {k}", profile, time=k) for k in range(3)]))
    store = UserStore.open(import_lamp_json(tmp_path / "out", records_file)[0])
    assert [h.id for h in store.history()] == ["early", "late"]


def _one_record_users(path: Path, users: int, words: int = 4) -> Path:
    with path.open("w") as handle:
        for i in range(users):
            text = " ".join(f"word{i}-{k}" for k in range(words))
            handle.write(json.dumps({"id": f"r{i}", "user_id": f"user-{i}", "input": f"Write about {i}",
                                     "output": text, "profile": [{"text": f"Old {text}"}]}) + "\n")
    return path


def test_a_killed_import_leaves_whole_stores_only_and_a_rerun_finishes_it(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    # Few stores (a disk deletes files slowly: pytest cleans this folder up later), each large
    # enough that writing them takes seconds, so the kill lands in the middle.
    records = _one_record_users(tmp_path / "records.jsonl", 1500, words=3000)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "simulations.cli", "--data-dir", str(tmp_path / "data"), "users", "lamp-json",
            "--records", str(records), "--out", str(out)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(p.name.startswith("user-") for p in out.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # `kill`: cleaned up as Ctrl-C is
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in err and "Traceback" not in err
    written = list_user_stores(out)
    assert 0 < len(written) < 1500
    assert [p.name for p in out.iterdir() if not p.name.startswith("user-")] == []
    UserStore.open(written[-1])  # the last store written is whole
    # What a SIGKILL would leave staged is removed by the rerun, which writes only what is missing.
    stale = out / ".user-7.0123abcd.partial"
    stale.mkdir()
    (stale / "samples.jsonl").write_text("half")
    before = {p: p.stat().st_mtime_ns for p in written}
    finished = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert len(list_user_stores(out)) == 1500 and not stale.exists()
    assert all(p.stat().st_mtime_ns == before[p] for p in written)


def test_an_import_of_many_users_names_their_stores_in_linear_time(tmp_path):
    from simulations.datasets.plans import _store_names

    ids = [f"user {i}" for i in range(200000)] + ["User 0"]  # one clash of slugs, at the end
    names = _store_names(ids)
    assert len(set(names)) == len(ids) and names[1] == "user-1" and names[0].startswith("user-0-")
