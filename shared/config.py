"""Every setting of NextQuill-Fed: one dataclass per concern, each field with its help and the
values it accepts (`shared.settings`, PEFT's `LoraConfig` style).

  BaseSpec      which base model and how it is loaded
  PromptConfig  the token budgets of a prompt
  LoraSettings  the LoRA every method trains
  WeightScheme  how the expert's DCE becomes token weights ω
  GenerationSettings  decoding in evaluation
  TrainConfig   local training: method, steps, optimiser, NextQuill's alpha, forward passes
  PrivacySettings  differential privacy of the shared update (`shared/privacy.py`)
  and what only a federated run has: UsersSettings (simulated users), FederationSettings
  (rounds, sampling, robustness, the run directory), EvaluationSettings, ExpertSettings (the
  expert phase), SharingSettings (what travels, how), SecAggSettings.

`shared/run_config.py` makes Flower's run config (`[tool.flwr.app.config]`) of these groups:
`RunConfig` holds the group objects themselves, one key per field (`train.learning-rate`), so
that each field, its help, its rules and its default are written once, here.

The command line's options are generated from the same fields (`simulations/cli.py`). This
module is a leaf: it imports no model code (choices are constants here, the method table is
plain data), so that reading or checking a config never loads torch or bitsandbytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from shared.methods import METHODS, Method
from shared.named_bases import NAMED_BASES
from shared.settings import SettingError, check_settings, setting
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

    model: str = setting("smollm2-135m", f"one of {list(NAMED_BASES)} (built or converted on first use) or a local "
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

    history_tokens: int = setting(96, "prompt budget of the history items, in tokens", minimum=1)
    context_tokens: int = setting(32, "prompt budget of the context x, in tokens (its end is kept)", minimum=1)
    response_tokens: int = setting(32, "budget of the response y, in tokens, end marker included", minimum=1)
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
        "names of the linear layers that get a LoRA", in_run_config=False,
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
            raise SettingError("weight_low", f"(ε) = {self.weight_low} must not exceed weight-high (λ) = "
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
    epochs: float = setting(2.0, "passes over the training samples", above=0.0, maximum=1e6, in_run_config=False)
    max_steps: int | None = setting(None, "stop after this many steps (overrides epochs)", minimum=1,
                                    in_run_config=False)  # a federated round's: federation.local-steps
    batch_size: int = setting(4, "samples per step", minimum=1)
    learning_rate: float = setting(3e-4, "AdamW learning rate of the LoRA", above=0.0)
    alpha: float = setting(0.1, "NextQuill's α: the weight of the causal preference alignment loss L_p", minimum=0.0)
    weight_scheme: WeightScheme = setting(default_factory=WeightScheme, help="DCE -> token weights ω",
                                          in_run_config=False)  # its keys are the weights group's
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
        0.0, "the fraction of steps of a method that reads the history in one pass (context-sft, dce-only) "
             "that read the prompt with the history removed, so that the no-history prompt learns what every "
             "user's targets share", minimum=0.0, maximum=1.0,
    )
    seed: int = setting(0, "seed of the sample order and of the LoRA initialisation", minimum=0, in_run_config=False)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.history_dropout and not one_history_pass(self.method):
            raise SettingError("history_dropout", f"applies to a method that reads the history in one pass "
                                                  f"(context-sft, dce-only), not to {self.method!r}")
        if self.fused_loss:
            other = [name for name in ("paired_pass", "lean_memory", "history_dropout") if getattr(self, name)]
            if other or self.spec.weights == "self":
                raise SettingError("fused_loss", f"does not combine with {', '.join(other) or 'method ' + self.method}"
                                                 ": its passes read hidden states, not logits")

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

    mode: str = setting(
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
        if self.mode == "local" and not self.dp_epsilon and not self.dp_noise:
            raise SettingError("dp_noise", "must be above 0 with local DP (or set dp.epsilon)")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def central(self) -> bool:
        """The coordinator adds the noise (server- or client-side clipping)."""
        return self.mode in ("server", "client")


@dataclass(frozen=True)
class UsersSettings:
    """Simulation only: whose data the simulated devices hold."""

    dataset: str = setting("reviewers", "'shakespeare', 'synthetic', 'reviewers', 'chitchat' (real users' chat "
                                        "messages) or the path of a LaMP-style JSON file")
    dir: str = setting("", "folder of the user stores (default users/<dataset>, with the users seed and preference "
                           "strength where not the defaults)")
    seed: int = setting(0, "the seed that builds the synthetic users and reviewers and draws the chitchat users",
                        minimum=0)
    preference_strength: float = setting(
        0.0, "reviewers: the share of a user's style words drawn from its favourites (up to 1.0; 0: the builder's "
             "own, 0.75 to 0.8)", minimum=0.0, maximum=1.0,
    )
    builder: str = setting(
        "simulations.datasets.simulated:simulated_user_stores",
        "'module:function' that gives the simulated users' store folders for (run config, number of SuperNodes), "
        "building them on first use", pattern=r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", pattern_help="'package.module:function'",
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if self.preference_strength and self.dataset != "reviewers":
            raise SettingError("preference_strength", f"applies to dataset 'reviewers', not to {self.dataset!r}")


@dataclass(frozen=True)
class FederationSettings:
    """The rounds of a federated run: how many, who takes part, what a round accepts, where the
    coordinator writes."""

    rounds: int = setting(2, "personalization rounds", minimum=0)
    local_steps: int = setting(3, "local training steps per round", minimum=1)
    clients_per_round: int = setting(2, "clients sampled per training round", minimum=1)
    min_replies: int = setting(1, "fewest valid replies a round may aggregate", minimum=1)
    max_update_norm: float = setting(
        0.0, "exclude a reply whose update of the shared parameters has an L2 norm above this (a poisoned or broken "
             "device; 0: no bound; rounds.jsonl's update-norm-max shows the usual size)", minimum=0.0,
    )
    round_timeout: float = setting(1800.0, "seconds to wait for a round's replies", above=0.0)
    connect_timeout: float = setting(
        300.0, "seconds to wait for federation.clients-per-round SuperNodes to connect; then the run goes on with "
               "those connected (at least federation.min-replies) or ends with a message", above=0.0,
    )
    run_dir: str = setting("runs/federated", "where the coordinator writes; reruns resume (relative: under the data "
                                             "directory)")
    seed: int = setting(0, "seed of client sampling and initialisation", minimum=0)

    def __post_init__(self) -> None:
        check_settings(self)
        relative = os.path.normpath(os.path.expanduser(self.run_dir)) if self.run_dir.strip() else "."
        if not os.path.isabs(relative) and (relative == "." or relative.split(os.sep)[0] == ".."):
            raise SettingError("run_dir", f"{self.run_dir!r} is the data directory itself or leads out of it: give "
                                          "a folder under it, or an absolute path")
        if self.min_replies > self.clients_per_round:
            raise SettingError("min_replies", f"({self.min_replies}) exceeds clients-per-round "
                                              f"({self.clients_per_round})")


@dataclass(frozen=True)
class EvaluationSettings:
    """When and on whom a federated run evaluates."""

    every: int = setting(1, "also evaluate every N personalization rounds (0: only after the last)", minimum=0)
    clients: int = setting(0, "devices sampled per evaluation (0: every one)", minimum=0)
    base: bool = setting(True, "also evaluate the base alone (no adapter) on the same samples: what "
                               "personalization bought")

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class ExpertSettings:
    """The expert whose DCE weights the tokens: trained in the run's first phase (federated
    ContextSFT), or given."""

    rounds: int = setting(1, "rounds of federated ContextSFT for the expert", minimum=0)
    adapter: str = setting("", "an existing expert adapter directory (skips the expert phase)")
    history_dropout: float = setting(
        0.0, "the fraction of the expert phase's ContextSFT steps that read the prompt with the history removed",
        minimum=0.0, maximum=1.0,
    )

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class SharingSettings:
    """Which LoRA parameters are shared (`shared/split.py`) and how they travel."""

    split: str = setting("dual", f"shared / personal split: one of {list(SPLIT_KINDS)}", choices=SPLIT_KINDS)
    shared_layers: int = setting(0, "with split 'layers': decoder layers shared", minimum=0)
    transport_dtype: str = setting(
        "float32", f"dtype the shared parameters travel in: one of {list(TRANSPORT_DTYPES)}", choices=TRANSPORT_DTYPES
    )
    pack: bool = setting(
        True, "send the shared parameters as one flat array (Flower sends each array as its own object with its "
              "own request: packed, far fewer wire bytes and requests); false: one array per parameter",
    )

    def __post_init__(self) -> None:
        check_settings(self)
        try:
            self.spec  # noqa: B018  (the split checks its own layers)
        except ValueError as error:
            raise SettingError("shared_layers", f"does not fit split {self.split!r}: {error}") from None

    @property
    def spec(self) -> SplitSpec:
        return SplitSpec(self.split, self.shared_layers)


@dataclass(frozen=True)
class SecAggSettings:
    """Flower's SecAgg+ on every training round."""

    enabled: bool = setting(
        False, "the coordinator only ever sees the sum of the shared updates and of the train metrics, never one "
               "device's (updates weigh the same; needs federation.clients-per-round >= 2; not with central DP or "
               "federation.max-update-norm, which need each update)",
    )
    shares: float = setting(
        1.0, "the fraction of a round's devices each device shares its key with (more: survives more dropouts, "
             "costs more)", above=0.0, maximum=1.0,
    )
    threshold: float = setting(
        0.5, "the fraction of a device's key shares needed to unmask (more: stronger against collusion, fewer "
             "dropouts survived)", above=0.0, maximum=1.0,
    )

    def __post_init__(self) -> None:
        check_settings(self)


def one_history_pass(method: str) -> bool:
    """The method reads the history in a single pass (ContextSFT, DCE-only): the ones history
    dropout applies to."""
    return METHODS[method].uses_history and not METHODS[method].aligns_effects
