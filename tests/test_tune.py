"""Choosing NextQuill's settings on a validation split (simulations/study/tune.py): the grid, the
validation copies of the users (no test sample in them), the choice and the report, and one
tuning through the real apps."""

import json
from pathlib import Path

import pytest

from shared.user_store import HistoryItem, Sample, UserStore, write_user_store
from simulations.study.protocol import StudyConfig
from simulations.study.tune import (
    Tuning,
    candidate_name,
    choice,
    parse_grid,
    run_tuning,
    summarize,
    write_report,
    write_validation_users,
)


def test_the_grid_is_every_combination_in_the_keys_types():
    grid = parse_grid(["weights.dce-reference=removed,generic", "weights.weight-low=0.1,0.5"])
    assert grid == [{"weights.dce-reference": "removed", "weights.weight-low": 0.1},
                    {"weights.dce-reference": "removed", "weights.weight-low": 0.5},
                    {"weights.dce-reference": "generic", "weights.weight-low": 0.1},
                    {"weights.dce-reference": "generic", "weights.weight-low": 0.5}]
    assert candidate_name(grid[1]) == "dce-reference-removed_weight-low-0.5"


@pytest.mark.parametrize(("spec", "message"), [
    (["learning-rate=0.1"], "not one of NextQuill's own settings"),
    (["weights.weight-low"], "expected key=value"),
    (["weights.weight-low=x"], "'x' is not a float"),
    (["weights.delta=inf"], "not a finite number"),
    (["train.alpha=0.1", "train.alpha=0.2"], "names a key twice"),
])
def test_a_bad_grid_is_refused_by_name(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(spec)


def _store(path, user="u1", train=5, test=2):
    history = [HistoryItem(f"h{i}", float(i), f"past text {i}") for i in range(train + test)]
    samples = [Sample(f"s{i}", float(i) + 0.5, f"input {i}", f"target {i}", "train" if i < train else "test",
                      tuple(h.id for h in history[: i + 1]))
               for i in range(train + test)]
    return write_user_store(path, user, "synthetic", samples, history, {"favourites": ["sleek"]})


def test_the_validation_copy_holds_out_the_latest_training_samples_and_no_test_sample(tmp_path):
    source = _store(tmp_path / "users" / "u1").path
    [copy] = write_validation_users([source], tmp_path / "validation", held_out=2)
    store = UserStore.open(copy)
    assert [s.id for s in store.samples("train")] == ["s0", "s1", "s2"]
    assert [s.id for s in store.samples("test")] == ["s3", "s4"]  # the original test samples s5, s6 are gone
    assert store.meta["favourites"] == ["sleek"] and store.meta["validation_of"] == {"user_id": "u1", "held_out": 2}
    assert UserStore.open(source).samples("test")[0].id == "s5"  # the source is untouched
    # A rerun keeps the copy; another hold-out, or a folder that is not a copy, is refused.
    assert write_validation_users([source], tmp_path / "validation", held_out=2) == [copy]
    with pytest.raises(FileExistsError, match="not a validation copy"):
        write_validation_users([source], tmp_path / "validation", held_out=3)
    (tmp_path / "other" / "u1").mkdir(parents=True)
    (tmp_path / "other" / "u1" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a validation copy"):
        write_validation_users([source], tmp_path / "other", held_out=2)
    assert (tmp_path / "other" / "u1" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="too few to hold out 5"):
        write_validation_users([source], tmp_path / "more", held_out=5)


def _cell(method, name, keys, rouge1, nll=1.0):
    return {"dataset": "reviewers", "seed": 0, "method": method, "name": name, "keys": keys, "held_out": 4,
            "per_user": [{"node_id": 1000.0 + i, "rouge1": r, "nll": nll} for i, r in enumerate(rouge1)]}


def test_the_choice_is_the_best_deployable_candidate_paired_with_the_baseline(tmp_path):
    folder = tmp_path / "reviewers" / "seed-0"
    folder.mkdir(parents=True)
    cells = [_cell("feddpa", "feddpa", {}, [0.5, 0.5, 0.5]),
             _cell("nextquill-fed", "nextquill-fed_weight-low-0.1", {"weights.weight-low": 0.1}, [0.4, 0.45, 0.42]),
             _cell("nextquill-fed", "nextquill-fed_weight-low-0.5", {"weights.weight-low": 0.5}, [0.55, 0.56, 0.57]),
             _cell("nextquill-fed", "nextquill-fed_dce-reference-donors", {"weights.dce-reference": "donors"},
                   [0.9, 0.9, 0.9])]
    for cell in cells:
        (folder / f"{cell['name']}.json").write_text(json.dumps(cell))
    rows = {r["candidate"]: r for r in summarize(tmp_path)}
    assert set(rows) == {"weight-low-0.1", "weight-low-0.5", "dce-reference-donors"}
    assert not rows["dce-reference-donors"]["deployable"]
    mean, low, high = rows["weight-low-0.5"]["vs_baseline"]
    assert mean == pytest.approx(0.06) and 0 < low <= high
    assert choice(list(rows.values()))["candidate"] == "weight-low-0.5"  # donors scores higher, but is not deployable
    report = write_report(tmp_path).read_text()
    assert "`weight-low-0.5` (chosen)" in report and "`dce-reference-donors` (simulation only)" in report
    assert "interval against `feddpa` is above zero" in report
    lines = (tmp_path / "tune.csv").read_text().splitlines()
    assert lines[0].startswith("dataset,seed,candidate,deployable,rouge1") and len(lines) == 4
    assert (tmp_path / "tune.png").stat().st_size > 0
    assert choice([]) is None


def test_a_tuning_runs_the_expert_the_baseline_and_each_candidate_on_validation_users(model_dir, tmp_path):
    study = StudyConfig(model=str(model_dir), datasets=("reviewers",), seeds=(0,), users=2, rounds=1, local_steps=1,
                        batch_size=2, history_tokens=48, context_tokens=24, response_tokens=24, device="cpu")
    tuning = Tuning(study, "reviewers", 0, held_out=2, out=tmp_path / "tune")
    report = run_tuning(tuning, parse_grid(["weights.weight-low=0.5"]), progress=False)
    saved = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "tune" / "reviewers" / "seed-0").glob("*.json")}
    assert set(saved) == {"fedit-context-sft", "feddpa", "nextquill-fed_weight-low-0.5"}
    candidate = saved["nextquill-fed_weight-low-0.5"]
    assert candidate["run_config"]["weights.weight-low"] == 0.5
    assert candidate["run_config"]["expert.adapter"].endswith("fedit-context-sft/shared_adapter")
    # Scored on the held-out training samples of the validation copies, never on a test sample.
    users = candidate["run_config"]["users.dir"]
    evaluated = {o["sample_id"] for o in candidate["outputs"]}
    validation = {s.id for path in sorted(Path(users).iterdir())
                  for s in UserStore.open(path).samples("test")}
    assert evaluated and evaluated <= validation
    assert "(chosen)" in report.read_text()
    # A rerun runs nothing again.
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tune" / "reviewers" / "seed-0").glob("*.json")}
    run_tuning(tuning, parse_grid(["weights.weight-low=0.5"]), progress=False)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tune" / "reviewers" / "seed-0").glob("*.json")}
