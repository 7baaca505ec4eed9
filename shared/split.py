"""The shared / personal split: the only code that knows which LoRA parameters are shared
with the federation and which stay on the device.

Four layouts, by parameter name (PEFT state-dict keys, adapter names removed):
  full      one adapter, all of it shared: plain FedAvg of a LoRA (the expert phase, and the
            baseline the splits are measured against).
  dual      two adapters, `shared` and `personal`, both active (FedDPA style); all of
            `shared` travels, all of `personal` stays.
  a-shared  one adapter; its LoRA A matrices travel, its B matrices stay (FedSA-LoRA style).
  layers    one adapter; the LoRA of the first `shared_layers` decoder layers travels, the
            rest stays (FedPer style: the layers near the output stay personal).
  local     one adapter, none of it shared: each device trains only on its own data (the
            OPPU-style local baseline; the rounds only pace the training and evaluation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the run config checks a split without loading model code; PEFT is imported where used
    import torch
    from peft import PeftModel

SPLIT_KINDS = ("full", "dual", "a-shared", "layers", "local")
SHARED_ADAPTER = "shared"
PERSONAL_ADAPTER = "personal"
LOCAL_ADAPTER = "local"  # the one adapter of a single-adapter split, and of training on one device
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class SplitSpec:
    """Which LoRA parameters are shared and which are personal."""

    kind: str = field(default="dual", metadata={"help": f"one of {SPLIT_KINDS}"})
    shared_layers: int = field(default=0, metadata={"help": "with 'layers': how many decoder layers are shared"})

    def __post_init__(self) -> None:
        if self.kind not in SPLIT_KINDS:
            raise ValueError(f"split kind must be one of {SPLIT_KINDS}, got {self.kind!r}")
        if self.kind == "layers" and self.shared_layers < 1:
            raise ValueError("split 'layers' needs shared_layers >= 1")

    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapter names a device trains under this split."""
        return (SHARED_ADAPTER, PERSONAL_ADAPTER) if self.kind == "dual" else (LOCAL_ADAPTER,)

    @property
    def shares_whole_adapter(self) -> bool:
        """Whether the shared parameters form a complete adapter (writable as a PEFT adapter)."""
        return self.kind in ("full", "dual")

    @property
    def shared_adapter(self) -> str:
        """The adapter that holds the shared parameters."""
        return SHARED_ADAPTER if self.kind == "dual" else LOCAL_ADAPTER

    def is_shared(self, adapter: str, key: str) -> bool:
        """Whether parameter `key` of `adapter` travels to the coordinator."""
        if self.kind == "full":
            return True
        if self.kind == "local":
            return False
        if self.kind == "dual":
            return adapter == SHARED_ADAPTER
        if self.kind == "a-shared":
            return ".lora_A." in key
        match = _LAYER_INDEX.search(key)
        if match is None:
            raise ValueError(f"cannot tell the decoder layer of parameter {key!r} for the 'layers' split")
        return int(match.group(1)) < self.shared_layers

    def _states(self, model: PeftModel) -> dict[tuple[str, bool], dict[str, torch.Tensor]]:
        from peft import get_peft_model_state_dict

        parts: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}
        for adapter in self.adapters:
            for key, value in get_peft_model_state_dict(model, adapter_name=adapter).items():
                parts.setdefault((adapter, self.is_shared(adapter, key)), {})[key] = value
        return parts

    def shared_state(self, model: PeftModel) -> dict[str, torch.Tensor]:
        """The shared parameters, keyed by PEFT's state-dict names (detached copies)."""
        return {k: v.detach().clone() for (a, shared), part in self._states(model).items() if shared
                for k, v in part.items()}

    def personal_state(self, model: PeftModel) -> dict[str, dict[str, torch.Tensor]]:
        """The personal parameters per adapter (detached copies)."""
        return {a: {k: v.detach().clone() for k, v in part.items()}
                for (a, shared), part in self._states(model).items() if not shared}

    def load_shared(self, model: PeftModel, state: dict[str, torch.Tensor]) -> None:
        """Put received shared parameters into the model, checking they are exactly the
        shared keys."""
        expected = set(self.shared_state(model))
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"shared parameters do not match the split: missing {missing[:3]}, extra {extra[:3]}")
        _set(model, state, self.shared_adapter)

    def load_personal(self, model: PeftModel, personal: dict[str, dict[str, torch.Tensor]]) -> None:
        for adapter, state in personal.items():
            _set(model, state, adapter)


def _set(model: PeftModel, state: dict[str, torch.Tensor], adapter: str) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise ValueError(f"parameters not in adapter {adapter!r}: {unexpected[:3]}")


# The expert phase trains one LoRA and shares all of it (FedAvg of a whole adapter).
EXPERT_SPLIT = SplitSpec("full")
