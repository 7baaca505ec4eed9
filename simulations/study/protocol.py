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

from shared.config import RunConfig
from shared.methods import METHODS
from shared.settings import check_settings, setting
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
        return self.central or METHODS[self.keys["method"]].needs_expert


# The settings of our headline rows: the run config's defaults when the cells were made (chosen on
# a validation split by `simulations/tune.py`), pinned so the cells keep their meaning.
OURS = {"dce-reference": "generic", "mce-reference": "removed", "weight-low": 0.5}
FAST = {"compute-dtype": "bfloat16", "compile-layers": True}
ABLATION_BASELINE = "nextquill-fed"

STUDY_METHODS: dict[str, StudyMethod] = {
    "base": StudyMethod("no training, no history", {"method": "sft", "rounds": 0}),
    "history-prompt": StudyMethod("no training, recent history in the prompt (retrieval)",
                                  {"method": "context-sft", "rounds": 0}),
    "fedit-sft": StudyMethod("FedAvg of one LoRA, no history", {"method": "sft", "split": "full"}),
    EXPERT_CELL: StudyMethod("FedAvg of one LoRA, history in the prompt (ContextSFT)",
                             {"method": "context-sft", "split": "full"}),
    "local": StudyMethod("one LoRA per user on its device only (OPPU-style)", {"method": "context-sft",
                                                                                "split": "local"}),
    "fedsa": StudyMethod("LoRA A shared, B personal; ContextSFT", {"method": "context-sft", "split": "a-shared"}),
    "feddpa": StudyMethod("shared + personal adapter; ContextSFT", {"method": "context-sft", "split": "dual"}),
    "nextquill-fed": StudyMethod("ours: NextQuill on the dual split (feddpa's adapters)",
                                 {"method": "nextquill", "split": "dual", **OURS}, group="ours"),
    "nextquill-fedavg": StudyMethod("ours: NextQuill's losses on one FedAvg LoRA (fedit-context-sft's adapter)",
                                    {"method": "nextquill", "split": "full", **OURS}, group="ours"),
    "weight-low-0.1": StudyMethod("ablation: ε = 0.1 (the paper's), on the dual split",
                                  {"method": "nextquill", "split": "dual", **OURS, "weight-low": 0.1},
                                  group="ablation"),
    "fedavg-weight-low-0.1": StudyMethod("ablation: ε = 0.1 (the paper's), on one FedAvg LoRA",
                                         {"method": "nextquill", "split": "full", **OURS, "weight-low": 0.1},
                                         group="ablation", paired_with="nextquill-fedavg"),
    # Whether the faster compute of a CPU with AMX (bfloat16 products, compiled decoder layers)
    # changes any metric: each paired with its float32, eager row.
    "feddpa-bf16-compiled": StudyMethod("compute: feddpa in bfloat16 with compiled layers",
                                        {"method": "context-sft", "split": "dual", **FAST}, group="compute",
                                        paired_with="feddpa"),
    "nextquill-fed-bf16-compiled": StudyMethod("compute: nextquill-fed in bfloat16 with compiled layers",
                                               {"method": "nextquill", "split": "dual", **OURS, **FAST},
                                               group="compute", paired_with="nextquill-fed"),
    "reference-removed": StudyMethod("ablation: DCE against the history removed (the paper's h_ref)",
                                     {"method": "nextquill", "split": "dual", "dce-reference": "removed"},
                                     group="ablation"),
    "reference-donors": StudyMethod("reference: DCE against other users' histories (simulation only)",
                                    {"method": "nextquill", "split": "dual", "dce-reference": "donors"},
                                    group="ablation"),
    "mce-generic": StudyMethod("ablation: L_p's MCE against the generic history too",
                               {"method": "nextquill", "split": "dual", "mce-reference": "generic"},
                               group="ablation"),
    "mce-only": StudyMethod("ablation: L_p, ω = 1", {"method": "mce-only"}, group="ablation"),
    "dce-only": StudyMethod("ablation: ω from DCE, α = 0", {"method": "dce-only"}, group="ablation"),
    "continuous": StudyMethod("ablation: continuous ω", {"method": "nextquill", "weighting": "continuous"},
                              group="ablation"),
    "alpha-0": StudyMethod("ablation: α = 0", {"method": "nextquill", "alpha": 0.0}, group="ablation"),
    "alpha-0.5": StudyMethod("ablation: α = 0.5", {"method": "nextquill", "alpha": 0.5}, group="ablation"),
    "authors-code": StudyMethod("ablation: ω from the trained model, unweighted L_p (the authors' code)",
                                {"method": "nextquill-authors"}, group="ablation"),
    "split-a-shared": StudyMethod("ablation: NextQuill on the A-shared split",
                                  {"method": "nextquill", "split": "a-shared"}, group="ablation"),
    "split-layers": StudyMethod("ablation: NextQuill, the first half of the layers shared",
                                {"method": "nextquill", "split": "layers", "shared-layers": "half"},
                                group="ablation"),
    "history-none": StudyMethod("ablation: h_ref as the literal None (the authors' data code), for DCE and MCE",
                                {"method": "nextquill", "dce-reference": "placeholder",
                                 "mce-reference": "placeholder"}, group="ablation"),
    "expert-dropout": StudyMethod("ContextSFT with the history dropped from half the steps' prompts (an expert "
                                  "whose no-history prompt learns what all users share)",
                                  {"method": "context-sft", "split": "full", "history-dropout": 0.5},
                                  group="ablation"),
    "nextquill-dropout-expert": StudyMethod("ablation: NextQuill on the dual split, ω from the `expert-dropout` "
                                            "expert", {"method": "nextquill", "split": "dual"},
                                            expert="expert-dropout", group="ablation"),
    # The quality cost of differential privacy (server-side clipping and noise, Flower's wrapper),
    # on the generated users. dp-clip 0.5: about the median update norm of these runs without DP.
    # The guarantee covers the personalization rounds; the expert (fedit-context-sft) has none.
    **{f"dp-{name}": StudyMethod(f"privacy: NextQuill-Fed with central DP, {what}",
                                 {"method": "nextquill", "split": "dual", "dp": "server", "dp-clip": 0.5, **keys},
                                 group="privacy", datasets=("reviewers",))
       for name, what, keys in (("clip-only", "updates clipped, no noise (ε = ∞)", {"dp-noise": 0.0}),
                                ("eps-8", "ε = 8", {"dp-epsilon": 8.0}), ("eps-4", "ε = 4", {"dp-epsilon": 4.0}),
                                ("eps-1", "ε = 1", {"dp-epsilon": 1.0}))},
    "nextquill-central": StudyMethod("reference: NextQuill on all users' data pooled on one machine",
                                     {"method": "nextquill"}, central=True, group="reference"),
}


# Which cells a run asks for; a study folder gathers the cells of every run with its protocol.
ASKED = ("datasets", "methods", "seeds")


HEADLINE = ("base", "history-prompt", EXPERT_CELL, "feddpa", "nextquill-fed", "nextquill-fedavg")


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs; the defaults are the size that fits a 2-core CPU on the real base."""

    model: str = setting("smollm2-135m", "the base of every headline number")
    datasets: tuple[str, ...] = setting(("reviewers", "chitchat"),
                                        f"{list(GENERATED)} or paths of LaMP-style JSON files")
    methods: tuple[str, ...] = setting(HEADLINE, f"the study's rows (all: {' '.join(STUDY_METHODS)})",
                                       choices=tuple(STUDY_METHODS))
    seeds: tuple[int, ...] = setting((0, 1, 2), "seeds of initialisation, sample order and of the users drawn "
                                                "(intervals over users and seeds)", minimum=0)
    users: int = setting(16, "users (SuperNodes) per dataset, drawn afresh for each seed; every one trains in every "
                             "round", minimum=2)
    preference_strength: float = setting(1.0, "the reviewers' favourites' share of their style words (0: the "
                                               "builder's own, 0.75 to 0.8)", minimum=0.0, maximum=1.0)
    rounds: int = setting(2, "rounds of every method (and of the expert)", minimum=1)
    local_steps: int = setting(3, "local steps per round", minimum=1)
    batch_size: int = setting(4, "samples per step", minimum=1)
    learning_rate: float = setting(3e-4, "AdamW learning rate", above=0.0)
    history_tokens: int = setting(256, "prompt budget of the history, in tokens (at least four reviews)", minimum=1)
    context_tokens: int = setting(64, "prompt budget of the context, in tokens", minimum=1)
    response_tokens: int = setting(64, "budget of the response, in tokens (the report gives the share of targets "
                                       "cut)", minimum=1)
    evaluate_every: int = setting(0, "also evaluate after every N rounds (the per-round plot; 0: only the end)",
                                  minimum=0)
    device: str = setting("auto", "where the devices compute: auto, cpu, cuda, cuda:N")

    def __post_init__(self) -> None:
        check_settings(self)

    def protocol(self) -> dict[str, Any]:
        """The settings every cell of a study folder shares: all but which cells are asked for."""
        return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(self))).items() if k not in ASKED}

    @property
    def digest(self) -> str:
        """Names this protocol: cells of another protocol never mix with its cells."""
        return hashlib.sha256(json.dumps(self.protocol(), sort_keys=True).encode()).hexdigest()[:12]


QUICK = {"model": "tiny", "seeds": (0,), "users": 4, "rounds": 2, "local_steps": 3, "history_tokens": 96,
         "context_tokens": 32, "response_tokens": 48}


def cell_path(out: Path, dataset: str, seed: int, method: str) -> Path:
    return out / "cells" / dataset_name(dataset) / f"seed-{seed}" / f"{method}.json"


def run_config(study: StudyConfig, dataset: str, seed: int, method: str, expert: Path | None,
               work: Path) -> RunConfig:
    """The federated run of one cell."""
    keys = dict(STUDY_METHODS[method].keys)
    if keys.get("shared-layers") == "half":
        keys["shared-layers"] = max(1, _decoder_layers(study.model) // 2)
    strength = study.preference_strength if dataset == "reviewers" else 0.0
    values = {
        "model": study.model, "device": study.device, "dataset": dataset, "users-seed": seed,
        "preference-strength": strength,
        # Users are drawn afresh for each seed: a folder of users per (dataset, seed).
        "users-dir": str(users_dir(work, dataset, seed)), "clients-per-round": study.users,
        "expert-rounds": 0, "rounds": study.rounds, "evaluate-every": study.evaluate_every,
        "evaluate-base": False, "local-steps": study.local_steps, "batch-size": study.batch_size,
        "learning-rate": study.learning_rate, "history-tokens": study.history_tokens,
        "context-tokens": study.context_tokens, "response-tokens": study.response_tokens,
        "min-replies": study.users, "connect-timeout": 60.0,
        "run-dir": str(work / "runs" / dataset_name(dataset) / f"seed-{seed}" / method), "seed": seed,
        **keys,
    }
    if METHODS[keys["method"]].needs_expert:
        values["expert"] = str(expert)
    return RunConfig.from_flower(values)


def users_dir(work: Path, dataset: str, seed: int) -> Path:
    return work / "users" / dataset_name(dataset) / f"seed-{seed}"


def _decoder_layers(model: str) -> int:
    from shared.loading import resolve_model_dir

    return int(json.loads((resolve_model_dir(model) / "config.json").read_text())["num_hidden_layers"])

