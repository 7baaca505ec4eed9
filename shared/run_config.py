"""Flower's run config (`[tool.flwr.app.config]` in pyproject.toml, `flwr run --run-config`) as
the setting groups of `shared.config`: `RunConfig` holds the group objects themselves, and a
key names a group and a field, the way Flower's flowertune apps do:

    train.learning-rate = 0.0003      ->  RunConfig.train.learning_rate
    weights.delta = 0.05              ->  RunConfig.train.weight_scheme.delta
    dp.clip = 1.0                     ->  RunConfig.dp.dp_clip   (the group's name is not repeated)

Each field's help, rules and default are written once, in its group; the checks that span two
groups are written once, here. A run directory written before the keys were grouped (flat keys:
`learning-rate`) still resumes: `upgrade_keys` reads its config.json in today's keys.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from shared.config import (
    BaseSpec,
    EvaluationSettings,
    ExpertSettings,
    FederationSettings,
    LoraSettings,
    PrivacySettings,
    PromptConfig,
    SecAggSettings,
    SharingSettings,
    TrainConfig,
    UsersSettings,
    WeightScheme,
    one_history_pass,
)
from shared.methods import METHODS
from shared.paths import data_dir
from shared.settings import SettingError


@dataclass(frozen=True)
class Group:
    """A group of run-config keys: the settings class, where its object sits in RunConfig, and
    what it is (the header of its block in pyproject.toml)."""

    settings: type
    path: tuple[str, ...]
    about: str


GROUPS: dict[str, Group] = {  # in the order of the table
    "base": Group(BaseSpec, ("base",), "which base model and how it is loaded"),
    "users": Group(UsersSettings, ("users",), "simulation: whose data the simulated devices hold"),
    "federation": Group(FederationSettings, ("federation",), "the rounds: how many, who takes part, what a round "
                                                             "accepts, where the coordinator writes"),
    "evaluate": Group(EvaluationSettings, ("evaluate",), "when and on whom the run evaluates"),
    "expert": Group(ExpertSettings, ("expert",), "the expert whose DCE weights the tokens"),
    "train": Group(TrainConfig, ("train",), "local training (the personalization method; the expert phase trains "
                                            "context-sft)"),
    "weights": Group(WeightScheme, ("train", "weight_scheme"), "the expert's DCE -> token weights ω"),
    "lora": Group(LoraSettings, ("lora",), "the LoRA every method trains"),
    "prompt": Group(PromptConfig, ("prompt",), "the token budgets of a prompt"),
    "sharing": Group(SharingSettings, ("sharing",), "which LoRA parameters are shared and how they travel"),
    "dp": Group(PrivacySettings, ("dp",), "differential privacy of the shared update"),
    "secagg": Group(SecAggSettings, ("secagg",), "Flower's SecAgg+ on every training round"),
}


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated NextQuill run is configured by. Relative paths (federation.run-dir,
    users.dir, expert.adapter, a dataset file) are under the data directory. The number of users
    is the number of SuperNodes (in simulation `--federation-config "num-supernodes=N"`), not a
    key."""

    base: BaseSpec = dataclasses.field(default_factory=BaseSpec)
    users: UsersSettings = dataclasses.field(default_factory=UsersSettings)
    federation: FederationSettings = dataclasses.field(default_factory=FederationSettings)
    evaluate: EvaluationSettings = dataclasses.field(default_factory=EvaluationSettings)
    expert: ExpertSettings = dataclasses.field(default_factory=ExpertSettings)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    sharing: SharingSettings = dataclasses.field(default_factory=SharingSettings)
    dp: PrivacySettings = dataclasses.field(default_factory=PrivacySettings)
    secagg: SecAggSettings = dataclasses.field(default_factory=SecAggSettings)

    def __post_init__(self) -> None:
        """The checks that span groups (each group checks its own fields)."""
        if self.train.fused_loss and self.expert.history_dropout:
            raise SettingError("run config train.fused-loss", "does not combine with expert.history-dropout: its "
                                                              "passes read hidden states")
        if self.expert.history_dropout and not self.expert_phase:
            raise SettingError("run config expert.history-dropout", "applies to the expert phase: set "
                                                                    "expert.rounds >= 1 with a method that needs "
                                                                    "an expert and no expert.adapter")
        if self.needs_expert and not self.expert.adapter and self.expert.rounds == 0:
            raise SettingError("run config train.method", f"{self.train.method!r} (with train.mce-reference "
                                                          f"{self.train.mce_reference!r}) needs an expert: set "
                                                          "expert.rounds >= 1 or expert.adapter to an existing "
                                                          "expert adapter directory")
        if self.secagg.enabled:
            if not 2 <= self.federation.clients_per_round <= 1023:
                raise SettingError("run config secagg.enabled", "needs federation.clients-per-round from 2 (a sum "
                                                                "of one update is that update) to 1023 (SecAgg+'s "
                                                                "32-bit sums of 22-bit values)")
            if self.sharing.split == "local":
                raise SettingError("run config secagg.enabled", "has nothing to aggregate with sharing.split "
                                                                "'local' (no parameter is shared)")
            if self.dp.central or self.federation.max_update_norm:
                raise SettingError("run config secagg.enabled", "cannot go with dp.mode 'server' or 'client' or "
                                                                "federation.max-update-norm: they need each "
                                                                "device's update, which SecAgg+ hides (dp.mode "
                                                                "'local' works)")

    @classmethod
    def from_flower(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's run config (flat, dotted keys; those absent take their default)."""
        known = run_config_keys()
        unknown = sorted(set(values) - set(known))
        if unknown:
            hint = {key: LEGACY_KEYS[key] for key in unknown if key in LEGACY_KEYS}
            raise ValueError(f"unknown run config keys {unknown}"
                             + (f" (the keys are grouped now: {hint})" if hint else "")
                             + f"; known keys: {sorted(known)}")
        fields: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        for key, value in values.items():
            group, name, hint = known[key]
            fields[group][name] = _coerce(key, value, hint)
        fields["train"]["weight_scheme"] = _group("weights", fields["weights"])  # the one nested group
        return cls(**{group: _group(group, fields[group]) for group in GROUPS if len(GROUPS[group].path) == 1})

    def to_flower(self) -> dict[str, Any]:
        """Flower's flat run config of this config: every key."""
        return {key: _get(self, GROUPS[group].path + (name,)) for key, (group, name, _) in run_config_keys().items()}

    @classmethod
    def flower_toml(cls) -> str:
        """The `[tool.flwr.app.config]` table of pyproject.toml: every key with its default and
        help, by group, generated from the fields (`nextquill run-config` prints it; a test keeps
        the file equal to it)."""
        defaults, lines = cls(), []
        for name, group in GROUPS.items():
            lines.append(f"# {name}: {group.about}")
            settings = _get(defaults, group.path)
            for spec in _run_config_fields(group.settings):
                value = getattr(settings, spec.name)
                lines.append(f"{key_of(name, spec.name)} = {_toml_value(value)}  # {spec.metadata['help']}")
        return "\n".join(lines) + "\n"

    @property
    def weights(self) -> WeightScheme:
        return self.train.weight_scheme

    @property
    def needs_expert(self) -> bool:
        """Whether the personalization method weights tokens with the expert's DCE or aligns
        effects against the expert's generic texts."""
        return self.train.needs_expert

    @property
    def expert_phase(self) -> bool:
        """The run trains its expert (federated ContextSFT) before personalizing."""
        return self.needs_expert and not self.expert.adapter and self.expert.rounds > 0

    def resolve(self, path: str) -> Path:
        """A path of the config: relative ones are under the data directory, because the
        apps run wherever Flower starts them, not where `flwr run` was typed."""
        resolved = Path(path).expanduser()
        return resolved if resolved.is_absolute() else data_dir() / resolved

    @property
    def releases(self) -> int:
        """The aggregated rounds a run plans: its expert phase's (when it trains one) and its
        personalization's. Differential privacy covers them all."""
        return (self.expert.rounds if self.expert_phase else 0) + self.federation.rounds

    def train_config(self, method: str, seed: int) -> TrainConfig:
        """A round's local training with `method`: the personalization method (`train`), or the
        expert phase's context-sft."""
        if method == self.train.method:
            return dataclasses.replace(self.train, max_steps=self.federation.local_steps, seed=seed)
        return dataclasses.replace(self.train, method=method, max_steps=self.federation.local_steps, seed=seed,
                                   history_dropout=self.expert.history_dropout if one_history_pass(method) else 0.0)


def key_of(group: str, name: str) -> str:
    """The run-config key of field `name` of `group`: `train.learning-rate`; a field named
    after its group does not repeat it (`lora.r`, not `lora.lora-r`)."""
    kebab = name.replace("_", "-")
    return f"{group}.{kebab.removeprefix(group + '-')}"


@functools.cache  # read on every message a device handles
def run_config_keys() -> dict[str, tuple[str, str, Any]]:
    """Every run-config key -> (its group, the field's name, the field's type)."""
    known = {}
    for name, group in GROUPS.items():
        hints = get_type_hints(group.settings)
        for spec in _run_config_fields(group.settings):
            known[key_of(name, spec.name)] = (name, spec.name, hints[spec.name])
    return known


def _run_config_fields(settings: type) -> list[dataclasses.Field]:
    """The fields of a group that have a key: all but those marked `in_run_config=False` (the
    train group's weight scheme among them: its keys are the weights group's)."""
    return [spec for spec in dataclasses.fields(settings) if spec.metadata.get("in_run_config", True)]


def _group(name: str, fields: dict[str, Any]) -> Any:
    try:
        return GROUPS[name].settings(**fields)
    except SettingError as error:  # named as the user wrote it: the key
        raise error.renamed(f"run config {key_of(name, error.name.replace('-', '_'))}") from None


def _get(config: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # a TOML basic string, integer or float alike


def _coerce(key: str, value: Any, kind: Any) -> Any:
    # TOML integers are fine where a float is expected; nothing else is converted.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ValueError(f"run config {key} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


# The flat keys of run directories written before the keys were grouped -> today's keys.
LEGACY_KEYS = {
    "model": "base.model", "quantization": "base.quantization", "device": "base.device",
    "compute-dtype": "base.compute-dtype", "quantized-cache": "base.quantized-cache",
    "dataset": "users.dataset", "users-dir": "users.dir", "users-seed": "users.seed",
    "preference-strength": "users.preference-strength", "users-builder": "users.builder",
    "clients-per-round": "federation.clients-per-round", "rounds": "federation.rounds",
    "local-steps": "federation.local-steps", "min-replies": "federation.min-replies",
    "max-update-norm": "federation.max-update-norm", "round-timeout": "federation.round-timeout",
    "connect-timeout": "federation.connect-timeout", "run-dir": "federation.run-dir", "seed": "federation.seed",
    "evaluate-every": "evaluate.every", "evaluate-clients": "evaluate.clients", "evaluate-base": "evaluate.base",
    "expert-rounds": "expert.rounds", "expert": "expert.adapter",
    "batch-size": "train.batch-size", "learning-rate": "train.learning-rate", "method": "train.method",
    "alpha": "train.alpha", "lean-memory": "train.lean-memory", "paired-pass": "train.paired-pass",
    "fused-loss": "train.fused-loss", "compile-layers": "train.compile-layers",
    "mce-reference": "train.mce-reference",
    "dce-reference": "weights.dce-reference", "weighting": "weights.weighting", "delta": "weights.delta",
    "weight-high": "weights.weight-high", "weight-low": "weights.weight-low",
    "keep-fraction": "weights.keep-fraction",
    "split": "sharing.split", "shared-layers": "sharing.shared-layers",
    "transport-dtype": "sharing.transport-dtype", "pack-shared": "sharing.pack",
    "lora-r": "lora.r", "lora-alpha": "lora.alpha",
    "history-tokens": "prompt.history-tokens", "context-tokens": "prompt.context-tokens",
    "response-tokens": "prompt.response-tokens", "empty-history": "prompt.empty-history",
    "dp": "dp.mode", "dp-clip": "dp.clip", "dp-noise": "dp.noise", "dp-epsilon": "dp.epsilon",
    "dp-delta": "dp.delta",
    "secure-aggregation": "secagg.enabled", "secagg-shares": "secagg.shares",
    "secagg-threshold": "secagg.threshold",
}


def upgrade_keys(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A run config saved with flat keys, in today's grouped keys (one with grouped keys is
    returned as it is). The one flat key that became two: `history-dropout` applied to the
    expert phase and to a one-pass personalization method alike."""
    if not any(key in LEGACY_KEYS for key in saved):
        return dict(saved)
    upgraded = {LEGACY_KEYS.get(key, key): value for key, value in saved.items() if key != "history-dropout"}
    if "history-dropout" not in saved:
        return upgraded
    dropout = saved["history-dropout"]
    method = saved.get("method", TrainConfig().method)
    upgraded["train.history-dropout"] = dropout if method in METHODS and one_history_pass(method) else 0.0
    needs_expert = method in METHODS and (METHODS[method].needs_expert or (
        METHODS[method].aligns_effects and saved.get("mce-reference") == "generic"))
    expert_phase = needs_expert and not saved.get("expert") and saved.get("expert-rounds", 0)
    upgraded["expert.history-dropout"] = dropout if expert_phase else 0.0
    return upgraded
