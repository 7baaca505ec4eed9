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
