"""Loading a base: the 4-bit CPU path, clear errors for a missing model, and a 4-bit base that
still trains after it has been evaluated."""

import bitsandbytes as bnb
import pytest

from client.trainer import train_adapter
from shared.adapters import AdapterHost
from shared.config import BaseSpec, LoraSettings, TrainConfig
from shared.loading import load_base
from tests.samples import PROMPT, train_examples


def test_nf4_base_loads_on_cpu_with_bitsandbytes_4bit_layers(nf4_base):
    model, _ = nf4_base
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested  # double quantization
    assert not any(p.requires_grad for p in model.parameters())


def test_unknown_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not one of tiny, small, smollm2-135m or an existing local model"):
        load_base(BaseSpec(str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_base(BaseSpec(str(tmp_path / "empty")))


def test_training_still_works_after_evaluating_the_4bit_base(model_dir, tokenizer):
    from client.evaluation import generate
    from shared.config import GenerationSettings

    model, _ = load_base(BaseSpec(str(model_dir), quantization="nf4", device="cpu"))
    host = AdapterHost(model, LoraSettings(lora_r=4, lora_alpha=8))
    peft_model = host.new("local")
    with peft_model.disable_adapter():
        generate(peft_model, tokenizer, ["### Context\nhello\n### Response\n"], GenerationSettings(max_new_tokens=3),
                 PROMPT)
    report = train_adapter(peft_model, train_examples(tokenizer), tokenizer.pad_token_id,
                           TrainConfig(method="sft", max_steps=1, batch_size=3), progress=False)
    assert report.steps == 1
