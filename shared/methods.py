"""The training methods: which prompt each reads, whether it aligns the model-side effect
(L_p, the no-history pass), and whether its token weights come from the expert's DCE.
Both sides need these facts: a device to train, the coordinator to know whether a run
needs an expert at all.

    method        prompt        L_p (alpha)   token weights ω
    sft           no history    no            1
    context-sft   history       no            1
    nextquill     history       yes           expert DCE
    mce-only      history       yes           1
    dce-only      history       no            expert DCE
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    uses_history: bool
    aligns_effects: bool  # adds alpha · L_p, the no-history pass
    expert_weights: bool  # ω from the expert's DCE, else uniform


METHODS: dict[str, Method] = {
    "sft": Method(uses_history=False, aligns_effects=False, expert_weights=False),
    "context-sft": Method(uses_history=True, aligns_effects=False, expert_weights=False),
    "nextquill": Method(uses_history=True, aligns_effects=True, expert_weights=True),
    "mce-only": Method(uses_history=True, aligns_effects=True, expert_weights=False),
    "dce-only": Method(uses_history=True, aligns_effects=False, expert_weights=True),
}
