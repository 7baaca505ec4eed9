"""A device's federated round: personal parameters stay on disk, only shared ones return."""

import pytest
import torch

from client.device import Device
from client.federated import train_round
from client.personal_state import load_personal_state
from shared.config import BaseSpec, LoraSettings, PromptConfig, TrainConfig
from shared.split import SplitSpec
from shared.user_store import UserStore
from shared.wire import TRAIN_METRICS
from simulations.datasets import build_synthetic_users

CONFIG = TrainConfig(method="mce-only", max_steps=2, batch_size=4)


@pytest.fixture(scope="module")
def device(model_dir):
    prompt = PromptConfig(history_tokens=48, context_tokens=24, response_tokens=24)
    return Device.load(BaseSpec(str(model_dir), device="cpu"), LoraSettings(lora_r=2, lora_alpha=4), prompt)


@pytest.fixture
def store(tmp_path):
    return UserStore.open(build_synthetic_users(tmp_path, n_users=1, samples_per_user=8)[0])


@pytest.mark.parametrize("split", [SplitSpec("dual"), SplitSpec("a-shared"), SplitSpec("layers", shared_layers=1)])
def test_a_round_returns_only_shared_parameters_and_keeps_the_personal_ones_on_disk(device, store, split):
    initial = split.shared_state(device.host.new(*split.adapters, seed=0))
    first = train_round(device, store, split, initial, CONFIG, "run")
    model = device.host.model
    assert set(first.shared) == set(split.shared_state(model))
    assert set(first.metrics) <= TRAIN_METRICS and first.metrics["num-examples"] == 8
    personal = load_personal_state(store, "run")
    personal_keys = {k for part in personal.values() for k in part}
    if split.kind == "dual":  # same names, other adapter
        assert set(personal) == {"personal"} and personal_keys == set(first.shared)
    else:
        assert personal_keys and not personal_keys & set(first.shared)

    # Next round: the personal part is picked up from disk, the shared part from the coordinator.
    shared_in = {k: torch.zeros_like(v) for k, v in first.shared.items()}
    second = train_round(device, store, split, shared_in, CONFIG, "run")
    assert set(second.shared) == set(first.shared)
    after = load_personal_state(store, "run")
    changed = [not torch.equal(after[a][k], v) for a, part in personal.items() for k, v in part.items()]
    assert any(changed)  # trained further from where it was, not from scratch


def test_the_full_split_shares_everything_and_keeps_nothing(device, store):
    split = SplitSpec("full")
    initial = split.shared_state(device.host.new(*split.adapters, seed=0))
    result = train_round(device, store, split, initial, CONFIG, "expert")
    assert result.shared and load_personal_state(store, "expert") == {}


def test_the_local_split_shares_nothing_and_keeps_everything(device, store):
    split = SplitSpec("local")
    assert split.shared_state(device.host.new(*split.adapters, seed=0)) == {}
    result = train_round(device, store, split, {}, CONFIG, "local")
    assert result.shared == {} and result.metrics["train-steps"] == CONFIG.max_steps
    kept = load_personal_state(store, "local")
    assert set(kept) == {"local"} and kept["local"]
