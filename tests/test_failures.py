"""A device that fails tells the coordinator a fixed code and category, never the error's
text: paths, user ids and records stay in the device's own log."""

import json
import logging

import pytest

from client.client_app import app as client_app
from client.failures import FAILURE_CODES, failure_category
from coordinator.federation import run_federation
from shared.errors import AdapterLoadError, ModelLoadError
from shared.expert_package import ExpertDigestError
from shared.run_config import RunConfig
from shared.settings import SettingError
from shared.user_store import DataError
from simulations.datasets import build_synthetic_users
from tests.loopback import LoopbackGrid

CANARY = "canary-5be1c0de"


def _config(model_dir, run_dir, **overrides) -> RunConfig:
    values = {
        "base.model": str(model_dir), "base.device": "cpu", "train.method": "sft", "train.batch-size": 4,
        "federation.clients-per-round": 3, "federation.rounds": 1, "federation.local-steps": 1,
        "federation.run-dir": str(run_dir), "federation.connect-timeout": 0.2, "lora.r": 2, "lora.alpha": 4,
        "prompt.history-tokens": 48, "prompt.context-tokens": 24, "prompt.response-tokens": 24,
    }
    return RunConfig.from_flower(values | overrides)


@pytest.mark.parametrize(
    ("error", "category"),
    [
        (DataError("x"), "user-store"), (SettingError("alpha", "x"), "run-config"),
        (ModelLoadError("x"), "base-model"), (ExpertDigestError("x"), "expert"), (AdapterLoadError("x"), "expert"),
        (ValueError("x"), "input"), (PermissionError("x"), "storage"), (ZeroDivisionError(), "internal"),
    ],
)
def test_every_failure_falls_in_a_fixed_category(error, category):
    assert failure_category(error) == category and category in FAILURE_CODES


def test_a_failing_device_replies_with_a_fixed_code_and_no_user_data(model_dir, tmp_path, caplog):
    # Canaries in what a device's errors name: the store's folder (its user id), a record's id
    # and text; one store is malformed, one is missing.
    users = build_synthetic_users(tmp_path / f"users-{CANARY}", n_users=2, samples_per_user=8)
    samples = users[1] / "samples.jsonl"
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    rows[0] = {**rows[0], "id": f"{CANARY}-record", "y": ""}  # an empty target: the store fails to open
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    missing = tmp_path / f"gone-{CANARY}"
    config = _config(model_dir, tmp_path / "run")
    grid = LoopbackGrid(client_app, [{"user-dir": str(p)} for p in [*users, missing]], config.to_flower())
    replies = []
    deliver = grid.deliver
    grid.deliver = lambda message: replies.append(deliver(message)) or replies[-1]

    with caplog.at_level(logging.INFO):
        run_federation(grid, config)

    failed = [reply for reply in replies if reply.has_error()]
    assert {reply.metadata.src_node_id for reply in failed} == {1001, 1002}
    for reply in failed:
        assert reply.error.code == FAILURE_CODES["user-store"]
        assert reply.error.reason == "device failed: user-store (details in the device's log)"
    coordinator_log = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("flwr"))
    assert "node 1001 failed: device failed: user-store" in coordinator_log
    assert CANARY not in coordinator_log
    # The details stay on the device, in its own log.
    device_log = [r for r in caplog.records if r.name == "client.failures"]
    assert device_log and any(CANARY in str(r.exc_info[1]) for r in device_log)
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert (rows[0]["sampled"], rows[0]["replies"], rows[0]["accepted"]) == (3, 3, 1)
