"""On-device personalization with a resident base: the expert's token weights for a user,
training one adapter on one or more user stores, and evaluating it."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from client.evaluation import evaluate_user
from client.reference import References, donor_stores, encode_store_samples, generic_texts
from client.token_weights import TokenProbs, cached_token_probs, user_weight_scheme
from client.trainer import TrainExample, TrainReport, train_adapter
from shared.adapter_files import adapter_digest
from shared.adapters import AdapterHost, base_fingerprint, check_adapter_base, save_adapter
from shared.config import BaseSpec, GenerationSettings, LoraSettings, PromptConfig, TrainConfig
from shared.loading import load_base, resolve_model_dir
from shared.paths import refuse_to_replace
from shared.prompts import EncodedSample
from shared.split import LOCAL_ADAPTER
from shared.user_store import Sample, UserStore

log = logging.getLogger(__name__)

EXPERT_ADAPTER = "expert"


@dataclass(frozen=True)
class Expert:
    """A frozen expert adapter, identified by its content digest."""

    path: Path
    digest: str

    @classmethod
    def from_dir(cls, path: Path) -> Expert:
        return cls(Path(path), adapter_digest(path))


@dataclass
class Device:
    """What a device holds in memory: the base (with adapters), its tokenizer and identity."""

    host: AdapterHost
    tokenizer: PreTrainedTokenizerBase
    base_id: str
    prompt: PromptConfig

    @classmethod
    def load(cls, base: BaseSpec, lora: LoraSettings, prompt: PromptConfig) -> Device:
        """A device with the base `base` describes loaded and resident (once, however many users,
        rounds or methods it then serves), taking adapters of shape `lora`."""
        model, tokenizer = load_base(base)
        return cls(AdapterHost(model, lora), tokenizer, base_fingerprint(resolve_model_dir(base.model)), prompt)

    def encoded(self, store: UserStore, split: str | None = "train",
                references: References | None = None) -> list[tuple[Sample, EncodedSample]]:
        """The store's samples of `split` encoded with the user's history and with `references`'
        counterfactual history (default: the history removed)."""
        return encode_store_samples(store, self.tokenizer, self.prompt, split, references)

    def references(self, kind: str, store: UserStore, expert: Expert | None,
                   donors: Sequence[UserStore] = ()) -> References:
        """The counterfactual history `kind` for the store's user: 'generic' generates (or reads
        from the store's cache) the expert's texts, 'donors' takes `donors` (simulation only)."""
        if kind == "generic":
            if expert is None:
                raise ValueError("the counterfactual history 'generic' is the expert's text: it needs an expert")
            return References(kind, generic=generic_texts(store, self._expert_loader(expert), self.tokenizer,
                                                          expert.digest, self.base_id, self.prompt))
        return References(kind, donors=tuple(donors) if kind == "donors" else ())

    def _expert_loader(self, expert: Expert) -> Callable[[], torch.nn.Module]:
        return lambda: self.load_adapter(EXPERT_ADAPTER, expert.path)

    def expert_probs(self, store: UserStore, expert: Expert, reference: str = "generic",
                     donors: Sequence[UserStore] = (), split: str | None = "train") -> dict[str, TokenProbs]:
        """The expert's token probabilities for the store's samples of `split` with the user's
        history and with the counterfactual history `reference` (cached on the store by expert
        digest and reference; the expert is loaded only when the cache misses)."""
        references = self.references(reference, store, expert, donors)
        return cached_token_probs(store, self._expert_loader(expert), self.tokenizer, expert.digest, self.base_id,
                                  self.prompt, references, split)

    def load_adapter(self, name: str, adapter_dir: Path) -> torch.nn.Module:
        """Load a saved adapter as `name`, refusing one made for another base."""
        check_adapter_base(adapter_dir, self.base_id)
        return self.host.load(name, adapter_dir)

    def store_examples(self, store: UserStore, config: TrainConfig, expert: Expert | None,
                       donors: Sequence[UserStore] = ()) -> list[TrainExample]:
        """The store's training samples encoded with L_p's counterfactual history, with the
        expert's token probabilities (against the DCE's counterfactual) where the method weighs
        tokens by them."""
        if config.needs_expert and expert is None:
            raise ValueError(f"method {config.method!r} needs an expert adapter (--expert)")
        probs = {}
        if config.spec.needs_expert:
            probs = self.expert_probs(store, expert, config.weight_scheme.dce_reference, donors)
        # Only L_p reads the counterfactual prompt: the other methods never build it from the expert.
        kind = config.mce_reference if config.spec.aligns_effects else "removed"
        encoded = self.encoded(store, references=self.references(kind, store, expert, donors))
        return [TrainExample(sample_encoding, probs.get(sample.id)) for sample, sample_encoding in encoded]

    def examples(self, stores: list[UserStore], config: TrainConfig, expert: Expert | None) -> list[TrainExample]:
        """The pooled training examples of `stores` (for 'donors', each user's donors are the others)."""
        return [e for index, store in enumerate(stores) for e in self.store_examples(
            store, config, expert, donor_stores(stores, index) if len(stores) > 1 else ())]

    def train(
        self,
        stores: list[UserStore],
        config: TrainConfig,
        expert: Expert | None = None,
        save_to: Path | None = None,
        progress: bool = True,
        overwrite: bool = False,
    ) -> TrainReport:
        """Train a fresh adapter on the pooled training samples of `stores`; save it with
        PEFT's format to `save_to` when given (a `save_to` that holds something is refused
        before training, unless `overwrite`)."""
        if save_to is not None:
            refuse_to_replace(save_to, overwrite)
        examples = self.examples(stores, config, expert)
        config = dataclasses.replace(config, weight_scheme=user_weight_scheme(
            config.weight_scheme, [e.expert_probs for e in examples if e.expert_probs is not None]))
        model = self.host.new(LOCAL_ADAPTER, seed=config.seed)
        report = train_adapter(model, examples, self.tokenizer.pad_token_id, config, progress=progress)
        if save_to is not None:
            save_adapter(model, save_to, adapter_name=LOCAL_ADAPTER, overwrite=overwrite, metadata={
                "method": config.method,
                "users": [s.user_id for s in stores],
                "base": self.base_id,
                "expert_digest": expert.digest if expert and config.needs_expert else None,
                "train": asdict(config),
                "prompt": asdict(self.prompt),
                "report": report.summary(),
            })
        return report

    def evaluate(
        self,
        store: UserStore,
        uses_history: bool,
        other_history: list[str] | None,
        adapter: str | None = LOCAL_ADAPTER,
        generation: GenerationSettings | None = None,
    ) -> dict:
        """Evaluate the named adapter (None: the base alone) on the store's test samples."""
        if adapter is None:
            if self.host.model is None:
                return evaluate_user(self.host.base, self.tokenizer, store, uses_history, self.prompt,
                                     other_history, generation)
            with self.host.model.disable_adapter():
                return evaluate_user(self.host.model, self.tokenizer, store, uses_history, self.prompt,
                                     other_history, generation)
        model = self.host.activate(adapter)
        return evaluate_user(model, self.tokenizer, store, uses_history, self.prompt, other_history, generation)
