"""The local trainer: the step each method's row picks (passes, token weights, loss), chosen once
per run; the paired, lean, fused and compiled variants give the two passes' gradients; the
loop's refusals."""

import math

import pytest
import torch

from client.trainer import (
    TrainExample,
    choose_forward,
    choose_step,
    history_pass,
    lean_two_passes,
    no_history_pass,
    paired_passes,
    right_aligned,
    train_adapter,
    two_passes,
)
from shared.adapters import AdapterHost
from shared.config import BaseSpec, LoraSettings, TrainConfig, WeightScheme
from shared.forward import _has_cpp_compiler, compiled_decoder_layers, response_logits
from shared.loading import load_base
from shared.losses import nextquill_loss, token_probabilities, token_weights
from shared.methods import METHODS
from shared.prompts import encode_sample
from tests.samples import PROMPT, train_examples, uneven_batch


@pytest.fixture(scope="module")
def float_model(model_dir):
    # Float32 throughout (the 4-bit layers compute in bf16), so that only the layout differs.
    model, _ = load_base(BaseSpec(str(model_dir), quantization="none", device="cpu"))
    return AdapterHost(model, LoraSettings(lora_r=4, lora_alpha=8)).new("trained", seed=1)


def _gradients(model, step, batch, probs):
    model.zero_grad(set_to_none=True)
    total, l_n, l_p = step(batch, probs)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, l_n, l_p, grads


@pytest.mark.parametrize(
    ("method", "settings", "forward"),
    [
        ("sft", {}, no_history_pass),
        ("context-sft", {}, history_pass),
        ("dce-only", {}, history_pass),
        ("nextquill", {}, two_passes),
        ("mce-only", {}, two_passes),
        ("nextquill-authors", {}, two_passes),
        ("nextquill", {"paired_pass": True}, paired_passes),
        ("nextquill", {"lean_memory": True}, lean_two_passes),
        ("nextquill", {"lean_memory": True, "paired_pass": True}, lean_two_passes),
        ("context-sft", {"paired_pass": True, "lean_memory": True}, history_pass),  # one pass: nothing to pair
    ],
)
def test_each_method_row_picks_its_forward_once(float_model, method, settings, forward):
    assert choose_forward(TrainConfig(method=method, **settings), float_model) is forward


def test_the_step_is_the_nextquill_loss_of_its_passes_and_weights(float_model, tokenizer):
    batch = uneven_batch(tokenizer)
    probs = (torch.rand(batch.labels.shape), torch.rand(batch.labels.shape))
    scheme = WeightScheme(delta=0.1)
    config = TrainConfig(method="nextquill", alpha=0.3, weight_scheme=scheme)
    total, l_n, l_p, _ = _gradients(float_model, choose_step(config, float_model), batch, probs)
    with torch.no_grad():
        with_history = response_logits(float_model, batch.with_history, batch.response_length).flatten(0, 1)
        without = response_logits(float_model, batch.without_history, batch.response_length).flatten(0, 1)
        weights = token_weights(scheme, probs[0].flatten(), probs[1].flatten())
        want = nextquill_loss(with_history, without, batch.labels.flatten(), weights, alpha=0.3)
    for got, expected in zip((total, l_n, l_p), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_the_authors_variant_weights_by_the_trained_model_and_leaves_l_p_unweighted(float_model, tokenizer):
    batch = uneven_batch(tokenizer)
    total, l_n, l_p, _ = _gradients(float_model, choose_step(TrainConfig(method="nextquill-authors"), float_model),
                                    batch, None)
    labels = batch.labels.flatten()
    with torch.no_grad():
        with_history = response_logits(float_model, batch.with_history, batch.response_length).flatten(0, 1)
        without = response_logits(float_model, batch.without_history, batch.response_length).flatten(0, 1)
        weights = token_weights(WeightScheme(), token_probabilities(with_history, labels),
                                token_probabilities(without, labels))
        want = nextquill_loss(with_history, without, labels, weights, alpha=0.1, weighted_alignment=False)
    for got, expected in zip((total, l_n, l_p), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["sft", "context-sft", "mce-only"])
def test_uniform_methods_train_on_the_plain_mean_and_align_only_when_their_row_says(float_model, tokenizer, method):
    batch = uneven_batch(tokenizer)
    total, l_n, l_p, _ = _gradients(float_model, choose_step(TrainConfig(method=method), float_model), batch, None)
    if METHODS[method].aligns_effects:
        assert l_p > 0 and torch.isclose(total, l_n + 0.1 * l_p)
    else:
        assert l_p == 0 and torch.equal(total, l_n)


def test_history_dropout_drops_the_history_in_that_fraction_of_steps(float_model, tokenizer):
    batch = uneven_batch(tokenizer)
    with_history, without = (float(_gradients(float_model, choose_step(TrainConfig(method=m), float_model), batch,
                                               None)[1]) for m in ("context-sft", "sft"))

    def losses() -> list[float]:
        step = choose_step(TrainConfig(method="context-sft", history_dropout=0.5, seed=3), float_model)
        return [float(step(batch)[1]) for _ in range(16)]

    first = losses()
    assert all(math.isclose(x, with_history, rel_tol=1e-5) or math.isclose(x, without, rel_tol=1e-5) for x in first)
    assert 3 <= sum(math.isclose(x, without, rel_tol=1e-5) for x in first) <= 13  # about half of the steps
    assert losses() == pytest.approx(first, rel=1e-5)  # the same steps under the same seed
    float_model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="history_dropout applies"):
        TrainConfig(method="nextquill", history_dropout=0.5)


@pytest.mark.parametrize("variant", [{"paired_pass": True}, {"lean_memory": True}])
@pytest.mark.parametrize("method", ["nextquill", "mce-only"])
def test_paired_and_lean_steps_give_the_two_pass_gradients(float_model, tokenizer, method, variant):
    batch = uneven_batch(tokenizer)
    probs = (torch.rand(batch.labels.shape), torch.rand(batch.labels.shape))
    plain = _gradients(float_model, choose_step(TrainConfig(method=method), float_model), batch, probs)
    other = _gradients(float_model, choose_step(TrainConfig(method=method, **variant), float_model), batch, probs)
    assert plain[2] > 0
    for got, want in zip(other[:3], plain[:3], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert other[3].keys() == plain[3].keys() and plain[3]
    for name, grad in plain[3].items():
        torch.testing.assert_close(other[3][name], grad, rtol=1e-4, atol=1e-7)


def test_lean_memory_refuses_a_lora_with_dropout(model_dir):
    model, _ = load_base(BaseSpec(str(model_dir), quantization="none", device="cpu"))
    dropping = AdapterHost(model, LoraSettings(lora_r=4, lora_alpha=8, lora_dropout=0.1)).new("d", seed=0)
    with pytest.raises(ValueError, match="needs it deterministic"):
        choose_step(TrainConfig(method="nextquill", lean_memory=True), dropping)


def test_right_aligned_puts_each_rows_values_at_its_end():
    torch.testing.assert_close(right_aligned([[0.5], [0.1, 0.2], []], 3),
                               torch.tensor([[0, 0, 0.5], [0, 0.1, 0.2], [0, 0, 0]]))


def test_train_adapter_refuses_what_it_cannot_train(float_model, tokenizer):
    example = TrainExample(encode_sample(tokenizer, "cue", ["old"], "reply", PROMPT))
    with pytest.raises(ValueError, match="no training examples"):
        train_adapter(float_model, [], tokenizer.pad_token_id, TrainConfig(method="sft"), progress=False)
    with pytest.raises(ValueError, match="needs the expert's token probabilities"):
        train_adapter(float_model, [example], tokenizer.pad_token_id, TrainConfig(method="nextquill"), progress=False)
    report = train_adapter(float_model, [example] * 3, tokenizer.pad_token_id,
                           TrainConfig(method="nextquill-authors", max_steps=2, batch_size=2), progress=False)
    assert report.steps == 2 and report.examples == 4 and all(l_p > 0 for l_p in report.l_p)


@pytest.mark.parametrize("method", ["nextquill", "mce-only", "context-sft", "sft"])
def test_the_fused_loss_gives_the_steps_loss_and_gradients(float_model, tokenizer, method):
    batch = uneven_batch(tokenizer)
    probs = (torch.rand(batch.labels.shape), torch.rand(batch.labels.shape))
    expert = probs if METHODS[method].needs_expert else None
    want = _gradients(float_model, choose_step(TrainConfig(method=method, alpha=0.3), float_model), batch, expert)
    got = _gradients(float_model, choose_step(TrainConfig(method=method, alpha=0.3, fused_loss=True), float_model),
                     batch, expert)
    for value, expected in zip(got[:3], want[:3], strict=True):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    assert got[3].keys() == want[3].keys() and want[3]
    for name, grad in want[3].items():
        torch.testing.assert_close(got[3][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("settings", [{"paired_pass": True}, {"lean_memory": True}, {"method": "nextquill-authors"},
                                      {"method": "context-sft", "history_dropout": 0.5}])
def test_the_fused_loss_is_refused_beside_a_variant_that_needs_logits(settings):
    with pytest.raises(ValueError, match="fused_loss does not combine"):
        TrainConfig(**{"method": "nextquill", **settings, "fused_loss": True})


needs_cpp_compiler = pytest.mark.skipif(not _has_cpp_compiler(), reason="torch.compile on the CPU needs a C++ compiler")


@needs_cpp_compiler
def test_compiled_layers_give_the_eager_steps_loss_and_gradients_on_4bit_layers(model_dir, tokenizer):
    base, _ = load_base(BaseSpec(str(model_dir), quantization="nf4", device="cpu"))
    model = AdapterHost(base, LoraSettings(lora_r=4, lora_alpha=8)).new("trained", seed=1)
    layers = model.get_base_model().get_decoder().layers
    batch = uneven_batch(tokenizer)
    probs = (torch.rand(batch.labels.shape), torch.rand(batch.labels.shape))
    step = choose_step(TrainConfig(method="nextquill", alpha=0.3), model)
    want = _gradients(model, step, batch, probs)
    with compiled_decoder_layers(model):
        assert all(layer._compiled_call_impl is not None for layer in layers)
        got = _gradients(model, step, batch, probs)
    assert all(layer._compiled_call_impl is None for layer in layers)  # eager again for evaluation
    assert want[2] > 0
    for value, expected in zip(got[:3], want[:3], strict=True):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    assert got[3].keys() == want[3].keys() and want[3]
    for name, grad in want[3].items():
        torch.testing.assert_close(got[3][name], grad, rtol=1e-3, atol=1e-5, msg=name)


@needs_cpp_compiler
def test_training_with_compiled_layers_takes_the_eager_runs_losses(float_model, tokenizer, monkeypatch):
    entered = []

    def recorded(model):
        entered.append(model)
        return compiled_decoder_layers(model)

    monkeypatch.setattr("client.trainer.compiled_decoder_layers", recorded)
    examples = train_examples(tokenizer, n=4)
    settings = {"method": "context-sft", "max_steps": 3, "batch_size": 2, "seed": 3}
    start = {n: p.detach().clone() for n, p in float_model.named_parameters() if p.requires_grad}

    def restart() -> None:
        with torch.no_grad():
            for name, param in float_model.named_parameters():
                if name in start:
                    param.copy_(start[name])

    eager = train_adapter(float_model, examples, tokenizer.pad_token_id, TrainConfig(**settings), progress=False)
    restart()
    compiled = train_adapter(float_model, examples, tokenizer.pad_token_id,
                             TrainConfig(**settings, compile_layers=True), progress=False)
    restart()
    assert entered == [float_model]
    torch.testing.assert_close(compiled.loss[0], eager.loss[0], rtol=1e-5, atol=1e-5)
    # Later steps follow AdamW updates, which scale a near-zero gradient's rounding up to a full step.
    torch.testing.assert_close(torch.tensor(compiled.loss), torch.tensor(eager.loss), rtol=1e-3, atol=1e-4)


def test_compiling_on_the_cpu_without_a_cpp_compiler_says_so(float_model, monkeypatch):
    monkeypatch.setattr("shared.forward.shutil.which", lambda name: None)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"), compiled_decoder_layers(float_model):
        pass
    assert all(layer._compiled_call_impl is None for layer in float_model.get_base_model().get_decoder().layers)
