"""The embedded base: trained from the base plays only, deterministic, saved in the Hugging
Face format so it loads exactly like a downloaded model."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared import corpus
from shared.base_model import build_embedded_base, ensure_embedded_base, heldout_examples
from shared.named_bases import EmbeddedSize

MINIATURE = EmbeddedSize(vocab_size=512, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=128, steps=3, batch_size=4, learning_rate=1e-3, warmup_steps=1)


def _build(path, seed=0):
    return build_embedded_base("tiny", path, seed=seed, size=MINIATURE, max_examples=64, heldout_count=8)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "embedded"
    return path, _build(path)


def test_base_plays_and_user_plays_are_disjoint_and_cover_the_corpus():
    base, users = set(corpus.base_plays()), set(corpus.user_plays())
    assert not base & users and base | users == set(corpus.play_files()) and len(users) >= 10


def test_heldout_examples_come_from_user_plays_only():
    base_text = {s.text for play in corpus.base_plays() for s in corpus.speeches(play)}
    examples = heldout_examples(30)
    assert examples and not any(e.y in base_text and len(e.y) > 60 for e in examples)


def test_embedded_base_loads_with_auto_classes_and_reports_its_scores(built):
    path, info = built
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "qwen2" and len(tokenizer) == model.config.vocab_size
    ids = tokenizer("To be, or not to be", return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == "To be, or not to be"
    assert torch.isfinite(model(input_ids=ids).logits).all()
    saved = json.loads((path / "build_info.json").read_text())
    assert saved == json.loads(json.dumps(info))
    for key in ("heldout_perplexity", "heldout_history_sensitivity", "build_seconds"):
        assert isinstance(saved[key], float)
    assert set(corpus.user_plays()).isdisjoint(saved["training_text"].split(": ")[1].split(", "))


def test_the_same_seed_builds_the_same_model(built, tmp_path):
    path, _ = built
    again = tmp_path / "again"
    _build(again)
    first, second = load_file(path / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (path / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_unknown_size_is_rejected():
    with pytest.raises(ValueError, match="unknown embedded model size"):
        ensure_embedded_base("huge")


def test_echo_examples_place_the_target_among_the_history(tokenizer):
    import random
    from dataclasses import replace

    from shared.base_model import _training_sequences
    from shared.config import PromptConfig
    from shared.named_bases import SIZES
    from shared.prompts import RESPONSE_HEADER

    always = replace(SIZES["tiny"], echo_fraction=1.0, no_history_fraction=0.0)
    sequences = _training_sequences(tokenizer, always, PromptConfig(history_tokens=400), random.Random(1),
                                    max_examples=5)
    for ids in sequences:
        prompt, response = tokenizer.decode(ids, skip_special_tokens=True).split(RESPONSE_HEADER)
        assert response.split("\n")[0].strip() in prompt
