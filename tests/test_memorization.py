"""The canary's exposure (simulations/study/memorization.py): ranking, insertion into a store, and a
whole cell through the real apps, resumed from its saved result."""

import dataclasses
import math

import pytest

from shared.user_store import UserStore
from simulations.study.memorization import exposure, insert_canary, memorization_table, run_memorization
from simulations.study.protocol import StudyConfig
from simulations.study.runner import work_dir
from tests.samples import tiny_store


def test_exposure_is_the_log_rank_of_the_canary_among_the_candidates():
    assert exposure(1.0, [2.0, 3.0, 4.0]) == (2.0, 1)  # the most likely of four: log2(4) - log2(1)
    assert exposure(5.0, [2.0, 3.0, 4.0]) == (0.0, 4)  # the least likely
    assert exposure(3.0, [2.0, 3.0, 4.0])[1] == 3  # a tie counts against the canary


def test_the_canary_joins_the_users_training_targets_and_nothing_else_changes(tmp_path):
    store = tiny_store(tmp_path / "u")
    changed = insert_canary(store, "my locker code is 123456", insertions=3)
    again = UserStore.open(tmp_path / "u")
    canaries = [s for s in again.samples("train") if s.id.startswith("canary-")]
    assert len(canaries) == 3 and {s.y for s in canaries} == {"my locker code is 123456"}
    assert {s.x for s in canaries} <= {s.x for s in store.samples("train")}
    assert [s for s in again.samples() if not s.id.startswith("canary-")] == store.samples()
    assert again.history() == store.history() and changed.meta["note"] == "x"


def test_a_cell_reports_the_canarys_exposure_under_the_shared_and_the_personalized_model(model_dir, tmp_path):
    study = StudyConfig(model=str(model_dir), datasets=("reviewers",), seeds=(0,), users=2, rounds=1, local_steps=1,
                        batch_size=2, history_tokens=48, context_tokens=24, response_tokens=24, device="cpu")
    rows = run_memorization(study, tmp_path / "memorization", ("nextquill-fed",), insertions=2, candidates=15)
    (row,) = rows
    for model in ("shared", "personal"):
        assert 1 <= row[model]["rank"] <= 16 and 0.0 <= row[model]["exposure_bits"] <= math.log2(16)
        assert math.isfinite(row[model]["canary_nll"])
    table = (tmp_path / "memorization" / "memorization.md").read_text()
    assert "| `nextquill-fed` | 1 × 1 × 2, 0.0003 | 2 | 0 | ∞ |" in table
    # The cell is named by its protocol: a larger budget (a positive control) is another cell.
    assert (tmp_path / "memorization" / "cells" / f"nextquill-fed-seed-0-2x15-{work_dir(study).name}.json").is_file()
    assert work_dir(dataclasses.replace(study, local_steps=8)) != work_dir(study)
    # A rerun reads the finished cell instead of training again.
    assert run_memorization(study, tmp_path / "memorization", ("nextquill-fed",), insertions=2,
                            candidates=15) == rows
    assert [line for line in memorization_table(rows).splitlines() if line.startswith("| `")] == [
        line for line in (tmp_path / "memorization" / "memorization.md").read_text().splitlines()
        if line.startswith("| `nextquill-fed` | 1 × 1 × 2, 0.0003 | 2 | 0 |")]


@pytest.mark.parametrize("argv", [["--candidates", "0"], ["--insertions", "-1"]])
def test_bad_counts_are_refused_in_one_line(argv, capsys, tmp_path):
    from simulations.study.memorization import main

    try:
        code = main([*argv, "--out", str(tmp_path / "m")])
    except SystemExit as stopped:  # refused by argparse, naming the flag
        code = stopped.code
    assert code == 2
    assert "at least 1" in capsys.readouterr().err and not (tmp_path / "m").exists()
