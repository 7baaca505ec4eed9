"""Data-side causal effects (DCE) and token weights, computed on the device with the expert.

For every training sample the expert's probability of each ground-truth response token is
computed once with the user's history and once with each counterfactual history h_ref asked
for (`client/reference.py`; averaged over the donors where there are several). The result is
cached in the user's store under a key made of the expert's content digest, the base model
and the prompt budgets, so a changed expert or prompt invalidates it; within it, the
probabilities with the user's history are shared by every reference, and each reference
adds its own. The cache never leaves the device.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from client.derived_cache import DerivedCache
from client.reference import References, encode_with_reference
from shared.batching import left_pad
from shared.config import PromptConfig, WeightScheme
from shared.forward import model_device, response_label_log_probs
from shared.losses import IGNORE_INDEX
from shared.prompts import EncodedSample, encode_response, encode_sample
from shared.user_store import UserStore

log = logging.getLogger(__name__)

CACHE_FORMAT = "nextquill-token-probs/3"


@dataclass(frozen=True)
class TokenProbs:
    """The expert's probabilities of one sample's response tokens, with the user's history and
    with the counterfactual history (`prob_without`)."""

    token_ids: list[int]
    prob_with: list[float]
    prob_without: list[float]


@torch.no_grad()
def compute_label_probs(
    model: torch.nn.Module,
    sequences: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[float]]:
    """p(y_t | prompt, y<t) at every response token of each (prompt ids, response ids), under `model`."""
    model.eval()
    device = model_device(model)
    out: list[list[float]] = []
    starts = range(0, len(sequences), batch_size)
    for start in tqdm(starts, desc="expert token probabilities", disable=not progress, leave=False):
        chunk = sequences[start : start + batch_size]
        width = max(len(response) for _, response in chunk)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for row, (_, response) in enumerate(chunk):
            labels[row, width - len(response):] = torch.tensor(response, dtype=torch.long)
        side = left_pad([prompt + response for prompt, response in chunk], pad_id).to(device)
        labels = labels.to(device)
        probs = torch.where(labels == IGNORE_INDEX, 0.0, response_label_log_probs(model, side, labels).exp())
        out += [probs[row, width - len(response):].tolist() for row, (_, response) in enumerate(chunk)]
    return out


def compute_token_probs(
    model: torch.nn.Module,
    encoded: Sequence[EncodedSample],
    pad_id: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[TokenProbs]:
    """p(y_t | x, h, y<t) and p(y_t | x, h_ref, y<t) at every response token, under `model`."""
    with_history = compute_label_probs(model, [(e.prompt_with, e.response) for e in encoded], pad_id, batch_size,
                                       progress)
    reference = compute_label_probs(model, [(e.prompt_without, e.response) for e in encoded], pad_id, batch_size,
                                    progress)
    return [TokenProbs(e.response, a, b) for e, a, b in zip(encoded, with_history, reference, strict=True)]


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
    from the cache where it holds them for this (expert digest, base, prompt); what is missing is
    computed with the model `load_expert()` returns (called only then) and cached. Sample id ->
    TokenProbs."""
    samples = store.samples(split)
    cache = DerivedCache.of(store, "token_probs", CACHE_FORMAT, expert_digest, base_id, prompt)
    entries = cache.read("samples")
    need_with, need_reference = [], []
    for sample in samples:
        response = encode_response(tokenizer, sample.y, prompt)
        entry = entries.get(sample.id)
        if not isinstance(entry, dict) or entry.get("token_ids") != response:
            entries[sample.id] = entry = {"token_ids": response, "prob_with": None, "reference": {}}
        if entry["prob_with"] is None:
            need_with.append(sample)
        if references.kind not in entry["reference"]:
            need_reference.append(sample)
    if need_with or need_reference:
        model = load_expert()
        with_history = [(encode_sample(tokenizer, s.x, [h.text for h in store.history_for(s)], s.y, prompt)
                         .prompt_with, entries[s.id]["token_ids"]) for s in need_with]
        for sample, probs in zip(need_with, compute_label_probs(model, with_history, tokenizer.pad_token_id,
                                                                batch_size), strict=True):
            entries[sample.id]["prob_with"] = probs
        variants = [(s, encode_with_reference(store, tokenizer, prompt, s, h)) for s in need_reference
                    for h in references.histories(store, s)]
        fresh = compute_label_probs(model, [(e.prompt_without, e.response) for _, e in variants],
                                    tokenizer.pad_token_id, batch_size)
        by_sample: dict[str, list[list[float]]] = {}
        for (sample, _), probs in zip(variants, fresh, strict=True):
            by_sample.setdefault(sample.id, []).append(probs)
        for sample_id, found in by_sample.items():  # the mean over the donors (one history otherwise)
            entries[sample_id]["reference"][references.kind] = [sum(c) / len(found) for c in zip(*found, strict=True)]
        cache.write("samples", entries)
        log.info("computed expert token probabilities (%s) for %d samples of %s", references.kind,
                 len(need_reference), store.user_id)
    return {s.id: TokenProbs(entries[s.id]["token_ids"], entries[s.id]["prob_with"],
                             entries[s.id]["reference"][references.kind]) for s in samples}
