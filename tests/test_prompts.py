"""Prompt building: history order and budget, the end marker, the chat template."""


from shared.config import PromptConfig
from shared.prompts import CONTEXT_HEADER, HISTORY_HEADER, cut_history, encode_sample, render_prompt


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


def test_truncated_response_gets_no_end_marker(tokenizer):
    config = PromptConfig(response_tokens=4)
    encoded = encode_sample(tokenizer, "x", [], "a rather long response that will not fit in four tokens", config)
    assert len(encoded.response) == 4 and tokenizer.eos_token_id not in encoded.response


def test_chat_template_is_used_when_the_tokenizer_has_one(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path) if tokenizer.name_or_path else tokenizer
    tokenizer.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    prompt = render_prompt(tokenizer, "the cue", ["an old line"], PromptConfig())
    assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>") and "an old line" in prompt


def test_the_empty_history_can_be_written_as_none_like_the_authors_data_code(tokenizer):
    config = PromptConfig(empty_history="none", use_chat_template=False)
    bare = render_prompt(tokenizer, "cue", None, config)
    assert bare.startswith(HISTORY_HEADER + "None\n") and bare.endswith("cue\n### Response\n")
    assert render_prompt(tokenizer, "cue", [], config) == bare  # a user with no history yet reads the same
    assert "None" not in render_prompt(tokenizer, "cue", ["an old line"], config)
    assert HISTORY_HEADER not in render_prompt(tokenizer, "cue", None, PromptConfig(use_chat_template=False))
