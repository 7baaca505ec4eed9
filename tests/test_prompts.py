"""Prompt building: history order and budget, response-only labels, aligned variants."""

import torch

from shared.batching import collate
from shared.losses import IGNORE_INDEX
from shared.prompts import CONTEXT_HEADER, HISTORY_HEADER, PromptConfig, cut_history, encode_sample, render_prompt


def test_history_items_appear_most_recent_first_and_vanish_without_history(tokenizer):
    config = PromptConfig()
    prompt = render_prompt(tokenizer, "cue", ["newest line", "older line"], config)
    assert prompt.index("newest line") < prompt.index("older line") < prompt.index(CONTEXT_HEADER)
    bare = render_prompt(tokenizer, "cue", None, config)
    assert HISTORY_HEADER not in bare and "newest" not in bare and bare.startswith(CONTEXT_HEADER)


def test_history_is_cut_to_the_token_budget(tokenizer):
    items = [f"line number {i} of a long speech about the king and the crown" for i in range(50)]
    kept = cut_history(tokenizer, items, budget=40)
    assert 1 <= len(kept) < 50 and kept[0] == items[0]
    assert sum(len(tokenizer(k, add_special_tokens=False)["input_ids"]) for k in kept) <= 40


def test_both_variants_end_in_the_same_response_tokens_with_labels_on_the_response_only(tokenizer):
    config = PromptConfig(history_tokens=64, context_tokens=16, response_tokens=24)
    a = encode_sample(tokenizer, "What say you?", ["I say nothing.", "Speak, my lord."], "My lord, I know not.", config)
    b = encode_sample(tokenizer, "Go hence.", [], "Farewell.", config)
    assert a.response[-1] == tokenizer.eos_token_id and len(a.prompt_with) > len(a.prompt_without)
    batch = collate([a, b], tokenizer.pad_token_id)
    for side in (batch.with_history, batch.without_history):
        r = batch.response_length
        ids, labels = side.input_ids[:, -r:], batch.labels
        assert torch.equal(torch.where(labels == IGNORE_INDEX, ids, labels), ids)
    # Labels cover exactly the response tokens of each row.
    assert (batch.labels != IGNORE_INDEX).sum(dim=1).tolist() == [len(a.response), len(b.response)]


def test_truncated_response_gets_no_end_marker(tokenizer):
    config = PromptConfig(response_tokens=4)
    encoded = encode_sample(tokenizer, "x", [], "a rather long response that will not fit in four tokens", config)
    assert len(encoded.response) == 4 and tokenizer.eos_token_id not in encoded.response


def test_left_padding_keeps_positions_of_real_tokens(tokenizer):
    config = PromptConfig()
    short = encode_sample(tokenizer, "x", [], "y", config)
    long = encode_sample(tokenizer, "a much longer context here", ["history"], "y", config)
    side = collate([short, long], tokenizer.pad_token_id).with_history
    for row in range(2):
        real = side.attention_mask[row].bool()
        assert side.position_ids[row][real].tolist() == list(range(int(real.sum())))


def test_chat_template_is_used_when_the_tokenizer_has_one(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path) if tokenizer.name_or_path else tokenizer
    tokenizer.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    prompt = render_prompt(tokenizer, "the cue", ["an old line"], PromptConfig())
    assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>") and "an old line" in prompt
