"""The NextQuill losses and token weights: pure tensor functions, no I/O.

Notation (per response token t of a sample (x, h, y)):
  MCE_t = z(x, h, y<t) - z(x, ∅, y<t)               model-side effect, on logits [V]
  DCE_t = p_E(y_t | x, h, y<t) - p_E(y_t | x, ∅, y<t)  data-side effect, from the frozen expert E
  ω_t   = high if DCE_t > delta else low
  L_n   = Σ ω_t CE(z(x,h,y<t), y_t) / Σ ω_t
  L_p   = Σ ω_t CE(MCE_t, y_t) / Σ ω_t
  L     = L_n + alpha · L_p
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.config import WeightScheme

IGNORE_INDEX = -100


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
    ground-truth tokens with and without the history: [N], [N] -> [N] float32."""
    if scheme.weighting == "threshold":
        return dce_weights(prob_with, prob_without, scheme.delta, scheme.weight_high, scheme.weight_low)
    return continuous_dce_weights(prob_with, prob_without, scheme.weight_high, scheme.weight_low)
