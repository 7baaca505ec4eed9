"""The counterfactual history h_ref of a sample, as the device builds it (DESIGN.md, "The three
quantities"). An effect of the history is a difference between the prompt with the user's own
history h and the same prompt with h_ref:

    removed      no history at all (the paper): the prompt of a user-free model
    placeholder  the history block holds the literal None (the authors' dataset code)
    generic      each past item replaced by the expert's own history-free text for that item's
                 input: the same number of texts, of the same kind and on the same topics, by a
                 reference writer, so that only who wrote them changes. Generated once per
                 (expert digest, base, prompt budgets), cached on the device; nothing leaves it.
    donors       other users' histories from the same dataset, at the same position in their
                 time line (simulation only: a device never holds another user's history);
                 several donors, whose probabilities the DCE averages

A past item's input is the context x of the store's sample with the same id (a user's earlier
answer to an earlier context). An item with no such sample (a LaMP profile entry that holds
text only) is replaced by the expert's text for an empty context: still a text of the same
kind in the same place, with nothing of the user's in it.

A store's samples are encoded here too, each with the user's history and with its h_ref
(`encode_store_samples`): the two prompts whose difference every effect measures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from client.derived_cache import DerivedCache
from shared.config import REFERENCES, GenerationSettings, PromptConfig
from shared.prompts import EMPTY_HISTORY_PLACEHOLDER, EncodedSample, encode_sample, render_prompt
from shared.user_store import Sample, UserStore

log = logging.getLogger(__name__)

GENERIC_FORMAT = "nextquill-generic-history/1"
DONORS = 3  # other users whose histories the `donors` reference averages over


@dataclass(frozen=True)
class References:
    """What a device replaces its user's history with: `kind` (one of REFERENCES) and what that
    kind needs, the expert's generic texts by history item id or the donor users' stores."""

    kind: str
    generic: Mapping[str, str] = field(default_factory=dict)
    donors: Sequence[UserStore] = ()

    def __post_init__(self) -> None:
        if self.kind not in REFERENCES:
            raise ValueError(f"the counterfactual history must be one of {list(REFERENCES)}, got {self.kind!r}")
        if self.kind == "donors" and not self.donors:
            raise ValueError("the counterfactual history 'donors' needs other users' stores, which only a "
                             "simulation has (a device holds no other user's history): choose 'generic' on a device")

    def histories(self, store: UserStore, sample: Sample) -> list[list[str] | None]:
        """The reference histories of `sample` (most recent first; None: no history block). One,
        except for `donors`, which gives one per donor."""
        if self.kind == "removed":
            return [None]
        if self.kind == "placeholder":
            return [[EMPTY_HISTORY_PLACEHOLDER]]
        if self.kind == "generic":
            items = store.history_for(sample)
            missing = [item.id for item in items if item.id not in self.generic]
            if missing:
                raise ValueError(f"no generic text for history item {missing[0]!r} of {store.path}")
            return [[self.generic[item.id] for item in items] or None]
        position = [s.id for s in store.samples()].index(sample.id)
        histories: list[list[str] | None] = []
        for donor in self.donors:
            timeline = donor.samples()
            donor_sample = timeline[min(position, len(timeline) - 1)]
            histories.append([item.text for item in donor.history_for(donor_sample)] or None)
        return histories


def donor_stores(stores: Sequence[UserStore], index: int, count: int = DONORS) -> list[UserStore]:
    """The donors of user `index` among `stores` (a simulation's users): the next `count` users
    in a ring, never the user itself."""
    if len(stores) < 2:
        raise ValueError("the counterfactual history 'donors' needs at least two users")
    return [stores[(index + k) % len(stores)] for k in range(1, min(count, len(stores) - 1) + 1)]


def item_inputs(store: UserStore) -> dict[str, str]:
    """The input each history item answered: the context of the store's sample with the same
    id, or "" (see the module docstring)."""
    contexts = {s.id: s.x for s in store.samples()}
    return {item.id: contexts.get(item.id, "") for item in store.history()}


def generic_texts(
    store: UserStore,
    load_expert: Callable[[], torch.nn.Module],
    tokenizer: PreTrainedTokenizerBase,
    expert_digest: str,
    base_id: str,
    prompt: PromptConfig,
) -> dict[str, str]:
    """The expert's history-free text for every history item's input (item id -> text), from
    the store's cache when it holds this (expert, base, prompt), else generated greedily with
    the model `load_expert()` returns and cached; an earlier expert's cache is removed."""
    from client.evaluation import generate

    inputs = item_inputs(store)
    cache = DerivedCache.of(store, "generic_history", GENERIC_FORMAT, expert_digest, base_id, prompt)
    cached = cache.read("texts")
    missing = sorted({x for item_id, x in inputs.items() if item_id not in cached})
    if missing:
        prompts = [render_prompt(tokenizer, x, None, prompt) for x in missing]
        texts = generate(load_expert(), tokenizer, prompts, GenerationSettings(), prompt)
        # An empty generation would drop the item from the prompt's history block: keep a mark.
        by_input = {x: text or "..." for x, text in zip(missing, texts, strict=True)}
        cached.update({item_id: by_input[x] for item_id, x in inputs.items() if item_id not in cached})
        cache.write("texts", cached)
        log.info("generated %d generic history texts for %s", len(missing), store.user_id)
    return {item_id: cached[item_id] for item_id in inputs}


def encode_store_samples(
    store: UserStore, tokenizer: PreTrainedTokenizerBase, prompt: PromptConfig, split: str | None = "train",
    references: References | None = None,
) -> list[tuple[Sample, EncodedSample]]:
    """Every sample of `split` encoded with the user's history and with its (first) counterfactual
    history (default: the history removed)."""
    references = references or References("removed")
    return [(sample, encode_with_reference(store, tokenizer, prompt, sample,
                                           references.histories(store, sample)[0]))
            for sample in store.samples(split)]


def encode_with_reference(store: UserStore, tokenizer: PreTrainedTokenizerBase, prompt: PromptConfig,
                          sample: Sample, reference: list[str] | None) -> EncodedSample:
    """One sample encoded with the user's history and with `reference` in its place."""
    return encode_sample(tokenizer, sample.x, [h.text for h in store.history_for(sample)], sample.y, prompt,
                         reference=reference)
