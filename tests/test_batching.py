"""Batches: left padding that keeps positions, and labels on the response tokens only, aligned
in both prompt variants."""

import torch

from shared.batching import collate
from shared.config import PromptConfig
from shared.losses import IGNORE_INDEX
from shared.prompts import encode_sample


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


def test_left_padding_keeps_positions_of_real_tokens(tokenizer):
    config = PromptConfig()
    short = encode_sample(tokenizer, "x", [], "y", config)
    long = encode_sample(tokenizer, "a much longer context here", ["history"], "y", config)
    side = collate([short, long], tokenizer.pad_token_id).with_history
    for row in range(2):
        real = side.attention_mask[row].bool()
        assert side.position_ids[row][real].tolist() == list(range(int(real.sum())))
