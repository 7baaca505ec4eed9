"""Data-side causal effects (DCE) and token weights, computed on the device with the expert.

For every training sample the expert's probability of each ground-truth response token is
computed once with the user's history and once with the counterfactual history h_ref
(`client/reference.py`; averaged over the donors where there are several); the result is
cached in the user's store under a key made of the expert's content digest, the base model,
the prompt budgets and the reference, so a changed expert, prompt or reference invalidates
it. The cache never leaves the device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from client.reference import References
from shared.batching import collate
from shared.config import PromptConfig, WeightScheme
from shared.forward import model_device, response_label_log_probs
from shared.losses import IGNORE_INDEX
from shared.paths import atomic_write_json
from shared.prompts import EncodedSample, encode_response, encode_sample
from shared.user_store import Sample, UserStore

log = logging.getLogger(__name__)

CACHE_FORMAT = "nextquill-token-probs/2"


@dataclass(frozen=True)
class TokenProbs:
    """The expert's probabilities of one sample's response tokens, with the user's history and
    with the counterfactual history (`prob_without`)."""

    token_ids: list[int]
    prob_with: list[float]
    prob_without: list[float]


def encode_store_samples(
    store: UserStore, tokenizer: PreTrainedTokenizerBase, prompt: PromptConfig, split: str | None = "train",
    references: References | None = None,
) -> list[tuple[Sample, EncodedSample]]:
    """Every sample of `split` encoded with the user's history and with its (first) counterfactual
    history (default: the history removed)."""
    references = references or References("removed")
    return [(sample, _encode(store, tokenizer, prompt, sample, references.histories(store, sample)[0]))
            for sample in store.samples(split)]


def _encode(store: UserStore, tokenizer: PreTrainedTokenizerBase, prompt: PromptConfig, sample: Sample,
            reference: list[str] | None) -> EncodedSample:
    return encode_sample(tokenizer, sample.x, [h.text for h in store.history_for(sample)], sample.y, prompt,
                         reference=reference)


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


def user_weight_scheme(scheme: WeightScheme, probs: Iterable[TokenProbs]) -> WeightScheme:
    """The scheme a user trains with: weighting 'fraction' becomes the threshold on DCE above which
    `keep_fraction` of the user's training tokens lie (ties may keep a few more); others as given."""
    if scheme.weighting != "fraction":
        return scheme
    dce = sorted((a - b for p in probs for a, b in zip(p.prob_with, p.prob_without, strict=True)), reverse=True)
    if not dce:
        return scheme
    kept = max(1, round(scheme.keep_fraction * len(dce)))
    cut = dce[kept] if kept < len(dce) else dce[-1] - 1e-6
    return dataclasses.replace(scheme, weighting="threshold", delta=max(-1.0, min(1.0, cut)))


def cache_key(expert_digest: str, base_id: str, prompt: PromptConfig, reference: str = "removed") -> str:
    material = json.dumps({"format": CACHE_FORMAT, "expert": expert_digest, "base": base_id,
                           "prompt": asdict(prompt), "reference": reference}, sort_keys=True)
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
    references: References,
    split: str | None = "train",
    batch_size: int = 16,
) -> dict[str, TokenProbs]:
    """Token probabilities of the store's samples under the expert, with the user's history and
    with `references`' counterfactual history (the mean over its histories where it has several),
    from the cache when it holds this (expert digest, base, prompt, reference) and every sample;
    otherwise computed with the model `load_expert()` returns (called only then) and cached.
    Sample id -> TokenProbs."""
    samples = store.samples(split)
    key = cache_key(expert_digest, base_id, prompt, references.kind)
    path = _cache_dir(store) / f"{key}.json"
    cached: dict[str, TokenProbs] = {}
    if path.is_file():
        try:
            payload = json.loads(path.read_text())
            cached = {sid: TokenProbs(**row) for sid, row in payload["samples"].items()}
        except (ValueError, KeyError, TypeError):
            log.warning("token-probability cache %s is unreadable; recomputing it", path)
    variants = {s.id: [_encode(store, tokenizer, prompt, s, h) for h in references.histories(store, s)]
                for s in samples if s.id not in cached}
    stale_rows = [s for s in samples if s.id in cached
                  and cached[s.id].token_ids != encode_response(tokenizer, s.y, prompt)]
    for s in stale_rows:
        variants[s.id] = [_encode(store, tokenizer, prompt, s, h) for h in references.histories(store, s)]
    if variants:
        flat = [encoded for per_sample in variants.values() for encoded in per_sample]
        fresh = iter(compute_token_probs(load_expert(), flat, tokenizer.pad_token_id, batch_size))
        for sample_id, per_sample in variants.items():
            probs = [next(fresh) for _ in per_sample]
            # The with-history side is the same prompt in every variant; the reference side is averaged.
            mean_reference = [sum(column) / len(probs) for column in zip(*(p.prob_without for p in probs), strict=True)]
            cached[sample_id] = TokenProbs(probs[0].token_ids, probs[0].prob_with, mean_reference)
        atomic_write_json(path, {
            "format": CACHE_FORMAT, "expert_digest": expert_digest, "base": base_id, "prompt": asdict(prompt),
            "reference": references.kind,
            "samples": {sid: asdict(probs) for sid, probs in sorted(cached.items())},
        })
        # A cache under another key belongs to an earlier expert, prompt or reference: it is stale.
        for stale in _cache_dir(store).glob("*.json"):
            if stale != path:
                stale.unlink(missing_ok=True)
        log.info("computed expert token probabilities for %d samples of %s", len(variants), store.user_id)
    return {s.id: cached[s.id] for s in samples}
