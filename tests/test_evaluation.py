"""Evaluation of a personalized model: batched greedy decoding gives what one prompt at a time
gives; a user's row holds generation metrics, NLL and history sensitivity."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from client.evaluation import donor_history
from shared.config import TrainConfig
from shared.metrics import SCORES
from tests.samples import ONE_STEP, PROMPT


def test_batched_greedy_generation_matches_one_prompt_at_a_time(tokenizer):
    from client.evaluation import generate
    from shared.config import GenerationSettings

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
    batched = generate(model, tokenizer, prompts, settings, PROMPT)
    alone = [generate(model, tokenizer, [p], settings, PROMPT)[0] for p in prompts]
    assert batched == alone and batched[0] != batched[1]


def test_evaluation_reports_generation_metrics_nll_and_history_sensitivity(user_device, user_stores):
    user_device.train([user_stores[0]], TrainConfig(method="context-sft", **ONE_STEP), progress=False)
    row = user_device.evaluate(user_stores[0], uses_history=True, other_history=donor_history(user_stores[1]))
    for key in SCORES:
        assert isinstance(row[key], float) and row[key] == row[key]
    assert row["generation"]["do_sample"] is False
    assert len(row["examples"]) == len(user_stores[0].samples("test"))
