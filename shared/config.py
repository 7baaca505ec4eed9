"""Every setting of NextQuill-Fed: one dataclass per concern, each field with its help and the
values it accepts (`shared.settings`, PEFT's `LoraConfig` style).

  BaseSpec      which base model and how it is loaded
  PromptConfig  the token budgets of a prompt
  LoraSettings  the LoRA every method trains
  WeightScheme  how the expert's DCE becomes token weights ω
  GenerationSettings  decoding in evaluation
  TrainConfig   local training: method, steps, optimiser, NextQuill's alpha, forward passes
  PrivacySettings  differential privacy of the shared update (`shared/privacy.py`)
  RunConfig     Flower's run config (`[tool.flwr.app.config]`): its keys are views of the
                fields above (`like`), plus what only a federated run has

The command line's options are generated from the same fields (`simulations/cli.py`). This
module is a leaf: it imports no model code (choices are constants here, the method table is
plain data), so that reading or checking a config never loads torch or bitsandbytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from shared.methods import METHODS, Method
from shared.named_bases import NAMED_BASES
from shared.paths import data_dir
from shared.settings import SettingError, check_settings, like, setting
from shared.split import SPLIT_KINDS, SplitSpec

QUANTIZATIONS = ("nf4", "none")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
WEIGHTINGS = ("threshold", "continuous", "fraction")
# The counterfactual history h_ref (DESIGN.md, "The three quantities"): what the user's history
# is replaced by when an effect of the history is measured. `client/reference.py` builds it.
REFERENCES = ("removed", "placeholder", "generic", "donors")
TRANSPORT_DTYPES = ("float32", "float16")
EMPTY_HISTORIES = ("removed", "none")
DP_MODES = ("off", "server", "client", "local")


@dataclass(frozen=True)
class BaseSpec:
    """Which base model and how to load it."""

    model: str = setting("tiny", f"one of {list(NAMED_BASES)} (built or converted on first use) or a local "
                                 "Hugging Face model directory")
    quantization: str = setting("nf4", "'nf4' (bitsandbytes 4-bit, double quantization) or 'none'",
                                choices=QUANTIZATIONS)
    device: str = setting("auto", "where the model computes: auto (CUDA when present), cpu, cuda, cuda:N",
                          pattern=r"auto|cpu|cuda(:[0-9]+)?", pattern_help="auto, cpu, cuda or cuda:N")
    compute_dtype: str = setting(
        "auto", "compute dtype of 4-bit layers: auto is bfloat16 on CUDA and float32 on the CPU (where bfloat16 "
                "products are about 10x slower without native support); unquantized CPU models stay float32",
        choices=COMPUTE_DTYPES,
    )
    quantized_cache: bool = setting(
        True, "keep a 4-bit base quantized on disk (in the data directory) after its first load, so that a "
              "reload (a deployed device loads it for every message) reads it instead of quantizing again",
    )

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class PromptConfig:
    """Token budgets of the prompt parts."""

    history_tokens: int = setting(160, "prompt budget of the history items, in tokens", minimum=1)
    context_tokens: int = setting(48, "prompt budget of the context x, in tokens (its end is kept)", minimum=1)
    response_tokens: int = setting(48, "budget of the response y, in tokens, end marker included", minimum=1)
    use_chat_template: bool = setting(True, "render through the tokenizer's chat template when it has one")
    empty_history: str = setting(
        "removed", "the history-free prompt (x, ∅): 'removed' (no history block, the paper) or 'none' (the block "
                   "holds the literal None, as the authors' dataset code writes it)", choices=EMPTY_HISTORIES,
    )

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA every method trains (the same shape for every method, so they compare fairly).
    Named as PEFT's `LoraConfig` names them; `lora_alpha` is LoRA's scaling, not NextQuill's α."""

    lora_r: int = setting(8, "LoRA rank (of each adapter)", minimum=1)
    lora_alpha: int = setting(16, "LoRA scaling numerator (scale = lora_alpha / lora_r)", minimum=1)
    lora_dropout: float = setting(0.0, "dropout on the LoRA input", minimum=0.0, maximum=0.99)
    target_modules: tuple[str, ...] = setting(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "names of the linear layers that get a LoRA",
    )

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class WeightScheme:
    """How the expert's DCE becomes token weights ω (`shared.losses.token_weights`), and which
    counterfactual history the DCE is measured against."""

    dce_reference: str = setting(
        "generic", "h_ref of the expert's DCE = p_E(y_t | x, h) - p_E(y_t | x, h_ref): 'removed' (no history, the "
                   "paper), 'placeholder' (the literal None, the authors' code), 'generic' (the expert's own "
                   "history-free text for each past item's input, computed and cached on the device) or 'donors' "
                   "(other users' histories, probabilities averaged: simulation only)", choices=REFERENCES,
    )
    weighting: str = setting("threshold", "DCE -> token weight: 'threshold' (the paper's: DCE > delta), "
                                          "'continuous' (threshold-free) or 'fraction' (the keep-fraction of a "
                                          "user's tokens with the highest DCE)", choices=WEIGHTINGS)
    delta: float = setting(0.05, "threshold on DCE (a probability difference, in [-1, 1]) above which ω = "
                                 "weight-high", minimum=-1.0, maximum=1.0)
    weight_high: float = setting(0.9, "λ: the weight of a preference-bearing token", above=0.0, maximum=1.0)
    weight_low: float = setting(0.5, "ε: the weight of any other token (0.5: chosen on a validation split; the "
                                    "paper's 0.1 trains what the history does not predict, content and secrets "
                                    "alike, less)", minimum=0.0, maximum=1.0)
    keep_fraction: float = setting(0.3, "with weighting 'fraction': the share of a user's training tokens that get "
                                        "weight-high (those of highest DCE)", above=0.0, maximum=1.0)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.weight_low > self.weight_high:
            raise SettingError("weight-low", f"(ε) = {self.weight_low} must not exceed weight-high (λ) = "
                                             f"{self.weight_high}")


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings (recorded with every evaluation)."""

    max_new_tokens: int | None = setting(None, "tokens generated at most (default: the response budget)", minimum=1)
    do_sample: bool = setting(False, "sample instead of deterministic greedy decoding")
    num_beams: int = setting(1, "beams of beam search (1: none)", minimum=1)
    repetition_penalty: float = setting(1.0, "transformers' repetition penalty (1: none)", above=0.0)
    batch_size: int = setting(16, "prompts generated together", minimum=1)

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class TrainConfig:
    """Local training of one LoRA with one method (`shared.methods`)."""

    method: str = setting("nextquill", f"one of {list(METHODS)}", choices=tuple(METHODS))
    epochs: float = setting(2.0, "passes over the training samples", above=0.0, maximum=1e6)
    max_steps: int | None = setting(None, "stop after this many steps (overrides epochs)", minimum=1)
    batch_size: int = setting(8, "samples per step", minimum=1)
    learning_rate: float = setting(3e-4, "AdamW learning rate of the LoRA", above=0.0)
    alpha: float = setting(0.1, "NextQuill's α: the weight of the causal preference alignment loss L_p", minimum=0.0)
    weight_scheme: WeightScheme = setting(default_factory=WeightScheme, help="DCE -> token weights ω")
    paired_pass: bool = setting(
        False, "NextQuill's with- and no-history passes as one forward (block-diagonal mask) instead of two; same "
               "gradients",
    )
    lean_memory: bool = setting(
        False, "two-stage NextQuill backward: same gradients, the peak memory of the longer pass alone, for one "
               "more short forward"
    )
    fused_loss: bool = setting(
        False, "the loss reads the final hidden states and applies the LM head a chunk of tokens at a time (the "
               "alignment logits as the head applied to the two passes' difference): same loss and gradients, "
               "without every token's logits of both passes in memory; not with paired_pass, lean_memory, "
               "history_dropout or the model's own token weights",
    )
    compile_layers: bool = setting(
        False, "compile each decoder layer with torch.compile while training (regional compilation: one compiled "
               "layer serves them all; inductor fuses the work around the 4-bit products): same loss and gradients; "
               "costs 10 to 40 s of compiling per process, paid back after tens of steps; on the CPU needs a C++ "
               "compiler",
    )
    mce_reference: str = setting(
        "removed", "h_ref of the model-side effect in L_p, MCE = z(x, h) - z(x, h_ref): the same choices as the "
                   "DCE's reference ('generic' needs the expert)", choices=REFERENCES,
    )
    history_dropout: float = setting(
        0.0, "ContextSFT, DCE-only: the fraction of steps that read the prompt with the history removed, so "
             "that an expert's no-history prompt learns what every user's targets share",
        minimum=0.0, maximum=1.0,
    )
    seed: int = setting(0, "seed of the sample order and of the LoRA initialisation", minimum=0)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.history_dropout and not _one_history_pass(self.method):
            raise ValueError(f"history_dropout applies to a method that reads the history in one pass "
                             f"(context-sft, dce-only), not to {self.method!r}")
        if self.fused_loss:
            other = [name for name in ("paired_pass", "lean_memory", "history_dropout") if getattr(self, name)]
            if other or self.spec.weights == "self":
                raise ValueError(f"fused_loss does not combine with {', '.join(other) or 'method ' + self.method}: "
                                 "its passes read hidden states, not logits")

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    @property
    def needs_expert(self) -> bool:
        """The expert's DCE weights the tokens, or its texts make L_p's counterfactual history."""
        return self.spec.needs_expert or (self.spec.aligns_effects and self.mce_reference == "generic")


@dataclass(frozen=True)
class PrivacySettings:
    """Differential privacy of the shared update, with Flower's own wrappers and mods; ε from
    Flower's RDP accountant (`shared/privacy.py` says what each mode trusts)."""

    dp: str = setting(
        "off", "differential privacy of the shared update: 'off', 'server' (the coordinator clips each update and "
               "adds noise), 'client' (devices clip, the coordinator adds noise) or 'local' (devices clip and add "
               "noise)", choices=DP_MODES,
    )
    dp_clip: float = setting(1.0, "L2 bound on one device's update of the shared parameters in one round", above=0.0)
    dp_noise: float = setting(
        1.0, "noise multiplier σ: Gaussian noise of std σ × dp-clip (central DP: on the sum of the updates); "
             "ignored when dp-epsilon is set", minimum=0.0,
    )
    dp_epsilon: float = setting(
        0.0, "target ε of the whole run (every aggregated round, the expert phase's included): sets σ (0: use "
             "dp-noise)", minimum=0.0,
    )
    dp_delta: float = setting(1e-5, "δ of the (ε, δ) guarantee", above=0.0, maximum=0.1)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.dp == "local" and not self.dp_epsilon and not self.dp_noise:
            raise SettingError("dp_noise", "must be above 0 with local DP (or set dp_epsilon)")

    @property
    def enabled(self) -> bool:
        return self.dp != "off"

    @property
    def central(self) -> bool:
        """The coordinator adds the noise (server- or client-side clipping)."""
        return self.dp in ("server", "client")


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated NextQuill run is configured by: `[tool.flwr.app.config]` in
    pyproject.toml (and `flwr run --run-config`), keys in kebab-case. Relative paths (run-dir,
    users-dir, expert, a dataset file) are under the data directory. The number of users is the
    number of SuperNodes (in simulation `--federation-config "num-supernodes=N"`), not a key."""

    model: str = like(BaseSpec, "model", default="smollm2-135m")
    quantization: str = like(BaseSpec, "quantization")
    device: str = like(BaseSpec, "device")
    compute_dtype: str = like(BaseSpec, "compute_dtype")
    quantized_cache: bool = like(BaseSpec, "quantized_cache")
    dataset: str = setting(
        "reviewers", "simulation users: 'shakespeare', 'synthetic', 'reviewers', 'chitchat' (real users' chat "
                       "messages) or the path of a LaMP-style JSON file"
    )
    users_dir: str = setting("", "simulation: folder of the user stores (default users/<dataset>, with the users "
                                 "seed and preference strength where not the defaults)")
    users_seed: int = setting(0, "simulation: the seed that builds the synthetic users and reviewers and draws the "
                                 "chitchat users", minimum=0)
    preference_strength: float = setting(
        0.0, "simulation, reviewers: the share of a user's style words drawn from its favourites (up to 1.0; 0: the "
             "builder's own, 0.75 to 0.8)", minimum=0.0, maximum=1.0,
    )
    users_builder: str = setting(
        "simulations.datasets.simulated:simulated_user_stores",
        "simulation: 'module:function' that gives the simulated users' store folders for (run config, number of "
        "SuperNodes), building them on first use", pattern=r"[A-Za-z_][\w.]*:[A-Za-z_]\w*",
        pattern_help="'package.module:function'",
    )
    clients_per_round: int = setting(2, "clients sampled per training round", minimum=1)
    expert_rounds: int = setting(1, "rounds of federated ContextSFT for the expert", minimum=0)
    rounds: int = setting(2, "personalization rounds", minimum=0)
    evaluate_every: int = setting(
        1, "also evaluate every N personalization rounds (0: only after the last)", minimum=0
    )
    evaluate_clients: int = setting(0, "devices sampled per evaluation (0: every one)", minimum=0)
    evaluate_base: bool = setting(
        True, "also evaluate the base alone (no adapter) on the same samples: what personalization bought"
    )
    local_steps: int = like(TrainConfig, "max_steps", default=3, help="local training steps per round")
    batch_size: int = like(TrainConfig, "batch_size", default=4)
    learning_rate: float = like(TrainConfig, "learning_rate")
    method: str = like(TrainConfig, "method")
    alpha: float = like(TrainConfig, "alpha")
    lean_memory: bool = like(TrainConfig, "lean_memory")
    paired_pass: bool = like(TrainConfig, "paired_pass")
    fused_loss: bool = like(TrainConfig, "fused_loss")
    compile_layers: bool = like(TrainConfig, "compile_layers")
    history_dropout: float = like(
        TrainConfig, "history_dropout", help="the fraction of ContextSFT steps (the expert phase's, or a context-sft "
                                             "or dce-only run's) that read the prompt with the history removed",
    )
    dce_reference: str = like(WeightScheme, "dce_reference")
    mce_reference: str = like(TrainConfig, "mce_reference")
    weighting: str = like(WeightScheme, "weighting")
    delta: float = like(WeightScheme, "delta")
    weight_high: float = like(WeightScheme, "weight_high")
    weight_low: float = like(WeightScheme, "weight_low")
    keep_fraction: float = like(WeightScheme, "keep_fraction")
    split: str = setting("dual", f"shared / personal split: one of {list(SPLIT_KINDS)}", choices=SPLIT_KINDS)
    shared_layers: int = setting(0, "with split 'layers': decoder layers shared", minimum=0)
    transport_dtype: str = setting(
        "float32", f"dtype the shared parameters travel in: one of {list(TRANSPORT_DTYPES)}", choices=TRANSPORT_DTYPES
    )
    pack_shared: bool = setting(
        True, "send the shared parameters as one flat array (Flower sends each array as its own object with its "
              "own request: packed, far fewer wire bytes and requests); false: one array per parameter",
    )
    lora_r: int = like(LoraSettings, "lora_r")
    lora_alpha: int = like(LoraSettings, "lora_alpha")
    history_tokens: int = like(PromptConfig, "history_tokens", default=96)
    context_tokens: int = like(PromptConfig, "context_tokens", default=32)
    response_tokens: int = like(PromptConfig, "response_tokens", default=32)
    empty_history: str = like(PromptConfig, "empty_history")
    expert: str = setting("", "an existing expert adapter directory (skips phase 1)")
    min_replies: int = setting(1, "fewest valid replies a round may aggregate", minimum=1)
    max_update_norm: float = setting(
        0.0, "exclude a reply whose update of the shared parameters has an L2 norm above this (a poisoned or broken "
             "device; 0: no bound; rounds.jsonl's update-norm-max shows the usual size)", minimum=0.0,
    )
    round_timeout: float = setting(1800.0, "seconds to wait for a round's replies", above=0.0)
    connect_timeout: float = setting(
        300.0, "seconds to wait for clients-per-round SuperNodes to connect; then the run goes on with those "
               "connected (at least min-replies) or ends with a message", above=0.0,
    )
    dp: str = like(PrivacySettings, "dp")
    dp_clip: float = like(PrivacySettings, "dp_clip")
    dp_noise: float = like(PrivacySettings, "dp_noise")
    dp_epsilon: float = like(PrivacySettings, "dp_epsilon")
    dp_delta: float = like(PrivacySettings, "dp_delta")
    secure_aggregation: bool = setting(
        False, "Flower's SecAgg+ on every training round: the coordinator only ever sees the sum of the shared "
               "updates and of the train metrics, never one device's (updates weigh the same; needs "
               "clients-per-round >= 2; not with central DP or max-update-norm, which need each update)",
    )
    secagg_shares: float = setting(
        1.0, "SecAgg+: the fraction of a round's devices each device shares its key with (more: survives more "
             "dropouts, costs more)", above=0.0, maximum=1.0,
    )
    secagg_threshold: float = setting(
        0.5, "SecAgg+: the fraction of a device's key shares needed to unmask (more: stronger against collusion, "
             "fewer dropouts survived)", above=0.0, maximum=1.0,
    )
    run_dir: str = setting("runs/federated", "where the coordinator writes; reruns resume (relative: under the data "
                                             "directory)")
    seed: int = setting(0, "seed of client sampling and initialisation", minimum=0)

    def __post_init__(self) -> None:
        check_settings(self, label=lambda name: f"run config {_key(name)}")
        relative = os.path.normpath(os.path.expanduser(self.run_dir)) if self.run_dir.strip() else "."
        if not os.path.isabs(relative) and (relative == "." or relative.split(os.sep)[0] == ".."):
            raise SettingError("run config run-dir", f"{self.run_dir!r} is the data directory itself or leads out of "
                                                     "it: give a folder under it, or an absolute path")
        if self.min_replies > self.clients_per_round:
            raise SettingError("run config min-replies",
                               f"({self.min_replies}) exceeds clients-per-round ({self.clients_per_round})")
        if self.preference_strength and self.dataset != "reviewers":
            raise SettingError("run config preference-strength", f"applies to dataset 'reviewers', not to "
                                                                 f"{self.dataset!r}")
        if self.history_dropout and self.expert_rounds == 0 and not _one_history_pass(self.method):
            raise SettingError("run config history-dropout", f"applies to the expert phase (expert-rounds >= 1) or "
                                                             f"a context-sft or dce-only run, not to {self.method!r}")
        if self.fused_loss:
            other = [_key(name) for name in ("paired_pass", "lean_memory", "history_dropout") if getattr(self, name)]
            if other or METHODS[self.method].weights == "self":
                raise SettingError("run config fused-loss", f"does not combine with "
                                   f"{', '.join(other) or 'method ' + self.method}: its passes read hidden states")
        try:  # the objects derived from the keys check what they hold (same names, kebab-case)
            self.base_spec, self.prompt, self.weight_scheme, self.lora, self.privacy  # noqa: B018
        except SettingError as error:
            raise error.renamed(f"run config {_key(error.name)}") from None
        self.split_spec  # noqa: B018  (raises on an invalid split / shared-layers pair)
        if self.needs_expert and not self.expert and self.expert_rounds == 0:
            raise SettingError("run config method", f"{self.method!r} (with mce-reference {self.mce_reference!r}) "
                                                    "needs an expert: set expert-rounds >= 1 or expert to an "
                                                    "existing expert adapter directory")
        if self.secure_aggregation:
            if not 2 <= self.clients_per_round <= 1023:
                raise SettingError("run config secure-aggregation", "needs clients-per-round from 2 (a sum of one "
                                                                    "update is that update) to 1023 (SecAgg+'s "
                                                                    "32-bit sums of 22-bit values)")
            if self.split == "local":
                raise SettingError("run config secure-aggregation", "has nothing to aggregate with split 'local' "
                                                                    "(no parameter is shared)")
            if self.privacy.central or self.max_update_norm:
                raise SettingError("run config secure-aggregation", "cannot go with dp 'server' or 'client' or "
                                                                    "max-update-norm: they need each device's "
                                                                    "update, which SecAgg+ hides (dp 'local' works)")

    @classmethod
    def from_flower(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's run config (kebab-case keys)."""
        fields = {_key(f.name): f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown run config keys {unknown}; known keys: {sorted(fields)}")
        hints = get_type_hints(cls)
        return cls(**{fields[key]: _coerce(key, value, hints[fields[key]]) for key, value in values.items()})

    def to_flower(self) -> dict[str, Any]:
        return {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def flower_toml(cls) -> str:
        """The `[tool.flwr.app.config]` table of pyproject.toml: every key with its default and
        help, generated from the fields (`nextquill run-config` prints it; a test keeps the
        file equal to it)."""
        lines = [f"{_key(f.name)} = {_toml_value(f.default)}  # {f.metadata['help']}" for f in dataclasses.fields(cls)]
        return "\n".join(lines) + "\n"

    @property
    def needs_expert(self) -> bool:
        """Whether the personalization method weights tokens with the expert's DCE or aligns
        effects against the expert's generic texts."""
        return self.train_config(self.method, self.seed).needs_expert

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
        return BaseSpec(self.model, self.quantization, self.device, self.compute_dtype, self.quantized_cache)

    @property
    def prompt(self) -> PromptConfig:
        return PromptConfig(self.history_tokens, self.context_tokens, self.response_tokens,
                            empty_history=self.empty_history)

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(lora_r=self.lora_r, lora_alpha=self.lora_alpha)

    @property
    def weight_scheme(self) -> WeightScheme:
        return WeightScheme(self.dce_reference, self.weighting, self.delta, self.weight_high, self.weight_low,
                            self.keep_fraction)

    @property
    def privacy(self) -> PrivacySettings:
        return PrivacySettings(self.dp, self.dp_clip, self.dp_noise, self.dp_epsilon, self.dp_delta)

    @property
    def releases(self) -> int:
        """The aggregated rounds a run plans: its expert phase's (when it trains one) and its
        personalization's. Differential privacy covers them all."""
        return (self.expert_rounds if self.needs_expert and not self.expert else 0) + self.rounds

    def train_config(self, method: str, seed: int) -> TrainConfig:
        """A round's local training with `method` (the personalization method, or the expert
        phase's context-sft)."""
        return TrainConfig(method=method, max_steps=self.local_steps, batch_size=self.batch_size,
                           learning_rate=self.learning_rate, alpha=self.alpha, weight_scheme=self.weight_scheme,
                           paired_pass=self.paired_pass, lean_memory=self.lean_memory,
                           fused_loss=self.fused_loss, compile_layers=self.compile_layers,
                           mce_reference=self.mce_reference,
                           history_dropout=self.history_dropout if _one_history_pass(method) else 0.0, seed=seed)


def _key(name: str) -> str:
    return name.replace("_", "-")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # a TOML basic string, integer or float alike


def _coerce(key: str, value: Any, kind: type) -> Any:
    # TOML integers are fine where a float is expected; nothing else is converted.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ValueError(f"run config {key} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _one_history_pass(method: str) -> bool:
    """The method reads the history in a single pass (ContextSFT, DCE-only): the ones history
    dropout applies to."""
    return METHODS[method].uses_history and not METHODS[method].aligns_effects
