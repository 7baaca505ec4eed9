"""The coordinator's side of differential privacy (`shared/privacy.py` says what each mode
trusts): the DP wrapper Flower puts around a round's FedAvg, and the run's accountant, which
composes each aggregated round and travels in the checkpoint, so that a resumed run's ε counts
every released round once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from shared.config import PrivacySettings
from shared.privacy import PrivacyBudget, epsilon_of, plan_budget, sensitivity

# With central DP every update must weigh the same (Flower's accounted FedAvg requires it, and
# the sensitivity of the mean assumes it); every device runs the same `federation.local-steps`, so
# weighting by them is uniform. Without DP, FedAvg weighs by the number of training samples.
UNIFORM_WEIGHT_KEY = "train-steps"
EXAMPLES_WEIGHT_KEY = "num-examples"


def weight_key(privacy: PrivacySettings) -> str:
    return UNIFORM_WEIGHT_KEY if privacy.central else EXAMPLES_WEIGHT_KEY


def new_accountant(privacy: PrivacySettings, population: int) -> RdpAccountant:
    """Flower's RDP accountant for a run with central DP (local DP is accounted per device,
    `RunPrivacy.after_round`)."""
    config = PrivacyConfig(target_delta=privacy.dp_delta, population_size=population,
                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                           sampling_method=SamplingMethod.NO_AMPLIFICATION)
    return RdpAccountant(config)


def restore_accountant(state: dict[str, Any]) -> RdpAccountant:
    """The accountant `state_dict()` saved (its configuration included)."""
    saved = state["config"]
    config = PrivacyConfig(target_delta=saved["target_delta"], population_size=saved["population_size"],
                           neighboring_relation=NeighboringRelation(saved["neighboring_relation"]),
                           sampling_method=SamplingMethod(saved["sampling_method"]),
                           max_epsilon=saved["max_epsilon"])
    accountant = RdpAccountant(config)
    accountant.load_state_dict(state)
    return accountant


@dataclass
class RunPrivacy:
    """A run's differential privacy: its settings, its noise, and what it has spent."""

    settings: PrivacySettings
    budget: PrivacyBudget | None  # None without DP
    accountant: RdpAccountant | None = None  # central DP with noise, made at the first round
    releases: int = 0  # central DP: rounds aggregated; local DP: rounds in which devices sent updates

    @classmethod
    def start(cls, settings: PrivacySettings, planned_releases: int, saved: dict[str, Any] | None) -> RunPrivacy:
        """The run's privacy, resumed from the checkpoint's `saved` state where there is one."""
        privacy = cls(settings, plan_budget(settings, max(planned_releases, 1)) if settings.enabled else None)
        if saved:
            privacy.releases = int(saved["releases"])
            if saved.get("accountant"):
                privacy.accountant = restore_accountant(saved["accountant"])
        return privacy

    def describe(self) -> str:
        budget = self.budget
        if budget is None:
            return "differential privacy off"
        guarantee = (f"({budget.epsilon:.3g}, {budget.delta:g})-DP over {budget.releases} aggregated rounds"
                     if math.isfinite(budget.epsilon) else "no finite ε (no noise)")
        return (f"differential privacy {self.settings.mode}: clip {self.settings.dp_clip:g}, noise multiplier "
                f"{budget.noise_multiplier:.4g}: {guarantee}")

    def wrap(self, strategy: FedAvg, sampled: int, population: int) -> Strategy:
        """A round's strategy inside Flower's central-DP wrapper for `sampled` devices
        (unchanged without DP, or with local DP: the devices noise their own updates).
        `population` bounds every round's sample (federation.clients-per-round or more): without sampling
        amplification it changes no ε, but Flower's accountant keeps it fixed."""
        if self.budget is None or not self.settings.central:
            return strategy
        settings, sigma = self.settings, self.budget.noise_multiplier
        if self.accountant is None and sigma > 0:
            self.accountant = new_accountant(settings, population)
        wrapper = (DifferentialPrivacyServerSideFixedClipping if settings.mode == "server"
                   else DifferentialPrivacyClientSideFixedClipping)
        return wrapper(strategy, sigma, settings.dp_clip, sampled, accountant=self.accountant)

    def after_round(self, aggregated: bool, sent: bool) -> dict[str, float | None]:
        """Count the round (central DP: if it released an aggregate; local DP: if devices sent
        noised updates, whatever became of them); the ε spent so far, for the round log (None:
        no finite ε). Central DP: the accountant's; local DP: a device's, had it been in every
        round."""
        if self.budget is None:
            return {}
        self.releases += int(sent if self.settings.mode == "local" else aggregated)
        return {"dp-epsilon": self.spent(), "dp-noise-multiplier": self.budget.noise_multiplier}

    def spent(self) -> float | None:
        """ε spent so far at the run's δ (None: no finite ε)."""
        assert self.budget is not None
        delta = self.settings.dp_delta
        if self.accountant is not None:
            epsilon = self.accountant.get_epsilon(delta) if self.accountant.num_releases else 0.0
        else:
            epsilon = epsilon_of(self.budget.noise_multiplier / sensitivity(self.settings), self.releases, delta)
        return epsilon if math.isfinite(epsilon) else None

    def state(self) -> dict[str, Any] | None:
        """What the checkpoint keeps (None without DP)."""
        if self.budget is None:
            return None
        return {"releases": self.releases,
                "accountant": self.accountant.state_dict() if self.accountant is not None else None}

    def summary(self) -> dict[str, Any]:
        """The run's guarantee, for summary.json."""
        if self.budget is None:
            return {"dp": "off"}
        planned = self.budget.epsilon
        relation = ("any two updates of a device (sensitivity 2 × clip)" if self.settings.mode == "local"
                    else "add-or-remove-one user")
        return {"dp": self.settings.mode, "clip": self.settings.dp_clip, "delta": self.settings.dp_delta,
                "noise_multiplier": self.budget.noise_multiplier, "aggregated_rounds": self.releases,
                "epsilon": self.spent(), "planned_epsilon": planned if math.isfinite(planned) else None,
                "accounting": f"RDP (dp-accounting, via Flower for central DP), {relation}, no sampling "
                              "amplification"}
