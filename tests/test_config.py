"""Flower run config -> one typed object of setting groups; mistakes are named by their key."""

import dataclasses
import json

import pytest

from shared.config import BaseSpec, FederationSettings, PromptConfig, TrainConfig
from shared.run_config import GROUPS, LEGACY_KEYS, RunConfig, run_config_keys, upgrade_keys
from shared.settings import SettingError


def test_grouped_keys_round_trip_into_the_group_objects():
    values = {"federation.clients-per-round": 2, "train.learning-rate": 1e-3, "sharing.split": "a-shared",
              "train.method": "dce-only", "weights.delta": 0.2, "lora.r": 4, "dp.clip": 0.5}
    config = RunConfig.from_flower(values)
    assert (config.federation.clients_per_round, config.train.learning_rate, config.sharing.split) == (2, 1e-3,
                                                                                                      "a-shared")
    assert (config.weights.delta, config.lora.lora_r, config.dp.dp_clip) == (0.2, 4, 0.5)
    assert config.weights is config.train.weight_scheme  # the weights group is the train group's scheme
    assert RunConfig.from_flower(config.to_flower()) == config
    assert RunConfig.from_flower({"train.learning-rate": 1}).train.learning_rate == 1.0


def test_every_key_names_its_group_and_every_group_field_has_one_key():
    keys = run_config_keys()
    assert all(key.split(".")[0] in GROUPS and key.count(".") == 1 for key in keys)
    assert "lora.r" in keys and "dp.clip" in keys and "lora.lora-r" not in keys  # the group's name is not repeated
    # a field the run config does not carry is said so where it is declared (in_run_config=False)
    assert {"train.epochs", "train.max-steps", "train.seed", "lora.target-modules"}.isdisjoint(keys)


def test_one_set_of_defaults_for_the_main_job_the_command_line_and_the_groups():
    config = RunConfig()
    assert config.base == BaseSpec() and BaseSpec().model == "smollm2-135m"  # the command line's default base
    assert config.prompt == PromptConfig() == PromptConfig(96, 32, 32)
    assert config.train == TrainConfig() and TrainConfig().batch_size == 4
    assert config.federation == FederationSettings()


def test_the_app_defaults_in_pyproject_are_valid_and_complete():
    import tomllib
    from pathlib import Path

    from flwr.common.config import flatten_dict

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    values = flatten_dict(tomllib.loads(text)["tool"]["flwr"]["app"]["config"])  # as Flower reads it
    assert set(values) == set(RunConfig().to_flower())
    # One source of each default: the app's run config is the dataclasses'.
    assert RunConfig.from_flower(values) == RunConfig()
    # ... and of each key's help: the table is the one generated from the fields.
    table = text.split("[tool.flwr.app.config]\n", 1)[1].split("\n[", 1)[0]
    assert table == RunConfig.flower_toml(), "regenerate the table with `nextquill run-config`"


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"num-user": 3}, "unknown run config keys ['num-user']"),
        ({"learning-rate": 0.1}, "unknown run config keys ['learning-rate'] (the keys are grouped now: "
                                 "{'learning-rate': 'train.learning-rate'})"),
        ({"federation.rounds": "3"}, "run config federation.rounds must be int"),
        ({"federation.rounds": True}, "run config federation.rounds must be int"),
        ({"train.learning-rate": "fast"}, "run config train.learning-rate must be float"),
        ({"federation.min-replies": 5, "federation.clients-per-round": 3},
         "run config federation.min-replies (5) exceeds clients-per-round (3)"),
        ({"federation.local-steps": 0}, "run config federation.local-steps must be at least 1"),
        ({"train.method": "rlhf"}, "run config train.method must be one of"),
        ({"sharing.split": "layers"}, "run config sharing.shared-layers does not fit split 'layers'"),
        ({"prompt.history-tokens": 0}, "run config prompt.history-tokens must be at least 1"),
        ({"train.alpha": float("nan")}, "run config train.alpha must be a finite number, got nan"),
        ({"train.learning-rate": float("nan")}, "run config train.learning-rate must be a finite number"),
        ({"train.learning-rate": float("inf")}, "run config train.learning-rate must be a finite number"),
        ({"train.alpha": -0.5}, "run config train.alpha must be at least 0.0"),
        ({"base.device": "foo"}, "run config base.device must be auto, cpu, cuda or cuda:N, got 'foo'"),
        ({"federation.round-timeout": 0}, "run config federation.round-timeout must be greater than 0.0"),
        ({"federation.connect-timeout": -1}, "run config federation.connect-timeout must be greater than 0.0"),
        ({"weights.weight-low": 0.95}, "run config weights.weight-low (ε) = 0.95 must not exceed weight-high"),
        ({"dp.mode": "local", "dp.noise": 0.0}, "run config dp.noise must be above 0 with local DP"),
        ({"users.preference-strength": 0.5, "users.dataset": "chitchat"},
         "run config users.preference-strength applies to dataset 'reviewers'"),
        ({"train.fused-loss": True, "train.paired-pass": True}, "run config train.fused-loss does not combine"),
        ({"secagg.enabled": True, "dp.mode": "server"}, "run config secagg.enabled cannot go with dp.mode"),
        ({"train.method": "nextquill", "expert.rounds": 0}, "run config train.method 'nextquill'"),
    ],
)
def test_unknown_or_invalid_values_are_rejected_by_their_key(values, complaint):
    with pytest.raises(ValueError) as error:
        RunConfig.from_flower(values)
    assert complaint in str(error.value)


def test_history_dropout_of_the_expert_phase_and_of_a_one_pass_method_are_two_settings():
    config = RunConfig.from_flower({"train.method": "nextquill", "expert.rounds": 2, "expert.history-dropout": 0.5})
    assert config.train_config("context-sft", seed=1).history_dropout == 0.5  # the expert phase
    assert config.train_config("nextquill", seed=1).history_dropout == 0.0
    plain = RunConfig.from_flower({"train.method": "context-sft", "train.history-dropout": 0.25})
    assert plain.train_config("context-sft", seed=1).history_dropout == 0.25
    with pytest.raises(ValueError, match="run config train.history-dropout applies to a method that reads"):
        RunConfig.from_flower({"train.method": "nextquill", "train.history-dropout": 0.5})
    with pytest.raises(ValueError, match="run config expert.history-dropout applies to the expert phase"):
        RunConfig.from_flower({"train.method": "nextquill", "expert.adapter": "experts/e",
                               "expert.history-dropout": 0.5})


def test_a_flat_run_config_of_an_earlier_version_reads_in_todays_keys(tmp_path):
    """A run directory written before the keys were grouped resumes: its config.json, in flat
    keys, upgrades to the config a rerun gives today."""
    today = RunConfig.from_flower({"train.method": "nextquill", "expert.rounds": 2, "expert.history-dropout": 0.5,
                                   "federation.run-dir": "runs/x", "dp.mode": "server", "lora.r": 4})
    flat = {old: today.to_flower()[new] for old, new in LEGACY_KEYS.items()}
    flat["history-dropout"] = 0.5  # one key then, for the expert phase and a one-pass method alike
    upgraded = upgrade_keys(flat)
    assert {key: value for key, value in upgraded.items() if key in today.to_flower()} == {
        key: value for key, value in today.to_flower().items() if key in upgraded}
    assert set(today.to_flower()) - set(upgraded) == {"lora.dropout", "prompt.use-chat-template"}  # added since
    assert upgrade_keys(today.to_flower()) == today.to_flower()  # grouped keys stay as they are
    assert set(LEGACY_KEYS.values()) <= set(run_config_keys())


def test_a_flat_run_directory_resumes_and_a_changed_one_is_named_in_todays_keys(tmp_path):
    from coordinator.run_directory import CONFIG_FILE, check_run_config

    config = RunConfig.from_flower({"federation.run-dir": str(tmp_path), "train.method": "sft"})
    flat = {old: config.to_flower()[new] for old, new in LEGACY_KEYS.items()} | {"history-dropout": 0.0}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(flat))
    check_run_config(tmp_path, config.to_flower(), RunConfig().to_flower())  # resumes: no error
    changed = dataclasses.replace(config, train=dataclasses.replace(config.train, learning_rate=0.1))
    with pytest.raises(ValueError, match=r"\(train.learning-rate differ\)"):
        check_run_config(tmp_path, changed.to_flower(), RunConfig().to_flower())


@pytest.mark.parametrize("run_dir", ["", "  ", ".", "..", "../elsewhere", "runs/../..", "runs/../../x"])
def test_a_run_directory_stays_inside_the_data_directory(run_dir):
    with pytest.raises(SettingError, match="run config federation.run-dir .* is the data directory itself or leads "
                                           "out of it"):
        RunConfig.from_flower({"federation.run-dir": run_dir})


@pytest.mark.parametrize("run_dir", ["runs/x", "runs/../other", "/tmp/elsewhere/run"])
def test_a_run_directory_under_the_data_directory_or_absolute_is_taken(run_dir):
    assert RunConfig.from_flower({"federation.run-dir": run_dir}).federation.run_dir == run_dir
