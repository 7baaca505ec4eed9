"""A real deployment on loopback: a SuperLink and two SuperNodes as separate processes, TLS and
SuperNode authentication on, our apps run by `flwr run` over Flower's Fleet API (HTTP). One
expert round and one personalization round; then each device holds its personal adapter and
the coordinator's checkpoint holds exactly the shared keys. Every process is stopped."""

import json
import threading
import time
from pathlib import Path

import pytest

from client.personal_state import load_personal_state, personal_path
from coordinator.checkpoint import load_checkpoint
from coordinator.global_adapters import GlobalAdapters
from shared.config import LoraSettings
from shared.split import PERSONAL_ADAPTER, SplitSpec
from shared.user_store import UserStore
from simulations.datasets import build_synthetic_users
from simulations.deployment import local_deployment, run_app

REPO = Path(__file__).parents[1]


@pytest.mark.slow
def test_a_superlink_and_two_supernodes_run_expert_and_personalization_rounds(model_dir, tmp_path):
    users = build_synthetic_users(tmp_path / "users", n_users=2, samples_per_user=10)
    run_config = {
        "model": str(model_dir), "device": "cpu", "clients-per-round": 2, "expert-rounds": 1, "rounds": 1,
        "local-steps": 2, "batch-size": 4, "lora-r": 2, "lora-alpha": 4, "history-tokens": 48,
        "context-tokens": 24, "response-tokens": 24, "run-dir": str(tmp_path / "run"),
    }
    nodes = [{"user-dir": str(path)} for path in users]
    # Each device has its own data directory (its expert cache), as separate machines would.
    device_homes = [tmp_path / f"device-{i}" for i in range(len(users))]
    with local_deployment(tmp_path / "flwr", nodes, tmp_path / "certs",
                          node_envs=[{"NEXTQUILL_HOME": str(home)} for home in device_homes]) as deployment:
        run = run_app(deployment, REPO, run_config, timeout=900)
    assert run.status == "finished:completed"
    assert deployment.live_processes() == []

    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.phase == "done"
    split = SplitSpec("dual")
    shared_keys = set(GlobalAdapters(str(model_dir), LoraSettings(lora_r=2, lora_alpha=4)).initial_shared(split, 0))
    assert set(checkpoint.shared) == shared_keys

    for path, home in zip(users, device_homes, strict=True):
        store = UserStore.open(path)
        assert personal_path(store, f"{checkpoint.run_id}-personalize").is_file()
        personal = load_personal_state(store, f"{checkpoint.run_id}-personalize")
        assert set(personal) == {PERSONAL_ADAPTER} and set(personal[PERSONAL_ADAPTER]) == shared_keys
        assert (home / "experts" / checkpoint.expert_digest / "adapter_model.safetensors").is_file()


CANARY = "canary-0d1e5f"


@pytest.mark.slow
def test_a_run_asking_for_more_nodes_than_exist_and_losing_one_mid_run_completes(model_dir, tmp_path):
    """Real processes: clients-per-round above the SuperNodes connected, a SuperNode killed after
    the first round, and a device whose store is missing (a canary in its path). The run goes
    on with the nodes it has and completes; the failing device's error reaches the coordinator
    as a fixed category, its details only the device's own log."""
    users = build_synthetic_users(tmp_path / "users", n_users=2, samples_per_user=10)
    run_dir = tmp_path / "run"
    run_config = {
        "model": str(model_dir), "device": "cpu", "method": "sft", "clients-per-round": 4, "rounds": 3,
        "local-steps": 1, "batch-size": 4, "lora-r": 2, "lora-alpha": 4, "history-tokens": 48,
        "context-tokens": 24, "response-tokens": 24, "run-dir": str(run_dir), "connect-timeout": 5.0,
        "round-timeout": 30.0,
    }
    nodes = [{"user-dir": str(users[0])}, {"user-dir": str(users[1])}, {"user-dir": str(tmp_path / CANARY)}]
    killed = threading.Event()

    def kill_after_first_round(deployment) -> None:
        while not killed.is_set():
            rows = (run_dir / "rounds.jsonl").read_text() if (run_dir / "rounds.jsonl").exists() else ""
            if '"phase": "personalize"' in rows:
                victims = [p for p in deployment.live_processes() if "supernode-1.key" in " ".join(p.cmdline())]
                for process in victims:
                    for child in [*process.children(recursive=True), process]:
                        child.kill()
                killed.set()
            time.sleep(0.2)

    homes = [{"NEXTQUILL_HOME": str(tmp_path / f"device-{i}")} for i in range(3)]
    with local_deployment(tmp_path / "flwr", nodes, tmp_path / "certs", node_envs=homes) as deployment:
        watcher = threading.Thread(target=kill_after_first_round, args=(deployment,), daemon=True)
        watcher.start()
        started = time.monotonic()
        run = run_app(deployment, REPO, run_config, timeout=600)
        seconds = time.monotonic() - started
        killed.set()
        logs = {name: path.read_text(errors="replace") for name, path in deployment.logs.items()}
    assert run.status == "finished:completed" and seconds < 600

    rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["personalize"] * 3 + ["evaluate"]
    assert (rows[0]["sampled"], rows[0]["accepted"]) == (3, 2)  # 3 connected of the 4 wanted; the canary device failed
    assert all(r["accepted"] == 1 for r in rows[1:])  # supernode-1 is gone; supernode-0 goes on
    assert "3 SuperNode(s) connected, fewer than the 4 wanted: going on with them" in run.output
    assert "failed: device failed: user-store (details in the device's log)" in run.output
    assert CANARY not in run.output and CANARY not in logs["superlink"]
    assert CANARY in logs["supernode-2"]  # the details stayed on the device
