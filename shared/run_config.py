"""The federated run's configuration: `[tool.flwr.app.config]` in pyproject.toml (and
`flwr run --run-config`), read into one typed object. Keys are the field names in
kebab-case; an unknown key or a value of the wrong type is rejected with a clear message.

Both apps read it: the coordinator for rounds and phases, every device for what and how to
train. The number of users is the number of SuperNodes (in simulation:
`--federation-config "num-supernodes=N"`), not a key here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from shared.adapters import LoraSettings
from shared.losses import WEIGHTINGS, WeightScheme
from shared.methods import METHODS
from shared.modeling import QUANTIZATIONS, BaseSpec
from shared.paths import data_dir
from shared.prompts import PromptConfig
from shared.split import SPLIT_KINDS, SplitSpec
from shared.wire import TRANSPORT_DTYPES

DATASETS = ("shakespeare", "synthetic")


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated NextQuill run is configured by. Relative paths (run-dir,
    users-dir, expert, a dataset file) are under the data directory."""

    model: str = field(default="tiny", metadata={"help": "'tiny', 'small' or a local model directory"})
    quantization: str = field(default="nf4", metadata={"help": "'nf4' (4-bit, the device default) or 'none'"})
    device: str = field(default="auto", metadata={"help": "where devices compute: auto, cpu, cuda, cuda:N"})
    dataset: str = field(
        default="shakespeare",
        metadata={"help": "simulation users: 'shakespeare', 'synthetic' or the path of a LaMP-style JSON file"},
    )
    users_dir: str = field(
        default="", metadata={"help": "simulation: folder of the user stores (default users/<dataset>)"}
    )
    clients_per_round: int = field(default=4, metadata={"help": "clients sampled per training round"})
    expert_rounds: int = field(default=2, metadata={"help": "rounds of federated ContextSFT for the expert"})
    rounds: int = field(default=3, metadata={"help": "personalization rounds"})
    evaluate_every: int = field(
        default=0, metadata={"help": "also evaluate every N personalization rounds (0: only after the last)"}
    )
    evaluate_clients: int = field(default=0, metadata={"help": "devices sampled per evaluation (0: every one)"})
    local_steps: int = field(default=10, metadata={"help": "local training steps per round"})
    batch_size: int = field(default=8, metadata={"help": "samples per local step"})
    learning_rate: float = field(default=3e-4, metadata={"help": "local AdamW learning rate"})
    method: str = field(default="nextquill", metadata={"help": f"one of {sorted(METHODS)}"})
    alpha: float = field(default=0.1, metadata={"help": "weight of L_p"})
    lean_memory: bool = field(
        default=False, metadata={"help": "two-stage NextQuill backward: same gradients, peak memory of one pass"}
    )
    paired_pass: bool = field(
        default=False, metadata={"help": "NextQuill's two passes as one forward (block-diagonal mask); same gradients"}
    )
    weighting: str = field(default="threshold", metadata={"help": f"DCE -> token weight: one of {WEIGHTINGS}"})
    split: str = field(default="dual", metadata={"help": f"shared / personal split: one of {SPLIT_KINDS}"})
    shared_layers: int = field(default=0, metadata={"help": "with split 'layers': decoder layers shared"})
    transport_dtype: str = field(
        default="float32", metadata={"help": f"dtype the shared parameters travel in: one of {TRANSPORT_DTYPES}"}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (of each adapter)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator"})
    history_tokens: int = field(default=160, metadata={"help": "prompt budget of the history, in tokens"})
    context_tokens: int = field(default=48, metadata={"help": "prompt budget of the context x, in tokens"})
    response_tokens: int = field(default=48, metadata={"help": "budget of the response y, in tokens"})
    expert: str = field(default="", metadata={"help": "an existing expert adapter directory (skips phase 1)"})
    min_replies: int = field(default=1, metadata={"help": "fewest valid replies a round may aggregate"})
    round_timeout: float = field(default=1800.0, metadata={"help": "seconds to wait for a round's replies"})
    run_dir: str = field(default="runs/federated", metadata={"help": "where the coordinator writes; reruns resume"})
    seed: int = field(default=0, metadata={"help": "seed of client sampling and initialisation"})

    def __post_init__(self) -> None:
        for name in ("clients_per_round", "local_steps", "batch_size", "min_replies", "lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                raise ValueError(f"run config {_key(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("expert_rounds", "rounds", "evaluate_every", "evaluate_clients"):
            if getattr(self, name) < 0:
                raise ValueError(f"run config {_key(name)} must not be negative, got {getattr(self, name)}")
        if self.min_replies > self.clients_per_round:
            raise ValueError(
                f"run config min-replies ({self.min_replies}) exceeds clients-per-round ({self.clients_per_round})"
            )
        if self.learning_rate <= 0 or self.alpha < 0 or self.round_timeout <= 0:
            raise ValueError("run config learning-rate and round-timeout must be positive, alpha not negative")
        choices = {"method": sorted(METHODS), "weighting": WEIGHTINGS, "split": SPLIT_KINDS,
                   "quantization": QUANTIZATIONS, "transport_dtype": TRANSPORT_DTYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"run config {_key(name)} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.needs_expert and not self.expert and self.expert_rounds == 0:
            raise ValueError(f"run config method {self.method!r} needs an expert: set expert-rounds >= 1 "
                             "or expert to an existing expert adapter directory")
        self.split_spec  # noqa: B018  (raises on an invalid split / shared-layers pair)
        PromptConfig(self.history_tokens, self.context_tokens, self.response_tokens)

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

    @property
    def needs_expert(self) -> bool:
        """Whether the personalization method weights tokens with the expert's DCE."""
        return METHODS[self.method].expert_weights

    def resolve(self, path: str) -> Path:
        """A path of the config: relative ones are under the data directory, because the
        apps run wherever Flower starts them, not where `flwr run` was typed."""
        resolved = Path(path).expanduser()
        return resolved if resolved.is_absolute() else data_dir() / resolved

    @property
    def split_spec(self) -> SplitSpec:
        try:
            return SplitSpec(self.split, self.shared_layers)
        except ValueError as error:
            raise ValueError(f"run config split: {error}") from None

    @property
    def base_spec(self) -> BaseSpec:
        return BaseSpec(self.model, self.quantization, self.device)

    @property
    def prompt(self) -> PromptConfig:
        return PromptConfig(self.history_tokens, self.context_tokens, self.response_tokens)

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha)

    @property
    def weight_scheme(self) -> WeightScheme:
        return WeightScheme(self.weighting)


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, kind: type) -> Any:
    # TOML integers are fine where a float is expected; nothing else is converted.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ValueError(f"run config {key} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value
