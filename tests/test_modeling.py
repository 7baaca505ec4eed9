"""The 4-bit CPU path, response-position logits and adapter round trips through plain PEFT."""

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from transformers import Qwen2Config, Qwen2ForCausalLM

from client.trainer import TrainConfig, TrainExample, step_backward, train_adapter
from shared.adapters import ADAPTER_FILES, AdapterHost, LoraSettings, adapter_digest, save_adapter
from shared.batching import collate
from shared.modeling import BaseSpec, load_base, paired_response_logits, response_logits
from shared.prompts import PromptConfig, encode_sample

CONFIG = PromptConfig(history_tokens=48, context_tokens=16, response_tokens=16)


def _examples(tokenizer, n=6):
    return [
        TrainExample(encode_sample(tokenizer, f"cue {i}", [f"my old line {i}", "and older"], f"my reply {i}", CONFIG))
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def nf4_base(model_dir):
    return load_base(BaseSpec(str(model_dir), quantization="nf4", device="cpu"))


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


def test_response_logits_equal_the_full_forward_at_response_positions(model_dir, tokenizer):
    model, _ = load_base(BaseSpec(str(model_dir), quantization="none", device="cpu"))
    encoded = [e.encoded for e in _examples(tokenizer, 3)]
    batch = collate(encoded, tokenizer.pad_token_id)
    kept = response_logits(model, batch.with_history, batch.response_length)
    for row, sample in enumerate(encoded):
        ids = torch.tensor([sample.prompt_with + sample.response])
        full = model(input_ids=ids).logits[0]
        n = len(sample.response)
        # Logits at positions T-n-1 .. T-2 predict the n response tokens.
        torch.testing.assert_close(kept[row, -n:], full[-n - 1 : -1], rtol=1e-4, atol=1e-4)


def _uneven_batch(tokenizer):
    """Samples of different history, context and response lengths, so both variants pad."""
    encoded = []
    for i in range(3):
        history = [f"my old line {i} " * (i + 1), "and older"][: i + 1]
        encoded.append(encode_sample(tokenizer, f"cue {i} " * (2 - i + 1), history, "my reply " * (i + 1), CONFIG))
    return collate(encoded, tokenizer.pad_token_id)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_paired_pass_equals_the_two_passes(model_dir, tokenizer, attention):
    model, _ = load_base(BaseSpec(str(model_dir), quantization="nf4", device="cpu"))
    model.config._attn_implementation = attention
    host = AdapterHost(model, LoraSettings(r=4, alpha=8))
    peft_model = host.new("a", seed=1)
    with torch.no_grad():  # a LoRA with an effect, so the adapter's path is compared as well
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    batch = _uneven_batch(tokenizer)
    assert len(set(batch.with_history.attention_mask.sum(1).tolist())) == 3  # three lengths: padding in play
    paired_with, paired_without = paired_response_logits(peft_model, batch)
    torch.testing.assert_close(paired_with, response_logits(peft_model, batch.with_history, batch.response_length),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(paired_without,
                               response_logits(peft_model, batch.without_history, batch.response_length),
                               rtol=1e-4, atol=1e-4)


def test_a_paired_step_gives_the_two_pass_gradients(model_dir, tokenizer):
    # Float32 throughout (the 4-bit layers compute in bf16), so that only the layout differs.
    model, _ = load_base(BaseSpec(str(model_dir), quantization="none", device="cpu"))
    peft_model = AdapterHost(model, LoraSettings(r=4, alpha=8)).new("a", seed=1)
    batch = _uneven_batch(tokenizer)
    probs = (torch.rand(batch.labels.shape), torch.rand(batch.labels.shape))
    results = {}
    for paired in (True, False):
        peft_model.zero_grad(set_to_none=True)
        total, _, l_p = step_backward(peft_model, batch, TrainConfig(method="nextquill", paired_pass=paired), probs)
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
        results[paired] = (total, l_p, grads)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-4, atol=1e-5)
    assert results[True][2].keys() == results[False][2].keys() and results[True][2]
    for name, grad in results[True][2].items():
        torch.testing.assert_close(grad, results[False][2][name], rtol=1e-4, atol=1e-7)


def test_qlora_trains_on_cpu_and_round_trips_through_plain_peft(nf4_base, tokenizer, tmp_path):
    model, _ = nf4_base
    host = AdapterHost(model, LoraSettings(r=4, alpha=8))
    peft_model = host.new("local", seed=0)
    before = {k: v.clone() for k, v in peft_model.named_parameters() if v.requires_grad}
    report = train_adapter(peft_model, _examples(tokenizer), tokenizer.pad_token_id,
                           TrainConfig(method="mce-only", max_steps=3, batch_size=3), progress=False)
    assert report.steps == 3 and all(torch.isfinite(torch.tensor(report.loss)))
    after = dict(peft_model.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before)

    digest = save_adapter(peft_model, tmp_path / "adapter", adapter_name="local")
    assert all((tmp_path / "adapter" / f).is_file() for f in ADAPTER_FILES)
    assert digest == adapter_digest(tmp_path / "adapter")

    fresh, _ = load_base(BaseSpec(model.config._name_or_path, quantization="nf4", device="cpu"))
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    saved = get_peft_model_state_dict(peft_model, adapter_name="local")
    restored = get_peft_model_state_dict(loaded)
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k].float(), restored[k].float()) for k in saved)
    batch = collate([e.encoded for e in _examples(tokenizer, 2)], tokenizer.pad_token_id)
    with torch.no_grad():
        want = response_logits(peft_model, batch.with_history, batch.response_length).float()
        got = response_logits(loaded, batch.with_history, batch.response_length).float()
    # The trainer keeps norms in float32 (k-bit preparation); a plain load computes in bf16.
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_a_new_adapter_starts_from_zero_effect_and_is_deterministic(nf4_base, tokenizer):
    model, _ = nf4_base
    host = AdapterHost(model, LoraSettings(r=4, alpha=8))
    first = {k: v.clone() for k, v in host.new("a", seed=3).named_parameters() if ".a." in k}
    second = {k.replace(".b.", ".a."): v for k, v in host.new("b", seed=3).named_parameters() if ".b." in k}
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert all(v.abs().sum() == 0 for k, v in first.items() if "lora_B" in k)


def test_renewing_an_adapter_reinitialises_it_in_place(nf4_base, tokenizer):
    """A simulated client per user renews the same adapters: same modules, the seed's values."""
    model, _ = nf4_base
    host = AdapterHost(model, LoraSettings(r=4, alpha=8))
    peft_model = host.new("shared", "personal", seed=5)
    ours = (".shared.", ".personal.")  # the module-scoped base may carry other tests' adapters
    fresh = {k: v.clone() for k, v in peft_model.named_parameters() if any(n in k for n in ours)}
    modules = {name: id(m) for name, m in peft_model.named_modules() if "lora_A" in name}
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if name in fresh:
                param.add_(1.0)  # a user's trained values
    renewed = host.new("shared", "personal", seed=5)
    assert {name: id(m) for name, m in renewed.named_modules() if "lora_A" in name} == modules
    current = dict(renewed.named_parameters())
    assert fresh and all(torch.equal(current[k], v) for k, v in fresh.items())
    assert all(current[k].requires_grad for k in fresh)


def test_training_still_works_after_evaluating_the_4bit_base(model_dir, tokenizer):
    from client.evaluation import GenerationSettings, generate

    model, _ = load_base(BaseSpec(str(model_dir), quantization="nf4", device="cpu"))
    host = AdapterHost(model, LoraSettings(r=4, alpha=8))
    peft_model = host.new("local")
    with peft_model.disable_adapter():
        generate(peft_model, tokenizer, ["### Context\nhello\n### Response\n"], GenerationSettings(max_new_tokens=3),
                 CONFIG)
    report = train_adapter(peft_model, _examples(tokenizer), tokenizer.pad_token_id,
                           TrainConfig(method="sft", max_steps=1, batch_size=3), progress=False)
    assert report.steps == 1


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
