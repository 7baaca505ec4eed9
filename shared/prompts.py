"""The one place that knows the prompt format.

A sample (x, h, y) becomes two prompts that end in the same response tokens:
  with history:    (x, h, y)      history items most recent first, cut to a token budget
  reference:       (x, h_ref, y)  the same prompt with the counterfactual history in place of
                                  the user's (`client/reference.py`; default: removed)
The response is tokenized on its own and appended to both prompts, so the two
variants are aligned token for token on the response; labels cover the response only.
When the tokenizer has a chat template, the prompt is rendered through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from shared.config import PromptConfig

HISTORY_HEADER = "### History\n"
HISTORY_SEPARATOR = "\n---\n"
CONTEXT_HEADER = "### Context\n"
RESPONSE_HEADER = "### Response\n"
# What the authors' dataset code writes where the history is empty (PromptConfig.empty_history).
EMPTY_HISTORY_PLACEHOLDER = "None"
# Below this many tokens of budget, a truncated history item is noise rather than signal.
_MIN_TRUNCATED_ITEM_TOKENS = 8


@dataclass(frozen=True)
class EncodedSample:
    """Token ids of one sample: two prompts and the response they share. `prompt_without` holds
    the counterfactual history h_ref (none at all, by default)."""

    prompt_with: list[int]
    prompt_without: list[int]
    response: list[int]


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def cut_history(
    tokenizer: PreTrainedTokenizerBase, history: Sequence[str], budget: int
) -> list[str]:
    """Keep history items (most recent first) while they fit in `budget` tokens; the first
    item that does not fit is truncated if enough budget is left, and the rest dropped."""
    kept: list[str] = []
    left = budget
    for item in history:
        ids = _ids(tokenizer, item)
        if len(ids) <= left:
            kept.append(item)
            left -= len(ids) + 2  # the separator costs about two tokens
        else:
            if left >= _MIN_TRUNCATED_ITEM_TOKENS:
                kept.append(tokenizer.decode(ids[:left]))
            break
        if left <= 0:
            break
    return kept


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    x: str,
    history: Sequence[str] | None,
    config: PromptConfig,
) -> str:
    """The prompt text for context `x` and history items (most recent first; None or empty
    for the no-history variant). The response follows it directly."""
    context_ids = _ids(tokenizer, x)
    if len(context_ids) > config.context_tokens:
        x = tokenizer.decode(context_ids[-config.context_tokens :])
    items = cut_history(tokenizer, history, config.history_tokens) if history else []
    if not items and config.empty_history == "none":
        items = [EMPTY_HISTORY_PLACEHOLDER]

    if config.use_chat_template and getattr(tokenizer, "chat_template", None):
        parts = []
        if items:
            parts.append("Earlier texts by this user, most recent first:\n" + "\n---\n".join(items))
        parts.append("Context:\n" + x)
        parts.append("Write this user's next text.")
        messages = [{"role": "user", "content": "\n\n".join(parts)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    history_block = HISTORY_HEADER + HISTORY_SEPARATOR.join(items) + "\n" if items else ""
    return f"{history_block}{CONTEXT_HEADER}{x}\n{RESPONSE_HEADER}"


def encode_response(tokenizer: PreTrainedTokenizerBase, y: str, config: PromptConfig) -> list[int]:
    """Response ids ending with the end-of-sequence token; a response cut to the budget gets
    no end marker (the model must not learn to stop mid-sentence)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; the response needs an end marker")
    ids = _ids(tokenizer, y)
    if len(ids) >= config.response_tokens:
        return ids[: config.response_tokens]
    return ids + [tokenizer.eos_token_id]


def encode_sample(
    tokenizer: PreTrainedTokenizerBase,
    x: str,
    history: Sequence[str],
    y: str,
    config: PromptConfig,
    reference: Sequence[str] | None = None,
) -> EncodedSample:
    """Both prompt variants of (x, h, y) and the shared response ids; `reference` is h_ref (None:
    the history removed), cut to the same budget as h."""
    return EncodedSample(
        prompt_with=_ids(tokenizer, render_prompt(tokenizer, x, history, config)),
        prompt_without=_ids(tokenizer, render_prompt(tokenizer, x, reference, config)),
        response=encode_response(tokenizer, y, config),
    )
