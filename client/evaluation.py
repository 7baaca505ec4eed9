"""Evaluation of a personalized model on a user's held-out samples: greedy generation scored
with ROUGE-1 / ROUGE-L / BLEU, per-token NLL of the targets, and history sensitivity."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict

import torch
from transformers import PreTrainedTokenizerBase

from shared import corpus
from shared.batching import left_pad
from shared.config import GenerationSettings, PromptConfig
from shared.forward import compute_autocast, model_device
from shared.metrics import bleu, meteor, rouge
from shared.prompts import render_prompt
from shared.scoring import ScoringExample, history_nll
from shared.user_store import UserStore


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    settings: GenerationSettings,
    prompt_config: PromptConfig,
) -> list[str]:
    """Continue each prompt text; returns the generated texts (special tokens removed)."""
    device = model_device(model)
    outputs: list[str] = []
    model.eval()
    for start in range(0, len(prompts), settings.batch_size):
        chunk = prompts[start : start + settings.batch_size]
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        side = left_pad(ids, tokenizer.pad_token_id).to(device)
        with compute_autocast(model):
            generated = model.generate(
                input_ids=side.input_ids,
                attention_mask=side.attention_mask,
                max_new_tokens=settings.max_new_tokens or prompt_config.response_tokens,
                do_sample=settings.do_sample,
                num_beams=settings.num_beams,
                repetition_penalty=settings.repetition_penalty,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = generated[:, side.input_ids.shape[1] :]
        outputs += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return outputs


def donor_history(store: UserStore) -> list[str]:
    """Another user's history as a donor for history sensitivity: the history its latest
    sample sees, most recent first."""
    latest = store.samples()[-1]
    return [item.text for item in store.history_for(latest)]


# History sensitivity on a device needs "another user's history", which a device never
# holds: the donor is public text instead, a speaker of the base plays (never a user).
_DONOR_SPEECHES = 12


@functools.cache
def public_donor_history() -> tuple[str, ...]:
    """The latest speeches (most recent first) of the speaker with the most speeches in the
    first base play: the same public donor history on every device."""
    by_speaker = corpus.speeches_by_speaker(corpus.base_plays()[0])
    speaker = max(sorted(by_speaker), key=lambda name: len(by_speaker[name]))
    return tuple(s.text for s in reversed(by_speaker[speaker][-_DONOR_SPEECHES:]))


def evaluate_user(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    store: UserStore,
    uses_history: bool,
    prompt_config: PromptConfig,
    other_history: Sequence[str] | None,
    generation: GenerationSettings | None = None,
) -> dict:
    """Metrics of `model` on the store's test samples. `uses_history` picks the prompt the
    method was trained with; `other_history` (another user's) enables history sensitivity."""
    generation = generation or GenerationSettings()
    samples = store.samples("test")
    if not samples:
        raise ValueError(f"user store {store.path} has no test samples to evaluate on")
    histories = [[h.text for h in store.history_for(s)] for s in samples]
    prompts = [
        render_prompt(tokenizer, s.x, h if uses_history else None, prompt_config)
        for s, h in zip(samples, histories, strict=True)
    ]
    predictions = generate(model, tokenizer, prompts, generation, prompt_config)
    references = [s.y for s in samples]
    scored = history_nll(
        model,
        tokenizer,
        [ScoringExample(s.x, s.y, h, other_history or []) for s, h in zip(samples, histories, strict=True)],
        prompt_config,
    )
    row = {
        "user_id": store.user_id,
        "test_samples": len(samples),
        **rouge(predictions, references),
        "bleu": bleu(predictions, references),
        "meteor": meteor(predictions, references),
        "nll": scored["nll_own_history"] if uses_history else scored["nll_none_history"],
        "nll_own_history": scored["nll_own_history"],
        "nll_no_history": scored["nll_none_history"],
        "history_sensitivity": scored["history_sensitivity"] if other_history else float("nan"),
        "generation": asdict(generation),
        "examples": [
            {"sample_id": s.id, "reference": s.y, "prediction": p} for s, p in zip(samples, predictions, strict=True)
        ],
    }
    return row
