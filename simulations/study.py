"""The study: NextQuill-Fed against every baseline and its own ablations, through the same
Flower apps, data, base and budget; one resumable command and a report.

    python -m simulations.study            (or `nextquill study`)
    python -m simulations.study --quick    (`tiny`, few users, one seed: minutes on 2 cores)

Every (dataset, seed, method) cell is a federated run of the real ServerApp and ClientApp
with real Flower messages, in this process (`simulations.inprocess`: no SuperLink, no Ray,
the base resident once for all cells), except `nextquill-central`, which trains the same
losses on every user's data pooled on one machine (the non-private reference). Each cell's
result is written, atomically, as soon as it finishes (`<out>/cells/`); a rerun skips the
finished ones and resumes an interrupted one from its coordinator checkpoint, so a study
larger than one sitting runs in pieces. `simulations/study_report.py` turns the cells into
the report (tables with 95% intervals over seeds, CSV, plots).

The expert of a (dataset, seed) is the global adapter of its `fedit-context-sft` cell:
federated ContextSFT with the same budget, the paper's expert. Every method trains for the
same rounds × local steps × batch, every client in every round; all decode greedily.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import RunConfig
from shared.methods import METHODS
from shared.paths import atomic_write_json, data_dir, ensure_folder
from shared.settings import SettingError, check_settings, setting
from simulations.datasets import GENERATED, dataset_name
from simulations.study_report import DCE_SUFFIX, PROFILE_SUFFIX, load_cells, machine

log = logging.getLogger("nextquill.study")

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


def run_federated_cell(config: RunConfig, users: int) -> dict[str, Any]:
    """One federated cell through the real apps: per-user and macro metrics, metrics per
    round, upload bytes per client per round."""
    from client.client_app import app as client_app
    from coordinator.checkpoint import load_checkpoint
    from coordinator.federation import run_federation
    from coordinator.report import EVALUATION_FILE, RoundLog
    from simulations.inprocess import InProcessGrid

    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": users} for i in range(users)],
                         config.to_flower())
    result = run_federation(grid, config)
    run_dir = config.resolve(config.run_dir)
    rows = RoundLog(run_dir).rows
    import csv

    with (run_dir / EVALUATION_FILE).open() as handle:
        per_user = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]
    trained = [r for r in rows if r["phase"] == "personalize" and "upload_bytes_per_client" in r]
    evaluated = [{"round": r["round"], **{k: v for k, v in r.items() if k.startswith("eval-")}}
                 for r in rows if any(k.startswith("eval-") for k in r)]
    # The study evaluates the base as rows of its own (evaluate-base is off): keep the model's metrics.
    return {
        "outputs": simulated_outputs(config, users, load_checkpoint(run_dir).run_id),
        "macro": {k.removeprefix("eval-"): v for k, v in result.summary["macro_average"].items()
                  if k.startswith("eval-") and not k.startswith("eval-base-")},
        "per_user": [{k.removeprefix("eval-"): v for k, v in row.items() if not k.startswith("eval-base-")}
                     for row in per_user],
        "per_round": [{k.removeprefix("eval-"): v for k, v in row.items()} for row in evaluated],
        "upload_bytes_per_client_round": max((r["upload_bytes_per_client"] for r in trained), default=0),
        "train_seconds": sum(r["seconds"] for r in trained),
        "update_norm_median": statistics.median([r["update-norm-median"] for r in trained
                                                 if "update-norm-median" in r] or [float("nan")]),
        "privacy": result.summary.get("privacy"),
    }


def simulated_outputs(config: RunConfig, users: int, run_id: str) -> list[dict[str, Any]]:
    """What the simulated devices generated in their last evaluation (`client.federated.
    evaluation_path`, in each store: it never crossed the wire), every test sample of each user,
    with the user's history as the prompt saw it (most recent first, the first three items) and,
    where the store knows them, the style words of the reference and of all the user's texts."""
    from client.federated import evaluation_path
    from shared.metrics import span_words
    from shared.user_store import UserStore, list_user_stores

    found = []
    for index, path in enumerate(list_user_stores(config.resolve(config.users_dir))[:users]):
        store = UserStore.open(path)
        record = evaluation_path(store, f"{run_id}-personalize")
        if not record.is_file():
            continue
        samples = {s.id: s for s in store.samples("test")}
        user_words = sorted({w for s in store.samples() for w in span_words(s.y, s.preference_spans)})
        for example in json.loads(record.read_text())["outputs"]["eval"]:
            sample = samples[example["sample_id"]]
            found.append({"user": store.user_id, "index": index, "sample_id": sample.id, "x": sample.x,
                          "history": [h.text for h in store.history_for(sample)][:3],
                          "reference": example["reference"], "prediction": example["prediction"],
                          "reference_style_words": sorted(span_words(sample.y, sample.preference_spans)),
                          "user_style_words": user_words})
    return found


def run_central_cell(config: RunConfig, users: int, expert: Path) -> dict[str, Any]:
    """NextQuill on every user's training samples pooled on one machine, for the same number of
    samples the federation trains on (users × rounds × local steps steps); each user evaluated
    on its held-out samples as a device evaluates (the same prompt, donor history, decoding)."""
    from client import federated
    from client.evaluation import public_donor_history
    from client.personalize import Expert
    from shared.metrics import SCORE_KEYS, SCORES, macro_average
    from shared.user_store import UserStore
    from simulations.datasets.simulated import simulated_user_stores

    device = federated.resident_device(config)
    stores = [UserStore.open(p) for p in simulated_user_stores(config, users)[:users]]
    steps = users * config.rounds * config.local_steps
    train = dataclasses.replace(config.train_config(config.method, config.seed), max_steps=steps)
    report = device.train(stores, train, Expert.from_dir(expert), progress=False)
    per_user = []
    for index, store in enumerate(stores):
        row = device.evaluate(store, uses_history=True, other_history=list(public_donor_history()))
        per_user.append({"node_id": float(index),  # keyed as the federation reports them
                         **{key: row[score] for score, key in zip(SCORES, SCORE_KEYS, strict=True)}})
    macro = macro_average(per_user, SCORE_KEYS)
    return {"macro": macro, "per_user": per_user, "per_round": [], "upload_bytes_per_client_round": 0,
            "train_seconds": report.seconds}


def dce_detection(config: RunConfig, users: int, expert: Path) -> dict[str, Any]:
    """The expert's DCE against every counterfactual history (`shared.config.REFERENCES`): how
    many tokens it marks, and, where the users carry ground truth (the reviewers' style words),
    how well it picks them out: ROC AUC over every target token, precision and recall of the
    high-weight tokens, the ROC curve. On the training samples only: these figures choose the
    default reference and weights, which the held-out samples must not. The run's own
    reference's figures are at the top level. Without ground truth (chitchat) the share of
    tokens weighted λ and where the weight goes (content carried over from the input, the rest)."""
    from client import federated
    from client.inspect_weights import detection_summary, roc_curve, token_rows
    from client.personalize import Expert
    from client.reference import donor_stores
    from shared.config import REFERENCES
    from shared.user_store import UserStore, list_user_stores

    stores = [UserStore.open(p) for p in list_user_stores(config.resolve(config.users_dir))[:users]]
    device = federated.resident_device(config)
    by_reference = {}
    for reference in REFERENCES:
        scheme = dataclasses.replace(config.weight_scheme, dce_reference=reference)
        rows = [row for index, store in enumerate(stores)
                for row in token_rows(device, store, Expert.from_dir(expert), scheme, donor_stores(stores, index),
                                      split="train")]
        summary = detection_summary(rows, scheme)
        tokens = [t for row in rows for t in row["tokens"]]
        summary["share_high_weight"] = summary["high_weight_tokens"] / max(1, summary["tokens"])
        if "roc_auc" in summary:
            summary["roc_fpr"], summary["roc_tpr"] = roc_curve([t["dce"] for t in tokens],
                                                               [t["preference"] for t in tokens])
        by_reference[reference] = summary
    return {**by_reference[config.weight_scheme.dce_reference], "reference": config.weight_scheme.dce_reference,
            "references": by_reference}


def data_profile(config: RunConfig, users: int) -> dict[str, Any]:
    """What the users of a (dataset, seed) leave room for, before any training: the share of
    targets the response budget cuts, the history items the history budget holds, and the
    headroom, ROUGE-1 of a non-personal output and of an oracle (reviewers: the content in the
    shared template against the user's favourite words; other datasets: the user's latest
    message, and the best single message of the user's history)."""
    from client import federated
    from shared.metrics import rouge
    from shared.prompts import cut_history
    from shared.user_store import UserStore, list_user_stores
    from simulations.datasets.reviewers import non_personal_review, oracle_review

    stores = [UserStore.open(p) for p in list_user_stores(config.resolve(config.users_dir))[:users]]
    tokenizer = federated.resident_device(config).tokenizer
    samples = [(store, s) for store in stores for s in store.samples()]
    lengths = [len(tokenizer(s.y, add_special_tokens=False)["input_ids"]) for _, s in samples]
    kept = [len(cut_history(tokenizer, [h.text for h in store.history_for(s)], config.history_tokens))
            for store, s in samples if s.split == "test"]
    tests = [(store, s) for store, s in samples if s.split == "test"]
    references = [s.y for _, s in tests]
    if config.dataset == "reviewers":
        floor = [non_personal_review(s.x) for _, s in tests]
        ceiling = [oracle_review(s.x, store.meta) for store, s in tests]
        names = ("non-personal (shared template)", "oracle (the user's favourite words)")
    else:
        floor = [next((h.text for h in store.history_for(s)), "") for store, s in tests]
        ceiling = [max((h.text for h in store.history_for(s)), key=lambda h, y=s.y: rouge([h], [y])["rouge1"],
                       default="") for store, s in tests]
        names = ("the user's latest message", "oracle (the best single message of the user's history)")
    return {"targets": len(lengths), "response_tokens": config.response_tokens,
            "targets_cut_share": sum(n >= config.response_tokens for n in lengths) / len(lengths),
            "target_tokens_mean": sum(lengths) / len(lengths),
            "history_items_kept_mean": sum(kept) / max(1, len(kept)),
            "headroom": {names[0]: rouge(floor, references)["rouge1"], names[1]: rouge(ceiling, references)["rouge1"]}}


def cells(study: StudyConfig) -> list[tuple[str, int, str]]:
    """(dataset, seed, method) in running order: seed by seed (a study cut short still has every
    dataset at its first seeds), and a dataset's expert cells before the cells that need them."""
    found = []
    for seed in study.seeds:
        for dataset in study.datasets:
            rows = tuple(m for m in study.methods if STUDY_METHODS[m].datasets is None
                         or dataset_name(dataset) in STUDY_METHODS[m].datasets)
            experts = experts_of(rows)
            found += [(dataset, seed, method) for method in experts + [m for m in rows if m not in experts]]
    return found


def experts_of(methods: tuple[str, ...]) -> list[str]:
    """The rows among or needed by `methods` whose adapters are experts, the paper's first."""
    found = {STUDY_METHODS[m].expert for m in methods if STUDY_METHODS[m].needs_expert}
    found |= {m for m in methods if any(row.expert == m for row in STUDY_METHODS.values())}
    return sorted(found, key=lambda m: (m != EXPERT_CELL, list(STUDY_METHODS).index(m)))


def dce_path(out: Path, dataset: str, seed: int, expert: str) -> Path:
    """Where the DCE scores of the expert row `expert` go: beside its cell, `<row>.dce.json`."""
    return cell_path(out, dataset, seed, expert).with_name(f"{expert}{DCE_SUFFIX}")


def run_study(study: StudyConfig, out: Path, progress: bool = True) -> Path:
    """Run every cell not finished yet, then write the report; returns the report folder."""
    from tqdm.auto import tqdm

    from simulations.study_report import write_report

    out = Path(out)
    check_datasets(study.datasets)
    ensure_folder(out)
    recorded = out / "study.json"
    protocol = study.protocol()
    todo = cells(study)
    asked = [(dataset_name(dataset), seed, method) for dataset, seed, method in todo]
    if recorded.is_file():
        earlier = json.loads(recorded.read_text())
        different = sorted(k for k in protocol if earlier.get(k) != protocol[k])
        if different:
            raise ValueError(f"{out} holds a study with other settings ({', '.join(different)}); its cells would "
                             "not compare: choose another --out")
        asked = list(dict.fromkeys([*_asked_before(out, earlier, study), *asked]))
    atomic_write_json(recorded, {**protocol, "digest": study.digest, "cells": [list(c) for c in asked]})
    work = work_dir(study)
    experts = experts_of(study.methods)
    bar = tqdm(todo, desc="study cells", unit="cell", disable=not progress)
    for dataset, seed, method in bar:
        bar.set_postfix_str(f"{dataset_name(dataset)} seed {seed} {method}", refresh=True)
        path = cell_path(out, dataset, seed, method)
        runs = work / "runs" / dataset_name(dataset) / f"seed-{seed}"
        expert = runs / STUDY_METHODS[method].expert / "shared_adapter"
        config = run_config(study, dataset, seed, method, expert, work)
        if not path.is_file():
            if STUDY_METHODS[method].needs_expert:
                rebuild_lost_expert(out, study, dataset, seed, STUDY_METHODS[method].expert, work)
            started = time.perf_counter()
            if STUDY_METHODS[method].central:
                result = run_central_cell(config, study.users, expert)
            else:
                result = run_federated_cell(config, study.users)
            atomic_write_json(path, {"dataset": dataset_name(dataset), "seed": seed, "method": method,
                                     "wall_seconds": time.perf_counter() - started, "machine": machine(),
                                     "run_config": config.to_flower(), **result})
            log.info("%s seed %d %s: ROUGE-1 %.4f, NLL %.4f (%.0f s)", dataset_name(dataset), seed, method,
                     result["macro"].get("rouge1", float("nan")), result["macro"].get("nll", float("nan")),
                     time.perf_counter() - started)
        profile = cell_path(out, dataset, seed, "data").with_name(f"data{PROFILE_SUFFIX}")
        if not profile.is_file():
            atomic_write_json(profile, data_profile(config, study.users))
        # Scored apart from the cell, so a study folder whose scores predate a new one gets it
        # when its <row>.dce.json is removed and the study rerun.
        scores = dce_path(out, dataset, seed, method)
        if method in experts and not scores.is_file():
            detection = dce_detection(config, study.users, config.resolve(config.run_dir) / "shared_adapter")
            atomic_write_json(scores, {"expert": method, **detection})
    return write_report(out, study, STUDY_METHODS, planned=len(asked))


def check_datasets(datasets: tuple[str, ...]) -> None:
    """Before anything is written: every dataset file reads as LaMP-style JSON (the error names
    the file and the record or line at fault), and no two datasets are the same records."""
    from simulations.datasets.lamp import read_lamp_json

    names: dict[str, str] = {}
    for dataset in datasets:
        if dataset not in GENERATED:
            read_lamp_json(dataset)
        name = dataset_name(dataset)
        if name in names:
            raise ValueError(f"--datasets {names[name]} and {dataset} hold the same records ({name}): give it once")
        names[name] = dataset


def _asked_before(out: Path, recorded: dict[str, Any], study: StudyConfig) -> list[tuple[str, int, str]]:
    """The cells the earlier runs into the study folder `out` asked for: those its `study.json`
    lists and those finished. (Before it listed them, `study.json` held the last run's datasets,
    methods and seeds.)"""
    asked = [(dataset, seed, method) for dataset, seed, method in recorded.get("cells", [])]
    methods = tuple(m for m in recorded.get("methods", ()) if m in STUDY_METHODS)
    if methods:
        last = dataclasses.replace(study, datasets=tuple(recorded.get("datasets", study.datasets)), methods=methods,
                                   seeds=tuple(recorded.get("seeds", study.seeds)))
        asked += [(dataset_name(dataset), seed, method) for dataset, seed, method in cells(last)]
    return asked + [(cell["dataset"], cell["seed"], cell["method"]) for cell in load_cells(out)]


def rebuild_lost_expert(out: Path, study: StudyConfig, dataset: str, seed: int, expert_row: str, work: Path) -> None:
    """Run `expert_row`'s cell again for its adapter when the cell is recorded but its run folder
    is gone (the study resumed from a fresh clone, on another machine, or after the data
    directory was cleaned), so that the cells still to run train with the same expert as those
    before them. The recorded cell is kept; a rebuilt expert that scores otherwise is reported."""
    recorded = cell_path(out, dataset, seed, expert_row)
    config = run_config(study, dataset, seed, expert_row, None, work)
    if not recorded.is_file() or (config.resolve(config.run_dir) / "shared_adapter").is_dir():
        return
    log.info("%s seed %d: rebuilding the expert %s (its cell is recorded, its run folder is gone)",
             dataset_name(dataset), seed, expert_row)
    rebuilt = run_federated_cell(config, study.users)["macro"]
    before = json.loads(recorded.read_text())["macro"]
    differs = sorted(k for k in before if k in rebuilt and not _same_score(before[k], rebuilt[k]))
    if differs:
        log.warning("the rebuilt expert %s of %s seed %d scores otherwise than its recorded cell (%s): the cells "
                    "still to run use the rebuilt one", expert_row, dataset_name(dataset), seed, ", ".join(differs))


def _same_score(a: float, b: float) -> bool:
    # Equal up to float rounding: the held-out NLL has been summed in other orders across versions.
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b))


def work_dir(study: StudyConfig) -> Path:
    """The study's users and run folders in the data directory: they depend on the protocol,
    not on which rows or seeds are asked."""
    return data_dir() / "study" / study.digest


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from simulations.options import add_settings

    parser = parser or argparse.ArgumentParser(prog="python -m simulations.study", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"the quick size ({', '.join(f'{k}={v}' for k, v in QUICK.items())}): minutes on 2 cores")
    parser.add_argument("--out", help="the study folder: cells and report (default: simulations/results/"
                                      "study-<model> in this checkout, or study-quick with --quick)")
    add_settings(parser, StudyConfig())
    return parser


def study_from(args: argparse.Namespace) -> tuple[StudyConfig, Path]:
    from simulations.options import settings_from

    study = settings_from(args, StudyConfig())
    if any(not d.strip() for d in study.datasets):
        raise ValueError("--datasets holds an empty name: give a dataset name or the path of a LaMP-style JSON file")
    # Dataset files as absolute paths: the devices resolve relative ones under the data directory.
    files = tuple(d if d in GENERATED else str(Path(d).expanduser().resolve()) for d in study.datasets)
    try:
        study = dataclasses.replace(study, datasets=files)
    except SettingError as error:  # ./a.json and a.json: one file
        raise error.renamed("--datasets") from None
    if args.quick:
        study = dataclasses.replace(study, **QUICK)
    default = Path(__file__).parent / "results" / ("study-quick" if args.quick else f"study-{study.model}")
    return study, Path(args.out) if args.out else default


def main(argv: list[str] | None = None) -> int:
    from simulations.options import run_command

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    study, out = study_from(args)
    return run_command("study", lambda: print(f"report: {run_study(study, out) / 'report.md'}") or 0)


if __name__ == "__main__":
    sys.exit(main())
