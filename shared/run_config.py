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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from shared.adapters import LoraSettings
from shared.losses import WEIGHTINGS, WeightScheme
from shared.methods import METHODS
from shared.modeling import NAMED_BASES, QUANTIZATIONS, BaseSpec
from shared.paths import data_dir
from shared.prompts import PromptConfig
from shared.settings import SettingError, check_settings, setting
from shared.split import SPLIT_KINDS, SplitSpec
from shared.wire import TRANSPORT_DTYPES

DATASETS = ("shakespeare", "synthetic")


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated NextQuill run is configured by. Relative paths (run-dir,
    users-dir, expert, a dataset file) are under the data directory."""

    model: str = setting("smollm2-135m", f"one of {list(NAMED_BASES)} or a local model directory")
    quantization: str = setting("nf4", "'nf4' (4-bit, the device default) or 'none'", choices=QUANTIZATIONS)
    device: str = setting("auto", "where devices compute: auto, cpu, cuda, cuda:N")
    compute_dtype: str = setting("auto", "of 4-bit layers: auto (bfloat16 on CUDA, float32 on the CPU), bfloat16, "
                                         "float16 or float32")
    dataset: str = setting(
        "shakespeare", "simulation users: 'shakespeare', 'synthetic' or the path of a LaMP-style JSON file"
    )
    users_dir: str = setting("", "simulation: folder of the user stores (default users/<dataset>)")
    clients_per_round: int = setting(2, "clients sampled per training round", minimum=1)
    expert_rounds: int = setting(1, "rounds of federated ContextSFT for the expert", minimum=0)
    rounds: int = setting(2, "personalization rounds", minimum=0)
    evaluate_every: int = setting(
        0, "also evaluate every N personalization rounds (0: only after the last)", minimum=0
    )
    evaluate_clients: int = setting(0, "devices sampled per evaluation (0: every one)", minimum=0)
    evaluate_base: bool = setting(
        True, "also evaluate the base alone (no adapter) on the same samples: what personalization bought"
    )
    local_steps: int = setting(3, "local training steps per round", minimum=1)
    batch_size: int = setting(4, "samples per local step", minimum=1)
    learning_rate: float = setting(3e-4, "local AdamW learning rate", above=0.0)
    method: str = setting("nextquill", f"one of {sorted(METHODS)}", choices=tuple(sorted(METHODS)))
    alpha: float = setting(0.1, "weight of L_p", minimum=0.0)
    lean_memory: bool = setting(False, "two-stage NextQuill backward: same gradients, peak memory of one pass")
    paired_pass: bool = setting(
        False, "NextQuill's two passes as one forward (block-diagonal mask); same gradients"
    )
    weighting: str = setting("threshold", f"DCE -> token weight: one of {WEIGHTINGS}", choices=WEIGHTINGS)
    split: str = setting("dual", f"shared / personal split: one of {SPLIT_KINDS}", choices=SPLIT_KINDS)
    shared_layers: int = setting(0, "with split 'layers': decoder layers shared", minimum=0)
    transport_dtype: str = setting(
        "float32", f"dtype the shared parameters travel in: one of {TRANSPORT_DTYPES}", choices=TRANSPORT_DTYPES
    )
    lora_r: int = setting(8, "LoRA rank (of each adapter)", minimum=1)
    lora_alpha: int = setting(16, "LoRA scaling numerator", minimum=1)
    history_tokens: int = setting(96, "prompt budget of the history, in tokens")
    context_tokens: int = setting(32, "prompt budget of the context x, in tokens")
    response_tokens: int = setting(32, "budget of the response y, in tokens")
    expert: str = setting("", "an existing expert adapter directory (skips phase 1)")
    min_replies: int = setting(1, "fewest valid replies a round may aggregate", minimum=1)
    round_timeout: float = setting(1800.0, "seconds to wait for a round's replies", above=0.0)
    connect_timeout: float = setting(
        300.0, "seconds to wait for clients-per-round SuperNodes to connect; then the run goes on with those "
               "connected (at least min-replies) or ends with a message", above=0.0,
    )
    run_dir: str = setting("runs/federated", "where the coordinator writes; reruns resume")
    seed: int = setting(0, "seed of client sampling and initialisation")

    def __post_init__(self) -> None:
        check_settings(self, label=lambda name: f"run config {_key(name)}")
        if self.min_replies > self.clients_per_round:
            raise SettingError("run config min-replies",
                               f"({self.min_replies}) exceeds clients-per-round ({self.clients_per_round})")
        if self.needs_expert and not self.expert and self.expert_rounds == 0:
            raise SettingError("run config method", f"{self.method!r} needs an expert: set expert-rounds >= 1 "
                                                    "or expert to an existing expert adapter directory")
        try:  # the objects derived from the keys check what they hold (same names, kebab-case)
            self.base_spec, self.prompt, self.weight_scheme  # noqa: B018
        except SettingError as error:
            raise error.renamed(f"run config {_key(error.name)}") from None
        self.split_spec  # noqa: B018  (raises on an invalid split / shared-layers pair)

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
        return BaseSpec(self.model, self.quantization, self.device, self.compute_dtype)

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
