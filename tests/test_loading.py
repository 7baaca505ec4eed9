"""Loading a base: the 4-bit CPU path, clear errors for a missing model, a 4-bit base that
still trains after it has been evaluated, and the quantized copy a reload reads."""

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


def test_a_reload_reads_the_kept_4bit_copy_and_computes_the_same_logits(model_dir, tmp_path, monkeypatch):
    import torch
    from transformers import BitsAndBytesConfig

    from shared import loading

    monkeypatch.setenv("NEXTQUILL_HOME", str(tmp_path / "home"))
    spec = BaseSpec(str(model_dir), quantization="nf4", device="cpu")
    quantized, _ = load_base(spec)
    (copy,) = (tmp_path / "home" / loading.QUANTIZED_DIR).glob("*/config.json")
    calls, original = [], loading._from_pretrained
    monkeypatch.setattr(loading, "_from_pretrained", lambda path, **o: calls.append((path, o)) or original(path, **o))
    reloaded, _ = load_base(spec)
    assert [(path, "quantization_config" in options) for path, options in calls] == [(copy.parent, False)]
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert reloaded.name_or_path == reloaded.config._name_or_path == str(model_dir)  # what PEFT records
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        assert torch.equal(quantized(ids).logits, reloaded(ids).logits)
    # Another compute dtype, another copy; a broken copy is quantized again and replaced.
    bfloat16 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    assert loading.quantized_copy(model_dir, bfloat16, torch.device("cpu")) != copy.parent
    (copy.parent / "model.safetensors").write_bytes(b"broken")
    calls.clear()
    again, _ = load_base(spec)
    assert [path for path, _ in calls] == [copy.parent, model_dir]
    with torch.no_grad():
        assert torch.equal(quantized(ids).logits, again(ids).logits)
    assert (copy.parent / "model.safetensors").stat().st_size > 6


def test_without_the_quantized_cache_nothing_is_kept(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NEXTQUILL_HOME", str(tmp_path / "home"))
    load_base(BaseSpec(str(model_dir), quantization="nf4", device="cpu", quantized_cache=False))
    assert not (tmp_path / "home").exists()
