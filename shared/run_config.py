"""The federated run's configuration: `[tool.flwr.app.config]` in pyproject.toml (and
`flwr run --run-config`), read into one typed object. Keys are the field names in
kebab-case; an unknown key or a value of the wrong type is rejected with a clear message."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_type_hints


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated NextQuill run is configured by."""

    model: str = field(default="tiny", metadata={"help": "'tiny', 'small' or a local model directory"})
    quantization: str = field(default="nf4", metadata={"help": "'nf4' or 'none'"})
    dataset: str = field(default="shakespeare", metadata={"help": "shakespeare, synthetic or a LaMP JSON path"})
    num_users: int = field(default=8, metadata={"help": "users (one per simulated client)"})
    clients_per_round: int = field(default=4, metadata={"help": "clients sampled per round"})
    expert_rounds: int = field(default=2, metadata={"help": "rounds of federated ContextSFT for the expert"})
    rounds: int = field(default=3, metadata={"help": "personalization rounds"})
    local_steps: int = field(default=10, metadata={"help": "local training steps per round"})
    batch_size: int = field(default=8, metadata={"help": "samples per local step"})
    learning_rate: float = field(default=3e-4, metadata={"help": "local AdamW learning rate"})
    method: str = field(default="nextquill", metadata={"help": "sft, context-sft, nextquill, mce-only, dce-only"})
    alpha: float = field(default=0.1, metadata={"help": "weight of L_p"})
    split: str = field(default="dual", metadata={"help": "dual, a-shared or layers"})
    shared_layers: int = field(default=0, metadata={"help": "with split 'layers': decoder layers shared"})
    expert: str = field(default="", metadata={"help": "an existing expert adapter directory (skips phase 1)"})
    min_replies: int = field(default=1, metadata={"help": "fewest valid replies a round may aggregate"})
    run_dir: str = field(default="runs/federated", metadata={"help": "where the coordinator writes"})
    seed: int = field(default=0, metadata={"help": "seed of sampling and initialisation"})

    def __post_init__(self) -> None:
        for name in ("num_users", "clients_per_round", "local_steps", "batch_size", "min_replies"):
            if getattr(self, name) < 1:
                raise ValueError(f"run config {_key(name)} must be at least 1, got {getattr(self, name)}")
        if self.clients_per_round > self.num_users:
            raise ValueError(
                f"run config clients-per-round ({self.clients_per_round}) exceeds num-users ({self.num_users})"
            )
        if self.expert_rounds < 0 or self.rounds < 0:
            raise ValueError("run config expert-rounds and rounds must not be negative")

    @classmethod
    def from_flower(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's run config (kebab-case keys)."""
        fields = {_key(f.name): f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown run config keys {unknown}; known keys: {sorted(fields)}")
        hints = get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            name = fields[key]
            kwargs[name] = _coerce(key, value, hints[name])
        return cls(**kwargs)

    def to_flower(self) -> dict[str, Any]:
        return {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, kind: type) -> Any:
    # TOML integers are fine where a float is expected; nothing else is converted.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ValueError(f"run config {key} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value
