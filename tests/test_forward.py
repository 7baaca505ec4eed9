"""Running a model on response positions only: the same logits as a full forward, and the
paired pass the same as the two passes."""

import pytest
import torch

from shared.adapters import AdapterHost
from shared.batching import collate
from shared.config import BaseSpec, LoraSettings
from shared.forward import (
    lm_head_weight,
    paired_response_logits,
    response_hidden,
    response_label_log_probs,
    response_logits,
)
from shared.loading import load_base
from shared.losses import token_log_probs
from tests.samples import train_examples, uneven_batch


def test_response_logits_equal_the_full_forward_at_response_positions(model_dir, tokenizer):
    model, _ = load_base(BaseSpec(str(model_dir), quantization="none", device="cpu"))
    encoded = [e.encoded for e in train_examples(tokenizer, 3)]
    batch = collate(encoded, tokenizer.pad_token_id)
    kept = response_logits(model, batch.with_history, batch.response_length)
    for row, sample in enumerate(encoded):
        ids = torch.tensor([sample.prompt_with + sample.response])
        full = model(input_ids=ids).logits[0]
        n = len(sample.response)
        # Logits at positions T-n-1 .. T-2 predict the n response tokens.
        torch.testing.assert_close(kept[row, -n:], full[-n - 1 : -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_paired_pass_equals_the_two_passes(model_dir, tokenizer, attention):
    model, _ = load_base(BaseSpec(str(model_dir), quantization="nf4", device="cpu"))
    model.config._attn_implementation = attention
    host = AdapterHost(model, LoraSettings(lora_r=4, lora_alpha=8))
    peft_model = host.new("a", seed=1)
    with torch.no_grad():  # a LoRA with an effect, so the adapter's path is compared as well
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    batch = uneven_batch(tokenizer)
    assert len(set(batch.with_history.attention_mask.sum(1).tolist())) == 3  # three lengths: padding in play
    paired_with, paired_without = paired_response_logits(peft_model, batch)
    torch.testing.assert_close(paired_with, response_logits(peft_model, batch.with_history, batch.response_length),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(paired_without,
                               response_logits(peft_model, batch.without_history, batch.response_length),
                               rtol=1e-4, atol=1e-4)


def test_the_heads_weight_applied_to_the_response_hidden_states_gives_the_response_logits(model_dir, tokenizer):
    model, _ = load_base(BaseSpec(str(model_dir), quantization="nf4", device="cpu"))
    peft_model = AdapterHost(model, LoraSettings(lora_r=4, lora_alpha=8)).new("a", seed=1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
        batch = uneven_batch(tokenizer)
        head = lm_head_weight(peft_model)
        assert head is not None
        want = response_logits(peft_model, batch.with_history, batch.response_length)
        torch.testing.assert_close(response_hidden(peft_model, batch.with_history, batch.response_length) @ head.T,
                                   want, rtol=1e-4, atol=1e-4)
        # The label log-probabilities, a few tokens at a time, as from the full logits.
        torch.testing.assert_close(response_label_log_probs(peft_model, batch.with_history, batch.labels,
                                                            chunk_tokens=5),
                                   token_log_probs(want, batch.labels), rtol=1e-4, atol=1e-5)


def test_a_head_with_a_bias_is_not_folded_into_the_loss(model_dir):
    model, _ = load_base(BaseSpec(str(model_dir), quantization="none", device="cpu"))
    head = model.get_output_embeddings()
    model.set_output_embeddings(torch.nn.Linear(head.in_features, head.out_features, bias=True))
    assert lm_head_weight(model) is None
