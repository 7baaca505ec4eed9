"""The coordinator's copy of the adapters' layout: the base, unquantized on the CPU, with the
run's LoRA adapters attached. It gives the initial shared parameters (created once, here,
so every device starts from the same ones) and writes aggregated parameters as plain PEFT
adapters (the published expert, the final shared adapter). It never trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shared.adapters import AdapterHost, base_fingerprint, save_adapter
from shared.config import BaseSpec, LoraSettings
from shared.loading import load_base, resolve_model_dir
from shared.split import SplitSpec


class GlobalAdapters:
    def __init__(self, model: str, lora: LoraSettings) -> None:
        base, _ = load_base(BaseSpec(model, quantization="none", device="cpu"))
        self.host = AdapterHost(base, lora)
        self.base_id = base_fingerprint(resolve_model_dir(model))

    def initial_shared(self, split: SplitSpec, seed: int) -> dict[str, torch.Tensor]:
        """Freshly initialised shared parameters of `split` (deterministic from `seed`)."""
        return split.shared_state(self.host.new(*split.adapters, seed=seed))

    def save(self, split: SplitSpec, shared: dict[str, torch.Tensor], target: Path,
             metadata: dict[str, Any] | None = None) -> str:
        """Write the shared adapter of `split` holding `shared` as a PEFT adapter directory in
        the run directory (replacing what an interrupted run left there), with the base it
        belongs to; returns its content digest. Only splits whose shared part is a whole
        adapter qualify."""
        if not split.shares_whole_adapter:
            raise ValueError(f"the shared part of split {split.kind!r} is not a whole adapter")
        model = self.host.new(*split.adapters)
        split.load_shared(model, shared)
        return save_adapter(model, target, {**(metadata or {}), "base": self.base_id},
                            adapter_name=split.shared_adapter, overwrite=True)
