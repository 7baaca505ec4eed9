"""Settings check themselves, naming the setting: NaN, ranges, choices, patterns."""

import math

import pytest

from shared.config import BaseSpec, TrainConfig, WeightScheme
from shared.settings import SettingError, check_settings, setting, value_problem


@pytest.mark.parametrize(
    ("value", "rules", "problem"),
    [
        (math.nan, {}, "must be a finite number, got nan"),
        (math.inf, {"minimum": 0}, "must be a finite number, got inf"),
        (-1, {"minimum": 0}, "must be at least 0, got -1"),
        (0.0, {"above": 0.0}, "must be greater than 0.0, got 0.0"),
        (1.5, {"maximum": 1.0}, "must be at most 1.0, got 1.5"),
        ("rlhf", {"choices": ("sft", "nextquill")}, "must be one of ['sft', 'nextquill'], got 'rlhf'"),
        ("foo", {"pattern": "cpu|cuda", "pattern_help": "cpu or cuda"}, "must be cpu or cuda, got 'foo'"),
    ],
)
def test_a_value_outside_its_rules_is_explained(value, rules, problem):
    assert value_problem(value, rules) == problem


def test_values_inside_their_rules_pass():
    assert value_problem(0.0, {"minimum": 0.0, "maximum": 1.0}) is None
    assert value_problem(None, {"minimum": 1}) is None  # an optional setting left unset
    assert value_problem(True, {"minimum": 5}) is None  # booleans are not numbers here


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TrainConfig(alpha=math.nan), "alpha must be a finite number, got nan"),
        (lambda: TrainConfig(max_steps=0), "max_steps must be at least 1, got 0"),
        (lambda: TrainConfig(max_steps=-1), "max_steps must be at least 1, got -1"),
        (lambda: TrainConfig(learning_rate=math.nan), "learning_rate must be a finite number"),
        (lambda: WeightScheme(delta=1.5), "delta must be at most 1.0, got 1.5"),
        (lambda: WeightScheme(delta=-1.5), "delta must be at least -1.0, got -1.5"),
        (lambda: WeightScheme(weight_high=1.2), "weight_high must be at most 1.0, got 1.2"),
        (lambda: WeightScheme(weight_low=0.95), "weight_low (ε) = 0.95 must not exceed weight-high (λ) = 0.9"),
        (lambda: BaseSpec(device="foo"), "device must be auto, cpu, cuda or cuda:N, got 'foo'"),
    ],
)
def test_config_objects_refuse_bad_values_by_name(make, message):
    with pytest.raises(SettingError) as error:
        make()
    assert message in str(error.value)


def test_check_settings_names_the_setting_as_its_user_wrote_it():
    from dataclasses import dataclass

    @dataclass
    class Example:
        learning_rate: float = setting(0.1, "a rate", above=0.0)

    with pytest.raises(SettingError, match="^--learning-rate must be greater than 0.0, got -1.0$"):
        check_settings(Example(-1.0), label=lambda name: "--" + name.replace("_", "-"))
