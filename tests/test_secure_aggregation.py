"""Secure aggregation with Flower's SecAgg+ (coordinator/secure_aggregation.py and
client/secure_aggregation.py): real protocol messages between the real ServerApp code and the
real ClientApp (in-process grid); the same through real processes in test_deployment.py."""

import json

import pytest
import torch

from client import federated
from client.client_app import app as client_app
from coordinator.checkpoint import load_checkpoint
from coordinator.federation import run_federation
from shared.run_config import RunConfig
from shared.settings import SettingError
from shared.wire import SECURE_METRICS, metrics_from_mean, metrics_to_vector
from simulations.datasets import build_synthetic_users
from tests.loopback import LoopbackGrid
from tests.samples import small_run

QUANTUM = 2 * 8.0 / 2**22  # SecAgg+'s default clipping range ±8 over 2^22 levels


def _config(model_dir, run_dir, **overrides) -> RunConfig:
    return RunConfig.from_flower(small_run(model_dir, run_dir, **overrides))


def test_the_coordinator_learns_the_mean_of_the_updates_and_no_update_of_its_own(model_dir, tmp_path, monkeypatch):
    users = build_synthetic_users(tmp_path / "users", n_users=4, samples_per_user=10)
    (users[3] / "samples.jsonl").write_text("not json\n")  # this device fails while training, after the key exchange
    trained: dict[tuple[str, int], list[federated.RoundResult]] = {}

    def handle_train(instruction, shared_in, node_config, config):
        result = real_handle_train(instruction, shared_in, node_config, config)
        trained.setdefault((instruction.phase, instruction.server_round), []).append(result)
        return result

    real_handle_train = federated.handle_train
    monkeypatch.setattr(federated, "handle_train", handle_train)
    config = _config(model_dir, tmp_path / "run", **{"secagg.enabled": True, "federation.clients-per-round": 4,
                                                     "federation.rounds": 1, "train.method": "mce-only"})
    grid = LoopbackGrid(client_app, [{"user-dir": str(path)} for path in users], config.to_flower())
    run_federation(grid, config)

    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if row["phase"] in ("expert", "personalize")]
    assert [(r["phase"], r["sampled"], r["accepted"], r["aggregated"]) for r in train_rows] == [
        ("personalize", 4, 3, True)]
    # The aggregate is the uniform mean of the three updates that finished, within SecAgg+'s quantization.
    results = trained[("personalize", 1)]
    assert len(results) == 3
    shared = load_checkpoint(tmp_path / "run").shared
    for key, value in shared.items():
        mean = torch.stack([result.shared[key] for result in results]).mean(0)
        assert torch.allclose(value, mean, atol=QUANTUM, rtol=0), key
    # ... and so are the train metrics, which travelled masked with it.
    loss = sum(result.metrics["train-loss"] for result in results) / 3
    assert train_rows[0]["train-loss"] == pytest.approx(loss, abs=QUANTUM * 1024)
    assert train_rows[0]["upload_bytes_per_client"] == 8 * (sum(v.numel() for v in shared.values())
                                                            + 2 * len(SECURE_METRICS) + 1)

    # What the coordinator received from devices in train rounds: SecAgg+'s own records, with no
    # parameters and no metric of one device in clear.
    replies = grid.train_replies
    assert replies and all(not len(record) for reply in replies if not reply.has_error()
                           for record in reply.content.array_records.values())
    clear_metrics = [dict(record) for reply in replies if not reply.has_error()
                     for record in reply.content.metric_records.values()]
    assert all(metrics == {"num_examples": 1} for metrics in clear_metrics)
    assert all(not dict(reply.content.config_records.get("fitres.metrics", {})) for reply in replies
               if not reply.has_error())
    failed = [reply for reply in replies if reply.has_error()]
    assert failed and all(reply.error.reason.startswith("device failed: user-store") for reply in failed)


def test_metrics_travel_as_a_vector_whose_mean_gives_each_metrics_mean_over_those_that_reported():
    vectors = [metrics_to_vector({"train-loss": 2.0, "num-examples": 8}),
               metrics_to_vector({"train-loss": 4.0, "num-examples": 4, "train-l-p": 1.5})]
    means = metrics_from_mean(sum(vectors) / 2)
    assert means == pytest.approx({"train-loss": 3.0, "num-examples": 6.0, "train-l-p": 1.5})


@pytest.mark.parametrize("overrides", [
    {"dp.mode": "server"}, {"dp.mode": "client"}, {"federation.max-update-norm": 5.0},
    {"federation.clients-per-round": 1, "federation.min-replies": 1},
    {"sharing.split": "local"},
])
def test_secure_aggregation_refuses_what_needs_each_update_one_device_or_no_sharing(model_dir, tmp_path, overrides):
    with pytest.raises(SettingError, match="run config secagg.enabled"):
        _config(model_dir, tmp_path / "run", **{"secagg.enabled": True, **overrides})
