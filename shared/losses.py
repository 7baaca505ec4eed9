"""The NextQuill losses and token weights: pure tensor functions, no I/O.

Notation (per response token t of a sample (x, h, y)):
  MCE_t = z(x, h, y<t) - z(x, ∅, y<t)               model-side effect, on logits [V]
  DCE_t = p_E(y_t | x, h, y<t) - p_E(y_t | x, ∅, y<t)  data-side effect, from the frozen expert E
  ω_t   = high if DCE_t > delta else low
  L_n   = Σ ω_t CE(z(x,h,y<t), y_t) / Σ ω_t
  L_p   = Σ ω_t CE(MCE_t, y_t) / Σ ω_t
  L     = L_n + alpha · L_p

With a linear LM head W [V, D] without bias or soft-capping, z = W·s for the final hidden state
s, so MCE_t = W·(s(x,h,y<t) - s(x,∅,y<t)): both losses are cross-entropies of W applied to
hidden states, which `fused_nextquill_loss` computes a chunk of tokens at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from shared.config import WeightScheme

IGNORE_INDEX = -100
# Response tokens per chunk of the fused loss: at Qwen2.5's 151,936-token vocabulary, a
# chunk's float32 logits take 156 MB (the unfused loss holds every token's, of both passes).
FUSED_CHUNK_TOKENS = 256


def dce_weights(
    prob_with: torch.Tensor,
    prob_without: torch.Tensor,
    delta: float = 0.05,
    high: float = 0.9,
    low: float = 0.1,
) -> torch.Tensor:
    """Thresholded token weights (the paper's): `high` where the expert's probability of
    the ground-truth token rises by more than `delta` when the history is present,
    else `low`.

    prob_with, prob_without: [N] probabilities in [0, 1]. Returns [N], float32.
    """
    _check_same_shape(prob_with, prob_without)
    dce = prob_with.float() - prob_without.float()
    return torch.where(dce > delta, torch.full_like(dce, high), torch.full_like(dce, low))


def continuous_dce_weights(
    prob_with: torch.Tensor,
    prob_without: torch.Tensor,
    high: float = 0.9,
    low: float = 0.1,
) -> torch.Tensor:
    """Threshold-free token weights: `low + (high - low) · clamp(DCE, 0, 1)`.

    Linear in the data-side effect, so a token gains weight in proportion to how much
    the history raised its probability; no `delta` to tune (the paper's stated
    limitation). prob_with, prob_without: [N]. Returns [N], float32 in [low, high].
    """
    _check_same_shape(prob_with, prob_without)
    dce = (prob_with.float() - prob_without.float()).clamp(0.0, 1.0)
    return low + (high - low) * dce


def nextquill_loss(
    logits_with: torch.Tensor,
    logits_without: torch.Tensor | None,
    labels: torch.Tensor,
    weights: torch.Tensor,
    alpha: float = 0.1,
    weighted_alignment: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NextQuill objective over the response positions.

    logits_with:    [N, V] logits of the model with the history in the prompt.
    logits_without: [N, V] logits with the history removed, aligned on the same response
                    tokens; may be None when alpha == 0 (then l_p is reported as 0).
    labels:         [N] ground-truth token ids, IGNORE_INDEX (-100) where not a response token.
    weights:        [N] token weights ω (ignored positions may hold anything).
    weighted_alignment: False reproduces the authors' released code, where L_p is an
                    unweighted mean.

    Returns (total, l_n, l_p), scalars, with total = l_n + alpha · l_p. With weights all
    equal, l_n is the plain mean cross-entropy (SFT / ContextSFT).
    """
    if logits_with.dim() != 2 or labels.shape != logits_with.shape[:1] or weights.shape != labels.shape:
        raise ValueError(
            f"expected logits [N, V], labels [N], weights [N]; got {tuple(logits_with.shape)}, "
            f"{tuple(labels.shape)}, {tuple(weights.shape)}"
        )
    keep = labels != IGNORE_INDEX
    if not bool(keep.any()):
        raise ValueError("no response tokens to train on: every label is IGNORE_INDEX")
    targets = labels[keep]
    w = weights[keep].to(torch.float32)
    w_sum = w.sum()

    ce_with = F.cross_entropy(logits_with[keep].float(), targets, reduction="none")
    l_n = (w * ce_with).sum() / w_sum

    if alpha == 0.0 or logits_without is None:
        if alpha != 0.0:
            raise ValueError("alpha > 0 needs logits_without (the no-history pass)")
        l_p = torch.zeros((), dtype=l_n.dtype, device=l_n.device)
        return l_n, l_n, l_p

    if logits_without.shape != logits_with.shape:
        raise ValueError(
            f"logits_with {tuple(logits_with.shape)} and logits_without "
            f"{tuple(logits_without.shape)} must be aligned on the same response tokens"
        )
    mce = logits_with[keep].float() - logits_without[keep].float()
    ce_mce = F.cross_entropy(mce, targets, reduction="none")
    l_p = (w * ce_mce).sum() / w_sum if weighted_alignment else ce_mce.mean()
    return l_n + alpha * l_p, l_n, l_p


def fused_nextquill_loss(
    hidden_with: torch.Tensor,
    hidden_without: torch.Tensor | None,
    head: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    alpha: float = 0.1,
    weighted_alignment: bool = True,
    chunk_tokens: int = FUSED_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`nextquill_loss` of the logits `hidden @ headᵀ`, without ever holding them all.

    hidden_with:    [N, D] final hidden states with the history in the prompt.
    hidden_without: [N, D] the same without the history (None when alpha == 0).
    head:           [V, D] the LM head's weight (a head without bias or soft-capping).
    labels, weights, alpha, weighted_alignment: as `nextquill_loss`.

    The alignment logits are `(hidden_with - hidden_without) @ headᵀ`, which equals the
    difference of the two passes' logits. Each chunk of `chunk_tokens` tokens computes its
    logits, reduces them to the weighted sums of its cross-entropies, and recomputes them in the
    backward (activation checkpointing): the logits alive at any time are one chunk's.
    """
    if hidden_with.dim() != 2 or labels.shape != hidden_with.shape[:1] or weights.shape != labels.shape:
        raise ValueError(
            f"expected hidden states [N, D], labels [N], weights [N]; got {tuple(hidden_with.shape)}, "
            f"{tuple(labels.shape)}, {tuple(weights.shape)}"
        )
    if head.dim() != 2 or head.shape[1] != hidden_with.shape[1]:
        raise ValueError(f"head {tuple(head.shape)} does not map hidden states {tuple(hidden_with.shape)} to logits")
    align = alpha != 0.0
    if align and (hidden_without is None or hidden_without.shape != hidden_with.shape):
        raise ValueError("alpha > 0 needs hidden_without, aligned on the same response tokens as hidden_with")
    keep = labels != IGNORE_INDEX
    if not bool(keep.any()):
        raise ValueError("no response tokens to train on: every label is IGNORE_INDEX")
    targets, w = labels[keep], weights[keep].to(torch.float32)
    with_states = hidden_with[keep]
    difference = (with_states - hidden_without[keep]) if align else None
    # L_p's own token weights: ω, or 1 for the authors' unweighted mean
    w_p = w if weighted_alignment else torch.ones_like(w)
    sum_n = sum_p = torch.zeros((), dtype=torch.float32, device=w.device)
    for start in range(0, len(targets), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        sum_n = sum_n + checkpoint(_weighted_cross_entropy, with_states[part], head, targets[part], w[part],
                                   use_reentrant=False)
        if align:
            sum_p = sum_p + checkpoint(_weighted_cross_entropy, difference[part], head, targets[part], w_p[part],
                                       use_reentrant=False)
    l_n = sum_n / w.sum()
    l_p = sum_p / w_p.sum()
    return l_n + alpha * l_p, l_n, l_p


def _weighted_cross_entropy(states: torch.Tensor, head: torch.Tensor, targets: torch.Tensor,
                            weights: torch.Tensor) -> torch.Tensor:
    """Σ weights · CE(states @ headᵀ, targets): [n, D], [V, D], [n], [n] -> scalar; the logits
    in the head's dtype (bf16 under autocast, as the model's own head computes them), the
    cross-entropy in float32."""
    logits = F.linear(states.to(head.dtype), head).float()
    return (weights * F.cross_entropy(logits, targets, reduction="none")).sum()


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under `logits`: [..., V], [...] -> [...] float32, 0 where
    the label is IGNORE_INDEX. The one gather of label probabilities (token weights, NLL)."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels == IGNORE_INDEX, torch.zeros_like(logp), logp)


def token_probabilities(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Probability of each label under `logits`: [N, V], [N] -> [N] float32 (0 where ignored)."""
    return torch.where(labels == IGNORE_INDEX, 0.0, token_log_probs(logits, labels).exp())


def _check_same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"prob_with {tuple(a.shape)} and prob_without {tuple(b.shape)} differ in shape")


def token_weights(scheme: WeightScheme, prob_with: torch.Tensor, prob_without: torch.Tensor) -> torch.Tensor:
    """ω of each token under `scheme` (threshold or continuous), from the probabilities of the
    ground-truth tokens with the history and with the counterfactual one: [N], [N] -> [N]
    float32. Weighting 'fraction' is a threshold per user: resolve it first
    (`client.token_weights.user_weight_scheme`)."""
    if scheme.weighting == "threshold":
        return dce_weights(prob_with, prob_without, scheme.delta, scheme.weight_high, scheme.weight_low)
    if scheme.weighting == "continuous":
        return continuous_dce_weights(prob_with, prob_without, scheme.weight_high, scheme.weight_low)
    raise ValueError(f"weighting {scheme.weighting!r} is a per-user threshold: resolve it with the user's "
                     "token probabilities first")
