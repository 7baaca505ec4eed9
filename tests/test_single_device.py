"""The single-device comparison: one run directory with its table, CSV, JSON and plot."""

from shared.config import BaseSpec, TrainConfig
from simulations.study.compare import run_compare
from simulations.study.compare_config import CompareConfig
from tests.samples import DEVICE_PROMPT, ONE_STEP


def test_compare_writes_the_run_directory(model_dir, user_stores, tmp_path):
    config = CompareConfig(base=BaseSpec(str(model_dir)), users=1, expert_users=2, prompt=DEVICE_PROMPT,
                           methods=("sft", "nextquill"), train=TrainConfig(**ONE_STEP))
    result = run_compare(user_stores, config, tmp_path / "run")
    assert set(result["summary"]) == {"base", "sft", "nextquill"}
    for name in ("config.json", "per_user.csv", "results.json", "summary.md", "summary.png"):
        assert (tmp_path / "run" / name).is_file()
    assert (tmp_path / "run" / "per_user.csv").read_text().count("\n") == 1 + 3
