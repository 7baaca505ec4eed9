"""LoRA adapters on a resident 4-bit base: training, a round trip through plain PEFT, and
deterministic (re)initialisation."""

import torch
from peft import PeftModel, get_peft_model_state_dict

from client.trainer import train_adapter
from shared.adapter_files import ADAPTER_FILES, adapter_digest
from shared.adapters import AdapterHost, save_adapter
from shared.batching import collate
from shared.config import BaseSpec, LoraSettings, TrainConfig
from shared.forward import response_logits
from shared.loading import load_base
from tests.samples import train_examples


def test_qlora_trains_on_cpu_and_round_trips_through_plain_peft(nf4_base, tokenizer, tmp_path):
    model, _ = nf4_base
    host = AdapterHost(model, LoraSettings(lora_r=4, lora_alpha=8))
    peft_model = host.new("local", seed=0)
    before = {k: v.clone() for k, v in peft_model.named_parameters() if v.requires_grad}
    report = train_adapter(peft_model, train_examples(tokenizer), tokenizer.pad_token_id,
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
    batch = collate([e.encoded for e in train_examples(tokenizer, 2)], tokenizer.pad_token_id)
    with torch.no_grad():
        want = response_logits(peft_model, batch.with_history, batch.response_length).float()
        got = response_logits(loaded, batch.with_history, batch.response_length).float()
    # The trainer keeps norms in float32 (k-bit preparation); a plain load computes in bf16.
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_a_new_adapter_starts_from_zero_effect_and_is_deterministic(nf4_base, tokenizer):
    model, _ = nf4_base
    host = AdapterHost(model, LoraSettings(lora_r=4, lora_alpha=8))
    first = {k: v.clone() for k, v in host.new("a", seed=3).named_parameters() if ".a." in k}
    second = {k.replace(".b.", ".a."): v for k, v in host.new("b", seed=3).named_parameters() if ".b." in k}
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert all(v.abs().sum() == 0 for k, v in first.items() if "lora_B" in k)


def test_renewing_an_adapter_reinitialises_it_in_place(nf4_base, tokenizer):
    """A simulated client per user renews the same adapters: same modules, the seed's values."""
    model, _ = nf4_base
    host = AdapterHost(model, LoraSettings(lora_r=4, lora_alpha=8))
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
