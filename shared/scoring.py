"""Per-token NLL of targets and history sensitivity, for any model and tokenizer.

History sensitivity of a sample = NLL(y | x, another user's history) - NLL(y | x, own
history), in nats per target token: how much the model's prediction rests on *this*
user's history. Causal preference modeling is meant to widen it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from shared.batching import collate
from shared.config import PromptConfig
from shared.forward import model_device, response_token_nll
from shared.losses import IGNORE_INDEX
from shared.prompts import encode_sample
from shared.user_store import UserStore


@dataclass(frozen=True)
class ScoringExample:
    """A target y in context x, with the user's own history and another user's (both most
    recent first)."""

    x: str
    y: str
    own_history: Sequence[str]
    other_history: Sequence[str]


@torch.no_grad()
def history_nll(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ScoringExample],
    config: PromptConfig,
    batch_size: int = 16,
) -> dict[str, float]:
    """Mean per-token NLL of the targets with the own history, another user's history and no
    history, and the history sensitivity (other - own); nats per target token."""
    totals = {"own": 0.0, "other": 0.0, "none": 0.0}
    tokens = 0
    device = model_device(model)
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc="scoring targets", unit="batch", leave=False, mininterval=5,
                      disable=len(starts) < 4):
        chunk = examples[start : start + batch_size]
        own = [encode_sample(tokenizer, e.x, e.own_history, e.y, config) for e in chunk]
        other = [encode_sample(tokenizer, e.x, e.other_history, e.y, config) for e in chunk]
        own_batch = collate(own, tokenizer.pad_token_id).to(device)
        other_batch = collate(other, tokenizer.pad_token_id).to(device)
        totals["own"] += response_token_nll(model, own_batch, with_history=True).sum().item()
        totals["none"] += response_token_nll(model, own_batch, with_history=False).sum().item()
        totals["other"] += response_token_nll(model, other_batch, with_history=True).sum().item()
        tokens += int((own_batch.labels != IGNORE_INDEX).sum())
    if tokens == 0:
        raise ValueError("no target tokens to score")
    nll = {f"nll_{k}_history": v / tokens for k, v in totals.items()}
    nll["history_sensitivity"] = nll["nll_other_history"] - nll["nll_own_history"]
    nll["target_tokens"] = tokens
    return nll


def store_scoring_examples(stores: Sequence[UserStore], split: str | None = "test") -> list[ScoringExample]:
    """Every user's samples of `split` (None: all of them, in time order) with the user's own
    history and, as the other history, that of the next user's sample at the same position (a
    user from the same data set)."""
    if len(stores) < 2:
        raise ValueError("history sensitivity needs at least two user stores")
    examples = []
    for index, store in enumerate(stores):
        donor = stores[(index + 1) % len(stores)]
        donor_samples = donor.samples(split)
        for position, sample in enumerate(store.samples(split)):
            donor_sample = donor_samples[min(position, len(donor_samples) - 1)]
            examples.append(ScoringExample(
                x=sample.x, y=sample.y, own_history=[h.text for h in store.history_for(sample)],
                other_history=[h.text for h in donor.history_for(donor_sample)],
            ))
    return examples
