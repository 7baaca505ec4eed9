"""DCE against the expert's budget: each budget measured once, the 0-step expert is the base."""

import dataclasses
import json

import pytest
from safetensors.torch import load_file

from simulations.study.expert_budget import run
from simulations.study.protocol import StudyConfig
from simulations.study.runner import work_dir


def test_each_budget_is_measured_once_and_the_untrained_expert_is_the_base(model_dir, tmp_path):
    study = StudyConfig(model=str(model_dir), users=2, batch_size=2, history_tokens=48, context_tokens=24,
                        response_tokens=24, device="cpu")
    out = tmp_path / "budget"
    report = run(study, [0, 2], seed=0, out=out, progress=False)
    rows = {row["steps"]: row for row in (json.loads(p.read_text()) for p in out.glob("steps-*.json"))}
    assert set(rows) == {0, 2}
    for row in rows.values():
        assert 0.0 <= row["roc_auc"] <= 1.0 and 0.0 <= row["roc_auc_span_start"] <= 1.0
        assert 0 < row["preference_spans"] <= row["preference_tokens"] < row["tokens"]
    untrained = load_file(work_dir(study) / "experts" / "seed-0" / "steps-0" / "adapter_model.safetensors")
    assert all(not tensor.any() for name, tensor in untrained.items() if "lora_B" in name)  # B = 0: the base
    assert rows[0]["mean_dce"] != rows[2]["mean_dce"]

    written = {p.name: p.stat().st_mtime_ns for p in out.glob("steps-*.json")}
    report = run(study, [0, 2], seed=0, out=out, history_dropout=0.5, progress=False)
    again = {p.name: p.stat().st_mtime_ns for p in out.glob("steps-*.json")}
    assert again.keys() - written.keys() == {"steps-2-dropout-0.5-seed-0.json"}  # 0 steps: the same expert
    assert {name: again[name] for name in written} == written  # measured once
    text = report.read_text()
    for row in ("| 0 | 0 | 0 |", "| 2 | 0 | 0 |", "| 2 | 0.5 | 0 |"):
        assert row in text
    assert (out / "auc-vs-steps.png").stat().st_size > 0
    with pytest.raises(ValueError, match="other settings \\(history_tokens\\)"):
        run(dataclasses.replace(study, history_tokens=64), [0], seed=0, out=out, progress=False)
