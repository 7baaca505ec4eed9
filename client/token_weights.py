"""Data-side causal effects (DCE) and token weights, computed on the device with the expert.

For every training sample the expert's probability of each ground-truth response token is
computed once with the history and once without; the result is cached in the user's store
under a key made of the expert's content digest, the base model and the prompt budgets, so
a changed expert (or prompt) invalidates it. The cache never leaves the device.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from shared.batching import collate
from shared.config import PromptConfig
from shared.forward import model_device, response_label_log_probs
from shared.losses import IGNORE_INDEX
from shared.paths import atomic_write_json
from shared.prompts import EncodedSample, encode_sample
from shared.user_store import Sample, UserStore

log = logging.getLogger(__name__)

CACHE_FORMAT = "nextquill-token-probs/1"
@dataclass(frozen=True)
class TokenProbs:
    """The expert's probabilities of one sample's response tokens, with and without history."""

    token_ids: list[int]
    prob_with: list[float]
    prob_without: list[float]


def encode_store_samples(
    store: UserStore, tokenizer: PreTrainedTokenizerBase, prompt: PromptConfig, split: str | None = "train"
) -> list[tuple[Sample, EncodedSample]]:
    """Every sample of `split` with both prompt variants encoded."""
    return [
        (sample, encode_sample(tokenizer, sample.x, [h.text for h in store.history_for(sample)], sample.y, prompt))
        for sample in store.samples(split)
    ]


@torch.no_grad()
def compute_token_probs(
    model: torch.nn.Module,
    encoded: Sequence[EncodedSample],
    pad_id: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[TokenProbs]:
    """p(y_t | x, h, y<t) and p(y_t | x, ∅, y<t) at every response token, under `model`."""
    model.eval()
    device = model_device(model)
    out: list[TokenProbs] = []
    starts = range(0, len(encoded), batch_size)
    for start in tqdm(starts, desc="expert token probabilities", disable=not progress, leave=False):
        chunk = encoded[start : start + batch_size]
        batch = collate(chunk, pad_id).to(device)
        ignored = batch.labels == IGNORE_INDEX
        p_with, p_without = (torch.where(ignored, 0.0, response_label_log_probs(model, side, batch.labels).exp())
                             for side in (batch.with_history, batch.without_history))
        for row, sample in enumerate(chunk):
            n = len(sample.response)
            out.append(TokenProbs(sample.response, p_with[row, -n:].tolist(), p_without[row, -n:].tolist()))
    return out


def cache_key(expert_digest: str, base_id: str, prompt: PromptConfig) -> str:
    material = json.dumps(
        {"format": CACHE_FORMAT, "expert": expert_digest, "base": base_id, "prompt": asdict(prompt)}, sort_keys=True
    )
    return hashlib.sha256(material.encode()).hexdigest()[:20]


def _cache_dir(store: UserStore) -> Path:
    return store.cache_dir / "token_probs"


def cached_token_probs(
    store: UserStore,
    load_expert: Callable[[], torch.nn.Module],
    tokenizer: PreTrainedTokenizerBase,
    expert_digest: str,
    base_id: str,
    prompt: PromptConfig,
    split: str | None = "train",
    batch_size: int = 16,
    encoded: list[tuple[Sample, EncodedSample]] | None = None,
) -> dict[str, TokenProbs]:
    """Token probabilities of the store's samples under the expert, from the cache when it
    holds this (expert digest, base, prompt) and every sample; otherwise computed with the
    model `load_expert()` returns (called only then) and cached. Sample id -> TokenProbs.
    `encoded`: the samples of `split` as `encode_store_samples` gives them, when the caller
    has them already."""
    if encoded is None:
        encoded = encode_store_samples(store, tokenizer, prompt, split)
    key = cache_key(expert_digest, base_id, prompt)
    path = _cache_dir(store) / f"{key}.json"
    cached: dict[str, TokenProbs] = {}
    if path.is_file():
        try:
            payload = json.loads(path.read_text())
            cached = {sid: TokenProbs(**row) for sid, row in payload["samples"].items()}
        except (ValueError, KeyError, TypeError):
            log.warning("token-probability cache %s is unreadable; recomputing it", path)
    missing = [(s, e) for s, e in encoded if s.id not in cached or cached[s.id].token_ids != e.response]
    if missing:
        fresh = compute_token_probs(load_expert(), [e for _, e in missing], tokenizer.pad_token_id, batch_size)
        cached.update({s.id: probs for (s, _), probs in zip(missing, fresh, strict=True)})
        atomic_write_json(path, {
            "format": CACHE_FORMAT, "expert_digest": expert_digest, "base": base_id, "prompt": asdict(prompt),
            "samples": {sid: asdict(probs) for sid, probs in sorted(cached.items())},
        })
        # A cache under another key belongs to an earlier expert or prompt: it is stale.
        for stale in _cache_dir(store).glob("*.json"):
            if stale != path:
                stale.unlink(missing_ok=True)
        log.info("computed expert token probabilities for %d samples of %s", len(missing), store.user_id)
    return {s.id: cached[s.id] for s, _ in encoded}
