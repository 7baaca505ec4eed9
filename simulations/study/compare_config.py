"""The single-device comparison's settings (`nextquill compare`; the run is
`simulations/study/compare.py`). A leaf like `shared/config.py`: the command line builds its
options from these fields without loading any model code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.config import BaseSpec, GenerationSettings, LoraSettings, PromptConfig, TrainConfig
from shared.methods import METHODS
from shared.settings import check_settings, setting


@dataclass(frozen=True)
class CompareConfig:
    """The single-device comparison, sized by default for the real pretrained base on a 2-core
    CPU (a step of 4 samples takes about 8 s there)."""

    base: BaseSpec = setting(default_factory=BaseSpec, help="the base model")
    users: int = setting(4, "users evaluated (each gets one adapter per method)", minimum=1)
    expert_users: int = setting(8, "other users the expert is trained on", minimum=1)
    methods: tuple[str, ...] = setting(("sft", "context-sft", "nextquill"), "the methods compared",
                                       choices=tuple(METHODS))
    train: TrainConfig = setting(default_factory=lambda: TrainConfig(max_steps=6),
                                 help="each method's training (its method field is set per method)")
    expert_epochs: float = setting(1.0, "passes of the expert's ContextSFT over its users' samples", above=0.0)
    expert: Path | None = setting(None, "use this expert adapter instead of training one")
    prompt: PromptConfig = setting(default_factory=PromptConfig, help="token budgets")
    lora: LoraSettings = setting(default_factory=LoraSettings, help="the LoRA of every method")
    generation: GenerationSettings = setting(default_factory=GenerationSettings, help="decoding")

    def __post_init__(self) -> None:
        check_settings(self)
