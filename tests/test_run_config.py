"""Flower run config -> one typed object; mistakes are named."""

import pytest

from shared.run_config import RunConfig


def test_kebab_case_flower_config_round_trips():
    config = RunConfig(num_users=5, clients_per_round=2, learning_rate=1e-3, split="a-shared")
    assert RunConfig.from_flower(config.to_flower()) == config
    assert RunConfig.from_flower({"learning-rate": 1}).learning_rate == 1.0


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"num-user": 3}, "unknown run config keys ['num-user']"),
        ({"rounds": "3"}, "rounds must be int"),
        ({"rounds": True}, "rounds must be int"),
        ({"learning-rate": "fast"}, "learning-rate must be float"),
        ({"num-users": 2, "clients-per-round": 3}, "exceeds num-users"),
        ({"local-steps": 0}, "local-steps must be at least 1"),
    ],
)
def test_unknown_or_invalid_values_are_rejected_by_name(values, complaint):
    with pytest.raises(ValueError) as error:
        RunConfig.from_flower(values)
    assert complaint in str(error.value)
