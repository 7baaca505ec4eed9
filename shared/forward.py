"""Running a causal LM on response positions only: the logits that predict each sample's
response tokens (the LM head sees those positions alone), NextQuill's two passes as one
forward, and per-token NLL of the responses. Loading a model is `shared.loading`."""

from __future__ import annotations

import contextlib

import bitsandbytes as bnb
import torch

from shared.batching import PairBatch, SideBatch
from shared.losses import token_log_probs


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
def response_token_nll(model: torch.nn.Module, batch: PairBatch, with_history: bool = True) -> torch.Tensor:
    """Per-token negative log-likelihood of the response labels: [B, R] (0 where ignored)."""
    side = batch.with_history if with_history else batch.without_history
    logits = response_logits(model, side, batch.response_length)
    return -token_log_probs(logits, batch.labels)
