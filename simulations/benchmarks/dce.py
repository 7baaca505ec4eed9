"""Benchmark 4, DCE precompute: seconds per 1,000 target tokens of the expert pass (with and
without history, logits at response positions only), against reading the device's cache
and against one local epoch of NextQuill training on the same samples; and what that
means over rounds: computed once per expert digest and read from the cache after, rather
than recomputed every step from the model being trained (the authors' code)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

from client import federated
from client.device import Expert
from client.reference import References, encode_store_samples
from client.token_weights import cached_token_probs, compute_token_probs
from client.trainer import train_adapter
from shared.adapters import save_adapter
from shared.config import TrainConfig
from shared.paths import atomic_write_json
from shared.run_config import RunConfig
from shared.user_store import UserStore


def dce_benchmark(config: RunConfig, stores: list[UserStore], out: Path, rounds: tuple[int, ...] = (1, 5, 20)) -> dict:
    device = federated.resident_device(config)
    with tempfile.TemporaryDirectory(prefix="bench-expert-") as scratch:  # a random expert, for timing only
        expert_dir = Path(scratch) / "expert"
        save_adapter(device.host.new("bench-expert", seed=1), expert_dir, adapter_name="bench-expert")
        expert = Expert.from_dir(expert_dir)
        model = device.host.load("bench-expert-loaded", expert.path)
    encoded = [e for store in stores for _, e in encode_store_samples(store, device.tokenizer, device.prompt)]
    tokens = sum(len(e.response) for e in encoded)

    started = time.perf_counter()
    compute_token_probs(model, encoded, device.tokenizer.pad_token_id)
    compute_seconds = time.perf_counter() - started

    for store in stores:  # fill the caches, then time a read of all of them
        cached_token_probs(store, lambda: model, device.tokenizer, expert.digest, device.base_id, device.prompt,
                           References("removed"))
    started = time.perf_counter()
    for store in stores:
        cached_token_probs(store, lambda: model, device.tokenizer, expert.digest, device.base_id, device.prompt,
                           References("removed"))
    cache_seconds = time.perf_counter() - started

    train = TrainConfig(method="nextquill", batch_size=config.train.batch_size, epochs=1.0)
    started = time.perf_counter()
    for store in stores:
        examples = device.examples([store], train, expert)
        train_adapter(device.host.new("bench-train", seed=0), examples, device.tokenizer.pad_token_id,
                                replace(train, seed=0), progress=False)
    epoch_seconds = time.perf_counter() - started

    per_k = 1000 * compute_seconds / tokens
    amortized = [{"rounds": r, "once_then_cached_seconds": compute_seconds + (r - 1) * cache_seconds,
                  "every_round_seconds": r * compute_seconds,
                  "share_of_training": (compute_seconds + (r - 1) * cache_seconds) / (r * epoch_seconds)}
                 for r in rounds]
    result = {
        "benchmark": "DCE precompute", "model": config.base.model, "users": len(stores), "samples": len(encoded),
        "target_tokens": tokens, "expert_pass_seconds": compute_seconds, "seconds_per_1000_tokens": per_k,
        "cache_read_seconds": cache_seconds, "one_epoch_training_seconds": epoch_seconds, "amortized": amortized,
    }
    atomic_write_json(out, result)
    print(f"expert pass: {per_k:.3f} s per 1,000 target tokens ({tokens:,} tokens, {len(encoded)} samples, "
          f"{len(stores)} users); cache read {cache_seconds:.3f} s; one NextQuill epoch {epoch_seconds:.1f} s")
    print("| rounds | once, then cached (s) | every round (s) | share of the training time |\n|---|---|---|---|")
    for row in amortized:
        print(f"| {row['rounds']} | {row['once_then_cached_seconds']:.2f} | {row['every_round_seconds']:.2f} | "
              f"{row['share_of_training']:.1%} |")
    return result
