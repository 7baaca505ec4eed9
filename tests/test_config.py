"""Flower run config -> one typed object; mistakes are named."""

import pytest

from shared.config import RunConfig


def test_kebab_case_flower_config_round_trips():
    config = RunConfig(clients_per_round=2, learning_rate=1e-3, split="a-shared", method="dce-only")
    assert RunConfig.from_flower(config.to_flower()) == config
    assert RunConfig.from_flower({"learning-rate": 1}).learning_rate == 1.0


def test_the_app_defaults_in_pyproject_are_valid_and_complete():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    values = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(values) == set(RunConfig().to_flower())
    # One source of each default: the app's run config is the dataclass's.
    assert RunConfig.from_flower(values) == RunConfig()
    # ... and of each key's help: the table is the one generated from the fields.
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    table = text.split("[tool.flwr.app.config]\n", 1)[1].split("\n[", 1)[0]
    assert table == RunConfig.flower_toml(), "regenerate the table with `nextquill run-config`"


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"num-user": 3}, "unknown run config keys ['num-user']"),
        ({"rounds": "3"}, "rounds must be int"),
        ({"rounds": True}, "rounds must be int"),
        ({"learning-rate": "fast"}, "learning-rate must be float"),
        ({"min-replies": 5, "clients-per-round": 3}, "exceeds clients-per-round"),
        ({"local-steps": 0}, "local-steps must be at least 1"),
        ({"method": "rlhf"}, "method must be one of"),
        ({"split": "layers"}, "split 'layers' needs shared_layers"),
        ({"history-tokens": 0}, "run config history-tokens must be at least 1"),
        ({"alpha": float("nan")}, "run config alpha must be a finite number, got nan"),
        ({"learning-rate": float("nan")}, "run config learning-rate must be a finite number"),
        ({"learning-rate": float("inf")}, "run config learning-rate must be a finite number"),
        ({"alpha": -0.5}, "run config alpha must be at least 0.0"),
        ({"device": "foo"}, "run config device must be auto, cpu, cuda or cuda:N, got 'foo'"),
        ({"round-timeout": 0}, "run config round-timeout must be greater than 0.0"),
        ({"connect-timeout": -1}, "run config connect-timeout must be greater than 0.0"),
    ],
)
def test_unknown_or_invalid_values_are_rejected_by_name(values, complaint):
    with pytest.raises(ValueError) as error:
        RunConfig.from_flower(values)
    assert complaint in str(error.value)


def test_history_dropout_reaches_the_contextsft_training_only():
    config = RunConfig.from_flower({"method": "nextquill", "expert-rounds": 2, "history-dropout": 0.5})
    assert config.train_config("context-sft", seed=1).history_dropout == 0.5  # the expert phase
    assert config.train_config("nextquill", seed=1).history_dropout == 0.0
    with pytest.raises(ValueError, match="history-dropout"):
        RunConfig.from_flower({"method": "nextquill", "expert-rounds": 0, "expert": "experts/e",
                               "history-dropout": 0.5})


@pytest.mark.parametrize("run_dir", ["", "  ", ".", "..", "../elsewhere", "runs/../..", "runs/../../x"])
def test_a_run_directory_stays_inside_the_data_directory(run_dir):
    from shared.settings import SettingError

    with pytest.raises(SettingError, match="run config run-dir .* is the data directory itself or leads out of it"):
        RunConfig.from_flower({"run-dir": run_dir})


@pytest.mark.parametrize("run_dir", ["runs/x", "runs/../other", "/tmp/elsewhere/run"])
def test_a_run_directory_under_the_data_directory_or_absolute_is_taken(run_dir):
    assert RunConfig.from_flower({"run-dir": run_dir}).run_dir == run_dir
