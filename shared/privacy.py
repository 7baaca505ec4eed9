"""Differential privacy of the shared update: how much noise, and what it buys.

Every mode adds Gaussian noise whose standard deviation is `noise_multiplier × clip`, where
`clip` bounds the L2 norm of one device's update (its change of the shared parameters) in one
round. The pieces are Flower's own (`coordinator.privacy.RunPrivacy.wrap`, `client.privacy`):

  server  the coordinator clips each update and adds noise to their mean
          (`DifferentialPrivacyServerSideFixedClipping`): devices trust the coordinator;
  client  each device clips its own update (`fixedclipping_mod`), the coordinator adds the
          noise (`DifferentialPrivacyClientSideFixedClipping`);
  local   each device clips and adds the noise itself (`LocalDpMod`): the coordinator sees
          only noised updates.

ε is never computed by a formula of ours: Flower's RDP accountant (Google's `dp-accounting`
underneath) composes the releases of central DP as the run goes, and the same library's RDP
accountant and `calibrate_dp_mechanism` give, before a run, the ε of a noise multiplier and
the noise multiplier of a target ε. Each aggregated round (expert or personalization) is one
release; no amplification by the sampling of clients is claimed (Flower's accounted
fixed-clipping DP requires that model), so ε holds whichever clients a round samples.

Central DP protects against adding or removing a user: one clipped update changes the sum by
at most `clip`, so the noise multiplier is σ. Local DP protects each release of a device
against any other data on that device: two clipped updates differ by up to 2 × `clip`, so the
same noise is a multiplier of σ / 2, and a device's ε composes over the rounds it sends in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.config import PrivacySettings


@dataclass(frozen=True)
class PrivacyBudget:
    """The noise of a run and the guarantee it gives."""

    noise_multiplier: float  # σ: noise std = σ × clip
    releases: int  # aggregated rounds the guarantee covers
    delta: float
    epsilon: float  # at `delta`, after `releases`; inf without noise


def epsilon_of(noise_multiplier: float, releases: int, delta: float) -> float:
    """ε at `delta` after `releases` Gaussian releases of noise multiplier σ (RDP accounting,
    add-or-remove-one neighbours, no sampling amplification); inf for σ = 0."""
    if noise_multiplier <= 0:
        return math.inf
    if releases <= 0:
        return 0.0
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(SelfComposedDpEvent(GaussianDpEvent(noise_multiplier), releases))
    return float(accountant.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, releases: int, delta: float) -> float:
    """The smallest σ whose `releases` releases are (target ε, δ)-DP, by the accounting of
    `epsilon_of` (dp-accounting's `calibrate_dp_mechanism`, a bracketed search over σ)."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target epsilon must be positive and finite, got {target_epsilon!r}")
    if releases <= 0:
        raise ValueError(f"releases must be at least 1, got {releases}")
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent, calibrate_dp_mechanism
    from dp_accounting.mechanism_calibration import ExplicitBracketInterval
    from dp_accounting.rdp import RdpAccountant

    try:
        return float(calibrate_dp_mechanism(
            RdpAccountant, lambda sigma: SelfComposedDpEvent(GaussianDpEvent(sigma), releases),
            target_epsilon, delta, bracket_interval=ExplicitBracketInterval(1e-3, 1e4), tol=1e-4,
        ))
    except (ValueError, RuntimeError) as error:  # no σ in the bracket reaches the target
        raise ValueError(f"no noise multiplier up to 1e4 gives ε = {target_epsilon:g} over {releases} rounds at "
                         f"δ = {delta:g} ({error})") from None


def sensitivity(settings: PrivacySettings) -> float:
    """What one release's noise is measured against, in units of `dp_clip`: 1 for central DP
    (one user added or removed), 2 for local DP (any two clipped updates of a device)."""
    return 2.0 if settings.mode == "local" else 1.0


def plan_budget(settings: PrivacySettings, releases: int) -> PrivacyBudget:
    """A run's noise (std σ × `dp_clip`): σ calibrated to `dp_epsilon` over `releases` where
    that is set (> 0), else `dp_noise` as given; with the ε it gives at `dp_delta`."""
    delta, scale = settings.dp_delta, sensitivity(settings)
    if settings.dp_epsilon:
        sigma = scale * noise_for_epsilon(settings.dp_epsilon, releases, delta)
    else:
        sigma = settings.dp_noise
    return PrivacyBudget(sigma, releases, delta, epsilon_of(sigma / scale, releases, delta))


def local_release_epsilon(noise_multiplier: float, delta: float) -> float:
    """The ε to give Flower's `LocalDpMod` with sensitivity 2 × clip so that its noise std,
    sensitivity × sqrt(2 ln(1.25/δ)) / ε (the classic Gaussian mechanism's), is σ × clip.
    (Only the noise is taken from it: the run's ε is accounted by RDP, `plan_budget`.)"""
    return 2 * math.sqrt(2 * math.log(1.25 / delta)) / noise_multiplier
