"""The training methods, as rows of one table: which prompt each reads, whether it aligns the
model-side effect (L_p, the no-history pass), and where its token weights come from. Both
sides read it: a device to train, the coordinator to know whether a run needs an expert.

    method             prompt       L_p (alpha)       token weights ω
    sft                no history   no                1
    context-sft        history      no                1
    nextquill          history      yes, ω-weighted   the expert's DCE (the paper)
    mce-only           history      yes, ω-weighted   1
    dce-only           history      no                the expert's DCE
    nextquill-authors  history      yes, unweighted   the trained model's own DCE (the authors'
                                                      released train.py)

A new method is a new row; `client/trainer.py` picks the forward passes and the token weights
from the row once per training run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

WeightSource = Literal["uniform", "expert", "self"]


@dataclass(frozen=True)
class Method:
    uses_history: bool  # the prompt holds the user's history
    aligns_effects: bool  # adds alpha · L_p, which needs the no-history pass
    weights: WeightSource  # ω: all 1, from the expert's DCE, or from the trained model's own DCE
    weighted_alignment: bool = True  # L_p weighted by ω (the paper) or a plain mean (the authors' code)

    def __post_init__(self) -> None:
        if self.weights == "self" and not self.aligns_effects:
            raise ValueError("a method whose token weights come from the trained model needs its no-history pass: "
                             "it must align effects")

    @property
    def needs_expert(self) -> bool:
        return self.weights == "expert"


METHODS: dict[str, Method] = {
    "sft": Method(uses_history=False, aligns_effects=False, weights="uniform"),
    "context-sft": Method(uses_history=True, aligns_effects=False, weights="uniform"),
    "nextquill": Method(uses_history=True, aligns_effects=True, weights="expert"),
    "mce-only": Method(uses_history=True, aligns_effects=True, weights="uniform"),
    "dce-only": Method(uses_history=True, aligns_effects=False, weights="expert"),
    "nextquill-authors": Method(uses_history=True, aligns_effects=True, weights="self", weighted_alignment=False),
}
