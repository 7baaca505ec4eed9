"""Running a causal LM on response positions only: the logits that predict each sample's
response tokens (the LM head sees those positions alone), NextQuill's two passes as one
forward, and per-token NLL of the responses. Loading a model is `shared.loading`."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import bitsandbytes as bnb
import torch
import torch.nn.functional as F

from shared.batching import PairBatch, SideBatch
from shared.losses import FUSED_CHUNK_TOKENS, token_log_probs


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def compute_autocast(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Mixed precision for a 4-bit base on CUDA: autocast to its compute dtype (bf16).

    PEFT's k-bit preparation keeps norms and embeddings in float32, and the LoRA weights are
    float32; without autocast the hidden states are float32: the 4-bit layers cast their
    input to bf16 themselves, but attention, the LoRA products and the LM head run in
    float32, off the tensor cores' bf16 path. On the CPU, float32 stays (bf16 there is
    slower on most processors)."""
    if model_device(model).type != "cuda":
        return contextlib.nullcontext()
    layer = next((m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)), None)
    if layer is None or layer.compute_dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=layer.compute_dtype)


def response_logits(model: torch.nn.Module, side: SideBatch, response_length: int) -> torch.Tensor:
    """Float32 logits predicting the last `response_length` tokens of each (left-padded)
    row: [B, R, V]. The LM head runs on those R positions only."""
    with compute_autocast(model):
        out = model(
            input_ids=side.input_ids,
            attention_mask=side.attention_mask,
            position_ids=side.position_ids,
            logits_to_keep=response_length + 1,
            use_cache=False,
        )
    return out.logits[:, :-1, :].float()


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (its LoRA layers in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor | None:
    """The LM head's weight W [V, D] when the logits are exactly `hidden @ Wᵀ` (a linear head
    without bias, and no logit soft-capping or scaling), so that a loss may apply it itself;
    None otherwise."""
    inner = _unwrapped(model)
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if getattr(inner.config, "final_logit_softcapping", None) or getattr(inner.config, "logit_scale", None):
        return None
    return head.weight


def response_hidden(model: torch.nn.Module, side: SideBatch, response_length: int) -> torch.Tensor:
    """The final hidden states [B, R, D] (after the last norm) at the positions whose logits
    predict the last `response_length` tokens of each row: what the LM head reads in
    `response_logits`, before it is applied."""
    with compute_autocast(model):
        out = _unwrapped(model).get_decoder()(
            input_ids=side.input_ids,
            attention_mask=side.attention_mask,
            position_ids=side.position_ids,
            use_cache=False,
        )
    return out.last_hidden_state[:, -(response_length + 1):-1, :]


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    layers = getattr(_unwrapped(model).get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not layers:
        raise ValueError(f"compile_layers needs a decoder whose layers are a list (`layers`), which "
                         f"{type(_unwrapped(model)).__name__} does not have: train without it")
    return layers


def _has_cpp_compiler() -> bool:
    return any(shutil.which(name) for name in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if name)


@contextlib.contextmanager
def compiled_decoder_layers(model: torch.nn.Module) -> Iterator[None]:
    """Each decoder layer of `model` runs through `torch.compile` while the context lasts
    (regional compilation, as transformers recommends: the layers share one code object, so
    one compiled graph per input variant serves them all), then eagerly again.

    Compiling fuses the elementwise work around the 4-bit products (casts, LoRA scaling and
    adds, norms, rotary embeddings): fewer kernels and fewer intermediate tensors, the same
    loss and gradients up to rounding. bitsandbytes registers its 4-bit kernels as torch
    custom ops, so they stay in the graph as single calls. Dynamo caches by code object: a
    later context in the same process (the next simulated client) reuses what the first
    compiled. Generation stays eager (its key/value cache is another story)."""
    if model_device(model).type == "cpu" and not _has_cpp_compiler():
        raise ValueError("compile_layers on the CPU needs a C++ compiler (g++ or clang++ on PATH, or CXX): "
                         "install one or train without it")
    layers = _decoder_layers(model)
    before = [layer._compiled_call_impl for layer in layers]  # what nn.Module.compile sets; None: eager
    for layer in layers:
        layer.compile()
    try:
        yield
    finally:
        for layer, call in zip(layers, before, strict=True):
            layer._compiled_call_impl = call


# Attention implementations that take a prepared 4D mask as it is: a boolean one (True:
# attend) for SDPA, an additive one for the eager path.
_BLOCK_MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def supports_paired_pass(model: torch.nn.Module) -> bool:
    return getattr(model.config, "_attn_implementation", None) in _BLOCK_MASK_IMPLEMENTATIONS


def paired_response_logits(model: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """NextQuill's two passes, (x, h, y) and (x, ∅, y), as one forward: each sample's two
    rows side by side in one sequence, with their own positions and a block-diagonal causal
    mask, so that no token of one variant sees the other. Float32 logits [B, R, V] of each
    variant, as two `response_logits` calls give them (up to rounding).

    One forward instead of two: each 4-bit layer is dequantized once per pass instead of
    twice, and every kernel is launched once; on a GPU at small batch, launches, not
    arithmetic, bound the step. The price is attention over the joined length."""
    if not supports_paired_pass(model):
        raise ValueError(f"the paired pass needs a 4D attention mask, which attention implementation "
                         f"{getattr(model.config, '_attn_implementation', None)!r} does not take")
    first, second = batch.with_history, batch.without_history
    device = first.input_ids.device
    w1, w2, r = first.input_ids.shape[1], second.input_ids.shape[1], batch.response_length
    width = w1 + w2
    index = torch.arange(width, device=device)
    segment = index >= w1
    allowed = (segment[:, None] == segment[None, :]) & (index[None, :] <= index[:, None])  # [W, W]
    keys = torch.cat([first.attention_mask, second.attention_mask], dim=1).bool()  # [B, W]
    # A padding position attends to itself, so that no row of the mask is empty (NaN).
    allowed = (allowed[None] & keys[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)[None]
    mask = allowed[:, None]
    if model.config._attn_implementation == "eager":
        mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, torch.finfo(torch.float32).min)
    keep = torch.cat([torch.arange(w1 - r - 1, w1 - 1, device=device),
                      torch.arange(width - r - 1, width - 1, device=device)])
    with compute_autocast(model):
        out = model(
            input_ids=torch.cat([first.input_ids, second.input_ids], dim=1),
            attention_mask=mask,
            position_ids=torch.cat([first.position_ids, second.position_ids], dim=1),
            logits_to_keep=keep,
            use_cache=False,
        )
    logits = out.logits.float()
    return logits[:, :r], logits[:, r:]


@torch.no_grad()
def response_label_log_probs(model: torch.nn.Module, side: SideBatch, labels: torch.Tensor,
                             chunk_tokens: int = FUSED_CHUNK_TOKENS) -> torch.Tensor:
    """log p(label) at each response position under `model`: [B, R] float32 (0 where the label
    is IGNORE_INDEX). Where the LM head allows (`lm_head_weight`), it is applied to
    `chunk_tokens` hidden states at a time, so that no more than a chunk's logits exist at once
    (at a 151,936-token vocabulary, a batch of 16 × 128 response tokens has 1.2 GB of float32
    logits per pass); otherwise from `response_logits`."""
    head = lm_head_weight(model)
    if head is None:
        return token_log_probs(response_logits(model, side, labels.shape[1]), labels)
    states = response_hidden(model, side, labels.shape[1]).flatten(0, 1)
    flat = labels.flatten()
    with compute_autocast(model):
        parts = [token_log_probs(F.linear(states[start:start + chunk_tokens], head), flat[start:start + chunk_tokens])
                 for start in range(0, len(flat), chunk_tokens)]
    return torch.cat(parts).view(labels.shape)


@torch.no_grad()
def response_token_nll(model: torch.nn.Module, batch: PairBatch, with_history: bool = True) -> torch.Tensor:
    """Per-token negative log-likelihood of the response labels: [B, R] (0 where ignored)."""
    side = batch.with_history if with_history else batch.without_history
    return -response_label_log_probs(model, side, batch.labels)
