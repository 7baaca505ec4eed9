"""Differential privacy with Flower's own pieces: ε comes from the RDP accountant (the same
number Flower's accountant composes), a target ε calibrates the noise, the device's mods clip
(and with local DP noise) what leaves it, and a federated run with DP reports the ε it spent,
counted once per released round across a restart."""

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import app as client_app
from client.failures import FAILURE_CODES
from client.privacy import device_privacy
from coordinator.checkpoint import load_checkpoint
from coordinator.federation import run_federation
from coordinator.strategy import SampledFedAvg, ScreenedReplies
from shared.privacy import epsilon_of, local_release_epsilon, noise_for_epsilon
from shared.run_config import RunConfig
from shared.settings import SettingError
from simulations.datasets import build_synthetic_users
from tests.loopback import CoordinatorCrash, LoopbackGrid
from tests.samples import small_run

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _flower_epsilon(sigma: float, releases: int, delta: float) -> float:
    config = PrivacyConfig(delta, 10, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION)
    accountant = RdpAccountant(config)
    accountant.compose(GaussianPrivacyEvent(sigma, 2, 10), releases)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("sigma", "releases"), [(0.7, 1), (1.0, 3), (4.0, 20)])
def test_epsilon_is_the_one_flowers_accountant_composes(sigma, releases):
    assert epsilon_of(sigma, releases, 1e-5) == pytest.approx(_flower_epsilon(sigma, releases, 1e-5), rel=1e-9)


@pytest.mark.parametrize("target", [8.0, 4.0, 1.0])
def test_the_noise_calibrated_to_a_target_epsilon_meets_it_closely(target):
    sigma = noise_for_epsilon(target, 3, 1e-5)
    assert target * 0.99 <= epsilon_of(sigma, 3, 1e-5) <= target
    assert noise_for_epsilon(target, 30, 1e-5) > sigma  # more rounds need more noise for the same ε


def test_no_noise_gives_no_finite_epsilon():
    assert epsilon_of(0.0, 3, 1e-5) == math.inf


def test_local_dp_with_no_noise_and_no_target_is_refused_naming_the_key():
    with pytest.raises(SettingError, match="run config dp.noise must be above 0 with local DP"):
        RunConfig.from_flower({"dp.mode": "local", "dp.noise": 0.0})
    with pytest.raises(SettingError, match="run config dp.mode must be one of"):
        RunConfig.from_flower({"dp.mode": "central"})


def _train_message(config: dict | None = None) -> Message:
    sent = ArrayRecord({"w": Array(np.zeros(4000, np.float32))})
    return Message(RecordDict({"arrays": sent, "config": ConfigRecord(config or {"phase": "personalize"})}),
                   message_type=MessageType.TRAIN, dst_node_id=1)


def _trains_by(update: float):
    def call_next(msg: Message, _context: Context) -> Message:
        moved = ArrayRecord({"w": Array(np.full(4000, update, np.float32))})
        return Message(RecordDict({"arrays": moved, "metrics": MetricRecord({"num-examples": 4})}), reply_to=msg)

    return call_next


def _context(**run_config) -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                   run_config={**RunConfig().to_flower(), **run_config})


def test_local_dp_clips_the_update_and_adds_noise_of_sigma_times_the_clip_on_the_device():
    reply = device_privacy(_train_message(), _context(**{"dp.mode": "local", "dp.clip": 0.5, "dp.noise": 0.8}),
                           _trains_by(1.0))
    sent_up = reply.content["arrays"]["w"].numpy()
    # An update of norm 63 clipped to norm 0.5: each entry 0.5 / sqrt(4000); then noise of std 0.8 × 0.5.
    assert sent_up.mean() == pytest.approx(0.5 / math.sqrt(4000), abs=0.03)
    assert sent_up.std() == pytest.approx(0.8 * 0.5, rel=0.05)
    # Flower's mod gets sensitivity 2 × clip (any two clipped updates) and the ε that gives that std.
    assert local_release_epsilon(0.8, 1e-5) == pytest.approx(2 * math.sqrt(2 * math.log(1.25e5)) / 0.8)


def test_client_side_dp_clips_to_the_norm_the_coordinator_sends():
    message = _train_message({"phase": "personalize", "clipping_norm": 2.0})
    reply = device_privacy(message, _context(**{"dp.mode": "client"}), _trains_by(1.0))
    assert np.linalg.norm(reply.content["arrays"]["w"].numpy()) == pytest.approx(2.0, rel=1e-5)
    untouched = device_privacy(message, _context(**{"dp.mode": "off"}), _trains_by(1.0))
    assert np.linalg.norm(untouched.content["arrays"]["w"].numpy()) == pytest.approx(math.sqrt(4000), rel=1e-5)


def test_a_run_config_the_mod_cannot_read_replies_with_a_fixed_category_only():
    reply = device_privacy(_train_message(), _context(**{"dp.mode": "local", "dp.noise": float("nan")}),
                           _trains_by(1.0))
    assert reply.has_error() and reply.error.code == FAILURE_CODES["run-config"]
    assert "nan" not in reply.error.reason


def test_a_reply_claiming_another_aggregation_weight_is_excluded_under_dp():
    strategy = ScreenedReplies(SampledFedAvg(clients_per_round=2, weighted_by_key="train-steps"),
                               expected_metrics={"train-steps": 3})
    strategy.sent = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    replies = []
    for node, steps in ((1, 3), (2, 30)):
        instruction = Message(RecordDict({"arrays": strategy.sent}), message_type=MessageType.TRAIN, dst_node_id=node)
        metrics = MetricRecord({"num-examples": 5, "train-steps": steps})
        replies.append(Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, np.float32))}),
                                           "metrics": metrics}), reply_to=instruction))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and [node for _, node, _ in strategy.rejected] == [2]


@pytest.fixture
def users(tmp_path):
    return build_synthetic_users(tmp_path / "users", n_users=2, samples_per_user=8)


def _config(model_dir, run_dir, **overrides) -> RunConfig:
    return RunConfig.from_flower(small_run(model_dir, run_dir, **{"federation.local-steps": 1, "evaluate.base": False,
                                                                  **overrides}))


def _grid(config, users, **kwargs) -> LoopbackGrid:
    return LoopbackGrid(client_app, [{"user-dir": str(path)} for path in users], config.to_flower(), **kwargs)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def test_a_run_with_server_side_dp_spends_its_target_epsilon_and_counts_each_round_once_across_a_restart(
        model_dir, users, tmp_path):
    run_dir = tmp_path / "run"
    config = _config(model_dir, run_dir, **{"dp.mode": "server", "dp.epsilon": 8.0, "dp.clip": 0.5})
    assert config.releases == 3  # one expert round and two personalization rounds
    with pytest.raises(CoordinatorCrash):
        run_federation(_grid(config, users, crash_after_train_rounds=2), config)
    assert load_checkpoint(run_dir).privacy["releases"] == 2
    run_federation(_grid(config, users), config)

    sigma = noise_for_epsilon(8.0, 3, 1e-5)
    trained = [row for row in _rows(run_dir) if row["phase"] in ("expert", "personalize") and "aggregated" in row]
    assert [row["dp-epsilon"] for row in trained] == pytest.approx([epsilon_of(sigma, n, 1e-5) for n in (1, 2, 3)])
    summary = json.loads((run_dir / "summary.json").read_text())["privacy"]
    assert summary["dp"] == "server" and summary["aggregated_rounds"] == 3
    assert 7.9 < summary["epsilon"] <= 8.0 and summary["noise_multiplier"] == pytest.approx(sigma)


@pytest.mark.parametrize(("mode", "multiplier"), [("client", 1.0), ("local", 0.5)])
def test_a_run_with_client_side_or_local_dp_goes_on_after_a_restart_and_reports_epsilon(model_dir, users, tmp_path,
                                                                                        mode, multiplier):
    """The devices' mods pair what they send with what they received by position: after a
    restart (a checkpoint's keys come back in another order) every reply is still accepted.
    Local DP's noise is measured against 2 × clip: σ = 1 is a multiplier of 0.5."""
    run_dir = tmp_path / "run"
    config = _config(model_dir, run_dir, **{"dp.mode": mode, "train.method": "sft",
                                            "dp.noise": 1.0})  # no expert: 2 rounds
    with pytest.raises(CoordinatorCrash):
        run_federation(_grid(config, users, crash_after_train_rounds=1), config)
    run_federation(_grid(config, users), config)
    trained = [row for row in _rows(run_dir) if "aggregated" in row]
    assert len(trained) == 2 and all(row["aggregated"] and row["accepted"] == 2 for row in trained)
    assert trained[-1]["dp-epsilon"] == pytest.approx(epsilon_of(multiplier, 2, 1e-5))
