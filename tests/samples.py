"""Small inputs several test files share: a prompt budget, training examples, a batch whose
rows pad differently, a two-sample user store, and the run config of a small federated run."""

from __future__ import annotations

from pathlib import Path

from client.trainer import TrainExample
from shared.batching import PairBatch, collate
from shared.config import PromptConfig
from shared.prompts import encode_sample
from shared.user_store import HistoryItem, Sample, UserStore, write_user_store

PROMPT = PromptConfig(history_tokens=48, context_tokens=16, response_tokens=16)
DEVICE_PROMPT = PromptConfig(history_tokens=48, context_tokens=24, response_tokens=24)  # the user_device fixture's
ONE_STEP = dict(max_steps=1, batch_size=4)


def train_examples(tokenizer, n: int = 6) -> list[TrainExample]:
    return [
        TrainExample(encode_sample(tokenizer, f"cue {i}", [f"my old line {i}", "and older"], f"my reply {i}", PROMPT))
        for i in range(n)
    ]


def uneven_batch(tokenizer) -> PairBatch:
    """Samples of different history, context and response lengths, so both variants pad."""
    encoded = []
    for i in range(3):
        history = [f"my old line {i} " * (i + 1), "and older"][: i + 1]
        encoded.append(encode_sample(tokenizer, f"cue {i} " * (2 - i + 1), history, "my reply " * (i + 1), PROMPT))
    return collate(encoded, tokenizer.pad_token_id)


def leftovers(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []


def tiny_store(path: Path, **kwargs) -> UserStore:
    history = [HistoryItem("h0", 0.0, "first words"), HistoryItem("h1", 1.0, "second words")]
    samples = [
        Sample("s0", 1.0, "cue one", "reply one", "train", ("h0",)),
        Sample("s1", 2.0, "", "reply two", "test", ("h0", "h1"), ((0, 5),)),
    ]
    return write_user_store(path, "user/1", "synthetic", samples, history, extra_meta={"note": "x"}, **kwargs)


def small_run(model_dir: Path, run_dir: Path, **overrides) -> dict:
    """Flower's run config (grouped keys) of a small federated run of the test model."""
    return {
        "base.model": str(model_dir), "base.device": "cpu", "expert.rounds": 1,
        "federation.clients-per-round": 2, "federation.rounds": 2, "federation.local-steps": 2,
        "federation.run-dir": str(run_dir), "train.batch-size": 4, "lora.r": 2, "lora.alpha": 4,
        "prompt.history-tokens": 48, "prompt.context-tokens": 24, "prompt.response-tokens": 24,
        "evaluate.every": 0,  # evaluated after the last round only: the rounds these tests count
    } | overrides
