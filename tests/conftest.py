"""Shared fixtures: a small model directory in the Hugging Face format (the project's own
BPE tokenizer trained on a slice of the base plays, a randomly initialised Qwen2), so tests
exercise the real loaders, 4-bit layers and PEFT without building the embedded base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from shared.base_model import base_play_texts, train_tokenizer
from shared.paths import DATA_DIR_ENV


@pytest.fixture(autouse=True, scope="session")
def isolated_data_dir(tmp_path_factory):
    """Tests never read or write the user's real data directory."""
    patch = pytest.MonkeyPatch()
    patch.setenv(DATA_DIR_ENV, str(tmp_path_factory.mktemp("nextquill-home")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(base_play_texts()[:4000], vocab_size=1024).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from shared.loading import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    """A 4-layer random Qwen2 with the test tokenizer, saved like a downloaded model."""
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def nf4_base(model_dir):
    """The test model loaded in 4-bit on the CPU: (model, tokenizer)."""
    from shared.config import BaseSpec
    from shared.loading import load_base

    return load_base(BaseSpec(str(model_dir), quantization="nf4", device="cpu"))


@pytest.fixture(scope="module")
def user_stores(tmp_path_factory):
    """Three synthetic users' stores (ten samples each)."""
    from shared.user_store import UserStore
    from simulations.datasets import build_synthetic_users

    root = tmp_path_factory.mktemp("users")
    return [UserStore.open(p) for p in build_synthetic_users(root, n_users=3, samples_per_user=10)]


@pytest.fixture(scope="module")
def user_device(model_dir):
    """A device with the test model resident in 4-bit, for on-device personalization."""
    from client.device import Device
    from shared.config import BaseSpec, LoraSettings
    from tests.samples import DEVICE_PROMPT

    return Device.load(BaseSpec(str(model_dir), quantization="nf4", device="cpu"), LoraSettings(lora_r=4, lora_alpha=8),
                       DEVICE_PROMPT)


@pytest.fixture(scope="module")
def experts(user_device, user_stores, tmp_path_factory):
    """Two experts (ContextSFT on the other users, two seeds): (Expert, Expert)."""
    from client.device import Expert
    from shared.config import TrainConfig
    from tests.samples import ONE_STEP

    root = tmp_path_factory.mktemp("experts")
    for seed in (0, 1):
        user_device.train(user_stores[1:], TrainConfig(method="context-sft", seed=seed, **ONE_STEP),
                          save_to=root / f"e{seed}", progress=False)
    return Expert.from_dir(root / "e0"), Expert.from_dir(root / "e1")
