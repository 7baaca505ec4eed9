"""Evaluation's generation: batched greedy decoding gives what one prompt at a time gives."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from shared.config import PromptConfig

CONFIG = PromptConfig(history_tokens=48, context_tokens=16, response_tokens=16)


def test_batched_greedy_generation_matches_one_prompt_at_a_time(tokenizer):
    from client.evaluation import GenerationSettings, generate

    # A sharply initialised random model, so the continuation depends on the context and on
    # the positions (a default-initialised one emits newlines whatever it is given).
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    model = Qwen2ForCausalLM(config).eval()
    prompts = ["### Context\nWho goes there?\n### Response\n",
               "### History\nA long line of history, my good lord, to make this prompt longer.\n"
               "### Context\nStand.\n### Response\n"]
    settings = GenerationSettings(max_new_tokens=8)
    batched = generate(model, tokenizer, prompts, settings, CONFIG)
    alone = [generate(model, tokenizer, [p], settings, CONFIG)[0] for p in prompts]
    assert batched == alone and batched[0] != batched[1]
