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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.settings import SettingError, check_settings, setting

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


def token_probabilities(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Probability of each label under `logits`: [N, V], [N] -> [N] float32 (0 where ignored)."""
    safe = labels.clamp_min(0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(labels == IGNORE_INDEX, torch.zeros_like(logp), logp.exp())


def _check_same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"prob_with {tuple(a.shape)} and prob_without {tuple(b.shape)} differ in shape")


WEIGHTINGS = ("threshold", "continuous")


@dataclass(frozen=True)
class WeightScheme:
    """How DCE values become token weights ω."""

    weighting: str = setting("threshold", "'threshold' (the paper's) or 'continuous' (threshold-free)",
                             choices=WEIGHTINGS)
    delta: float = setting(0.05, "threshold on DCE (a probability difference) above which ω = high",
                           minimum=0.0, maximum=1.0)
    high: float = setting(0.9, "λ: the weight of a preference-bearing token", above=0.0, maximum=1.0)
    low: float = setting(0.1, "ε: the weight of any other token", minimum=0.0, maximum=1.0)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.low > self.high:
            raise SettingError("token weight low", f"(ε) = {self.low} must not exceed high (λ) = {self.high}")

    def weights(self, prob_with: torch.Tensor, prob_without: torch.Tensor) -> torch.Tensor:
        if self.weighting == "threshold":
            return dce_weights(prob_with, prob_without, self.delta, self.high, self.low)
        return continuous_dce_weights(prob_with, prob_without, self.high, self.low)
