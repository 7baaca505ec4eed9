"""A real deployment on loopback: a SuperLink and two SuperNodes as separate processes, TLS and
SuperNode authentication on, our apps run by `flwr run` over Flower's Fleet API (HTTP). One
expert round and one personalization round; then each device holds its personal adapter and
the coordinator's checkpoint holds exactly the shared keys. Every process is stopped."""

from pathlib import Path

import pytest

from client.personal_state import load_personal_state, personal_path
from coordinator.checkpoint import load_checkpoint
from coordinator.global_adapters import GlobalAdapters
from shared.adapters import LoraSettings
from shared.data import UserStore, build_synthetic_users
from shared.deployment import local_deployment, run_app
from shared.split import PERSONAL_ADAPTER, SplitSpec

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
    shared_keys = set(GlobalAdapters(str(model_dir), LoraSettings(r=2, alpha=4)).initial_shared(split, 0))
    assert set(checkpoint.shared) == shared_keys

    for path, home in zip(users, device_homes, strict=True):
        store = UserStore.open(path)
        assert personal_path(store, f"{checkpoint.run_id}-personalize").is_file()
        personal = load_personal_state(store, f"{checkpoint.run_id}-personalize")
        assert set(personal) == {PERSONAL_ADAPTER} and set(personal[PERSONAL_ADAPTER]) == shared_keys
        assert (home / "experts" / checkpoint.expert_digest / "adapter_model.safetensors").is_file()
