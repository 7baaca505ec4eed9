"""The study: every cell through the real apps (or pooled, for the central reference), results
saved as each cell finishes, a rerun that skips finished cells, and the report."""

import dataclasses
import json

import pytest

from shared.paths import DATA_DIR_ENV
from simulations.study import runner as study_module
from simulations.study.protocol import STUDY_METHODS, StudyConfig
from simulations.study.report import machine
from simulations.study.runner import cells, run_study

METHODS = ("base", "history-prompt", "local", "nextquill-fed", "split-layers", "nextquill-central",
           "nextquill-dropout-expert", "dp-eps-8")


@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory):
    config = StudyConfig(model=str(model_dir), datasets=("reviewers",), methods=METHODS, seeds=(0,), users=2,
                         rounds=2, local_steps=1, batch_size=2, history_tokens=48, context_tokens=24,
                         response_tokens=24, evaluate_every=1, device="cpu")
    out = tmp_path_factory.mktemp("study")
    run_study(config, out, progress=False)
    return config, out


def test_a_row_whose_expert_is_another_row_runs_after_it():
    order = cells(StudyConfig(datasets=("reviewers",), seeds=(0,), methods=("nextquill-dropout-expert", "local")))
    assert [m for _, _, m in order] == ["expert-dropout", "nextquill-dropout-expert", "local"]


def test_the_expert_cell_runs_first_and_only_once_per_dataset_and_seed():
    config = StudyConfig(datasets=("reviewers", "shakespeare"), methods=("nextquill-fed", "fedit-sft"), seeds=(0, 1))
    order = cells(config)
    assert len(order) == 2 * 2 * 3
    for index in range(0, len(order), 3):
        assert [m for _, _, m in order[index:index + 3]] == ["fedit-context-sft", "nextquill-fed", "fedit-sft"]
    assert [(d, s) for d, s, _ in order[::3]] == [("reviewers", 0), ("shakespeare", 0), ("reviewers", 1),
                                                  ("shakespeare", 1)]
    assert cells(StudyConfig(methods=("base", "fedit-sft"), datasets=("reviewers",), seeds=(0,))) == [
        ("reviewers", 0, "base"), ("reviewers", 0, "fedit-sft")]
    # The privacy rows run on the generated users only.
    assert cells(StudyConfig(methods=("dp-eps-1",), datasets=("reviewers", "shakespeare"), seeds=(0,))) == [
        ("reviewers", 0, "fedit-context-sft"), ("reviewers", 0, "dp-eps-1")]


def test_every_cell_is_saved_with_its_metrics_upload_and_rounds(finished):
    _, out = finished
    saved = {p.name.removesuffix(".json"): json.loads(p.read_text())
             for p in (out / "cells" / "reviewers" / "seed-0").glob("*.json")}
    assert set(saved) == {*METHODS, "fedit-context-sft", "expert-dropout", "fedit-context-sft.dce",
                          "expert-dropout.dce", "data.profile"}
    for method in (*METHODS, "fedit-context-sft", "expert-dropout"):
        cell = saved[method]
        assert {"rouge1", "rougeL", "bleu", "meteor", "nll", "history-sensitivity"} <= set(cell["macro"])
        assert len(cell["per_user"]) == 2
        assert cell["machine"] == machine()  # wall times compare only within one machine
    # What travels: nothing for the local baseline, the whole LoRA for FedIT, a part for the splits.
    uploads = {m: saved[m]["upload_bytes_per_client_round"] for m in ("local", "fedit-context-sft",
                                                                         "nextquill-fed", "split-layers")}
    assert uploads["local"] == 0 and 0 < uploads["split-layers"] < uploads["fedit-context-sft"]
    assert saved["nextquill-fed"]["run_config"]["expert.adapter"].endswith("fedit-context-sft/shared_adapter")
    assert saved["nextquill-dropout-expert"]["run_config"]["expert.adapter"].endswith("expert-dropout/shared_adapter")
    assert saved["expert-dropout"]["run_config"]["train.history-dropout"] == 0.5
    assert [r["round"] for r in saved["nextquill-fed"]["per_round"]] == [1, 2]  # evaluated after every round
    assert saved["base"]["run_config"]["federation.rounds"] == 0
    # The untrained prompts differ only in the history: the history-prompt row reads it.
    assert saved["history-prompt"]["run_config"]["train.method"] == "context-sft"
    scores = saved["fedit-context-sft.dce"]
    assert 0.0 <= scores["roc_auc"] <= 1.0 and scores["roc_tpr"][-1] == 1.0
    assert scores["reference"] == "generic" and set(scores["references"]) == {"removed", "placeholder", "generic",
                                                                              "donors"}
    assert all(0.0 <= found["roc_auc"] <= 1.0 for found in scores["references"].values())
    # The devices' generated texts (kept in their stores) are gathered with the style words.
    outputs = saved["nextquill-fed"]["outputs"]
    assert {o["index"] for o in outputs} == {0, 1} and all(o["user_style_words"] for o in outputs)
    profile = saved["data.profile"]
    assert 0.0 <= profile["targets_cut_share"] <= 1.0 and len(profile["headroom"]) == 2
    assert saved["expert-dropout.dce"]["expert"] == "expert-dropout"
    # Central DP at ε = 8 over the two personalization rounds: the accountant's ε, within the target.
    privacy = saved["dp-eps-8"]["privacy"]
    assert privacy["dp"] == "server" and privacy["aggregated_rounds"] == 2 and 7.9 < privacy["epsilon"] <= 8.0
    assert saved["dp-eps-8"]["update_norm_median"] > 0


def test_the_report_holds_the_table_csv_and_plots(finished):
    _, out = finished
    report = (out / "report.md").read_text()
    for method in METHODS:
        assert f"| `{method}` |" in report
    assert "`nextquill-fed` vs `fedit-context-sft`" in report and "ROC AUC" in report
    rows = (out / "cells.csv").read_text().splitlines()
    assert len(rows) == 1 + len(METHODS) + 2  # and the two experts
    assert f"Cells computed on: {machine()}: {len(rows) - 1} cells." in report
    assert rows[0].endswith(",machine")
    assert "expert `expert-dropout`" in report
    assert "### The cost of differential privacy" in report and "| `dp-eps-8` | 8.00 |" in report
    paired = (out / "paired.csv").read_text().splitlines()
    assert paired[0] == "dataset,method,baseline,metric,mean_difference,interval_low,interval_high,users,seeds"
    assert any(",nextquill-fed,history-prompt,rouge1," in row for row in paired)
    assert any(",nextquill-dropout-expert,nextquill-fed,style-f1," in row for row in paired)
    dce = (out / "dce.csv").read_text().splitlines()
    assert dce[0].startswith("dataset,counterfactual,roc_auc,precision,recall") and len(dce) == 1 + 4
    assert "## Paired differences against the fair baselines" in report and "| **reference** |" in report
    for plot in ("paired.png", "rounds-reviewers.png", "ablations-reviewers.png", "quality-vs-upload-reviewers.png",
                 "dce-roc.png", "privacy-reviewers.png"):
        assert (out / plot).stat().st_size > 1000


def test_a_rerun_skips_finished_cells_and_another_protocol_is_refused(finished, monkeypatch):
    config, out = finished

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(study_module, "run_federated_cell", no_training)
    monkeypatch.setattr(study_module, "run_central_cell", no_training)
    run_study(config, out, progress=False)
    with pytest.raises(ValueError, match="other settings \\(rounds\\)"):
        run_study(StudyConfig(**{**config.__dict__, "rounds": 3}), out, progress=False)


def test_a_run_asking_for_fewer_cells_keeps_the_cells_asked_before(finished, monkeypatch):
    # A study larger than one sitting runs in pieces, some of them a subset (`--seeds 2`): the
    # report counts the cells every run into the folder asked for, not the last run's.
    config, out = finished
    monkeypatch.setattr(study_module, "run_federated_cell", lambda *args: pytest.fail("a finished cell ran again"))
    recorded = out / "study.json"
    everything = {tuple(c) for c in json.loads(recorded.read_text())["cells"]}
    assert len(everything) == len(METHODS) + 2  # and the two experts
    subset = dataclasses.replace(config, methods=("base",))
    run_study(subset, out, progress=False)
    assert {tuple(c) for c in json.loads(recorded.read_text())["cells"]} == everything
    assert f"Cells finished: {len(everything)} of {len(everything)}." in (out / "report.md").read_text()
    # A folder from before study.json listed its cells held the last run's datasets, methods and seeds.
    recorded.write_text(json.dumps({**config.protocol(), "datasets": ["reviewers"], "methods": list(METHODS),
                                    "seeds": [0], "digest": "0123456789ab"}))
    run_study(subset, out, progress=False)
    assert {tuple(c) for c in json.loads(recorded.read_text())["cells"]} == everything


def test_every_study_row_is_a_valid_run_config(tmp_path):
    study = StudyConfig(model="tiny")
    for method, row in STUDY_METHODS.items():
        if row.keys.get("sharing.shared-layers") == "half":
            continue  # needs the model's depth (checked in the study run above)
        config = study_module.run_config(study, "reviewers", 0, method, tmp_path / "expert", tmp_path)
        assert config.train.method == row.keys["train.method"]
        assert (config.expert.adapter != "") == config.needs_expert


def test_a_cell_named_like_dce_is_a_cell_and_scores_are_not(tmp_path):
    from simulations.study.report import load_cells

    folder = tmp_path / "cells" / "reviewers" / "seed-0"
    folder.mkdir(parents=True)
    (folder / "dce-only.json").write_text(json.dumps({"method": "dce-only"}))
    (folder / "fedit-context-sft.dce.json").write_text(json.dumps({"roc_auc": 0.6}))
    assert load_cells(tmp_path) == [{"method": "dce-only"}]


def test_a_study_resumed_without_its_run_folders_rebuilds_the_expert_and_keeps_its_cell(finished, tmp_path,
                                                                                        monkeypatch, caplog):
    # As from a fresh clone: the committed cells are there, the data directory is new.
    import shutil

    config, out = finished
    resumed = tmp_path / "study"
    shutil.copytree(out / "cells", resumed / "cells")
    (resumed / "cells" / "reviewers" / "seed-0" / "nextquill-fed.json").unlink()
    expert_cell = resumed / "cells" / "reviewers" / "seed-0" / "fedit-context-sft.json"
    recorded = expert_cell.read_bytes()
    monkeypatch.setenv("NEXTQUILL_HOME", str(tmp_path / "new-home"))
    ran = []
    monkeypatch.setattr(study_module, "run_central_cell", lambda *args: ran.append(args))
    with caplog.at_level("INFO", logger="nextquill.study"):
        run_study(config, resumed, progress=False)
    assert "rebuilding the expert fedit-context-sft" in caplog.text
    assert "scores otherwise" not in caplog.text  # the same seed rebuilds the same expert
    assert expert_cell.read_bytes() == recorded
    assert (resumed / "cells" / "reviewers" / "seed-0" / "nextquill-fed.json").is_file() and not ran
    assert (study_module.work_dir(config) / "runs" / "reviewers" / "seed-0" / "fedit-context-sft"
            / "shared_adapter").is_dir()


def test_our_headline_rows_are_the_run_configs_defaults(tmp_path):
    # The rows pin NextQuill's own settings so their cells keep their meaning; a default changed
    # without them would leave the headline measuring something the product no longer runs.
    from shared.run_config import RunConfig

    defaults = RunConfig().to_flower()
    for method in ("nextquill-fed", "nextquill-fedavg"):
        pinned = {k: v for k, v in STUDY_METHODS[method].keys.items() if k not in ("train.method", "sharing.split")}
        assert pinned == {k: defaults[k] for k in pinned}
        assert {"weights.dce-reference", "train.mce-reference", "weights.weight-low"} <= set(pinned)


def test_each_ablation_and_compute_row_is_paired_with_the_row_it_changes():
    assert STUDY_METHODS["reference-removed"].baseline == "nextquill-fed"
    assert STUDY_METHODS["fedavg-weight-low-0.1"].baseline == "nextquill-fedavg"
    assert STUDY_METHODS["feddpa-bf16-compiled"].baseline == "feddpa"
    assert STUDY_METHODS["base"].baseline is None and STUDY_METHODS["nextquill-fed"].baseline is None
    for name, row in STUDY_METHODS.items():
        if row.baseline:  # the pair differs only in what the row says it changes
            assert row.baseline in STUDY_METHODS and row.baseline != name


@pytest.mark.parametrize(("content", "message"), [
    (None, r"missing\.json: cannot read"),
    (b"\x00\x01\xff\xfe binary", r"bad\.json: cannot read"),
    (b"not json at all\n", r"bad\.json, line 1, column 1: invalid JSON"),
    (b'[{"id": "r1", "input": "x", "profile": []}]', r"bad\.json, record 0 \(id 'r1'\): missing field 'output'"),
])
def test_a_bad_dataset_file_is_refused_by_name_before_anything_is_written(tmp_path, monkeypatch, content, message):
    from shared.user_store import DataError

    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    path = tmp_path / ("missing.json" if content is None else "bad.json")
    if content is not None:
        path.write_bytes(content)
    config = StudyConfig(model="tiny", datasets=(str(path),), methods=("base",), seeds=(0,), users=2)
    with pytest.raises(DataError, match=message):
        run_study(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_dataset_files_are_told_apart_by_content_not_name(tmp_path):
    from simulations.datasets import dataset_name
    from simulations.study.runner import check_datasets

    record = {"id": "r1", "input": "x", "output": "y", "profile": []}
    for folder, text in (("a", "one"), ("b", "two"), ("c", "one")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "good.json").write_text(json.dumps([{**record, "output": text}]))
    a, b, c = (str(tmp_path / folder / "good.json") for folder in "abc")
    assert dataset_name(a) != dataset_name(b) and dataset_name(a).startswith("lamp-good-")
    assert dataset_name(a) == dataset_name(c)  # the same records, wherever they lie
    check_datasets((a, b, "reviewers"))
    with pytest.raises(ValueError, match=r"--datasets .*a/good\.json and .*c/good\.json hold the same records"):
        check_datasets((a, c))


@pytest.mark.parametrize(("argv", "message"), [
    (["--seeds", "0", "0"], "--seeds must not repeat a value, got 0 twice"),
    (["--methods", "base", "base"], "--methods must not repeat a value, got 'base' twice"),
    (["--seeds", "-1"], "must be at least 0"),
    (["--seeds", "99999999999999999999"], "must be at most 2,147,483,647 in size"),
    (["--users", "99999999999999999999"], "must be at most 2,147,483,647 in size"),
    (["--datasets", "reviewers", "reviewers"], "--datasets must not repeat a value, got 'reviewers' twice"),
    (["--datasets", "reviewers", " "], "--datasets holds an empty name"),
    (["--datasets", "data.json", "./data.json"], "--datasets must not repeat a value"),
])
def test_repeated_and_huge_study_options_are_refused_naming_the_flag(tmp_path, capsys, argv, message):
    from simulations.cli import main

    try:
        code = main(["--data-dir", str(tmp_path / "data"), "study", "--out", str(tmp_path / "out"), *argv])
    except SystemExit as stopped:  # refused by argparse, before the command runs
        code = stopped.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_study_and_tuning_write_beside_the_committed_results_by_default():
    import argparse
    from pathlib import Path

    from simulations.study.runner import RESULTS, study_from

    assert Path(__file__).parents[1] / "simulations" / "results" == RESULTS
    assert study_from(argparse.Namespace(quick=False, out=None))[1] == RESULTS / "study-smollm2-135m"
    assert (RESULTS / "study-smollm2-135m" / "study.json").is_file()  # the committed study
