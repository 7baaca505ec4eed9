"""Does DCE find the preference words once its expert is trained long enough? ROC AUC,
precision and recall of DCE on the generated reviewers, under ContextSFT experts trained for
more and more steps on the users' pooled training samples (0 steps: the base itself, as an
untrained LoRA, whose B is zero).

    python -m simulations.study.expert_budget                    (steps 0 24 96 on the study's users)
    python -m simulations.study.expert_budget --steps 0 24 96 384

The users, base, prompt budgets, batch and learning rate are the study's (`StudyConfig`); the
study's own expert is federated ContextSFT of users × rounds × local steps samples' worth of
steps (24 at the default size). Each budget's result is written as soon as it is measured
(`<out>/steps-<n>.json`, its adapter in the data directory) and skipped on a rerun; the report
(`report.md`, `auc-vs-steps.png`) is rewritten from those files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from shared.config import TrainConfig
from shared.paths import atomic_write_json, atomic_write_png, atomic_write_text, ensure_folder
from simulations.study.cells import dce_detection
from simulations.study.protocol import EXPERT_CELL, StudyConfig, run_config
from simulations.study.runner import work_dir

log = logging.getLogger("nextquill.expert_budget")

DATASET = "reviewers"  # generated users: the ones with ground truth of their preference words
DEFAULT_OUT = Path(__file__).parents[1] / "results" / "expert-budget"
# The study's settings an expert's budget run takes; the rest (rounds, seeds, rows) are the study's own.
BUDGET_SETTINGS = ("model", "users", "batch_size", "learning_rate", "history_tokens", "context_tokens",
                   "response_tokens", "device")


def measure(study: StudyConfig, steps: int, seed: int, history_dropout: float, work: Path) -> dict[str, Any]:
    """Train (or, for 0 steps, only initialise) the expert, then score its DCE."""
    from client.federated import resident_device
    from shared.adapters import save_adapter
    from shared.split import LOCAL_ADAPTER
    from shared.user_store import UserStore
    from simulations.datasets.simulated import simulated_user_stores

    config = run_config(study, DATASET, seed, EXPERT_CELL, None, work)
    device = resident_device(config)
    stores = [UserStore.open(p) for p in simulated_user_stores(config, study.users)[:study.users]]
    expert = work / "experts" / f"seed-{seed}" / _name(steps, history_dropout)
    started = time.perf_counter()
    if not expert.is_dir():
        if steps == 0:
            model = device.host.new(LOCAL_ADAPTER, seed=seed)
            save_adapter(model, expert, adapter_name=LOCAL_ADAPTER, metadata={"method": "untrained", "base":
                                                                                  device.base_id})
        else:
            train = TrainConfig(method="context-sft", max_steps=steps, batch_size=study.batch_size,
                                learning_rate=study.learning_rate, history_dropout=history_dropout, seed=seed)
            device.train(stores, train, save_to=expert)
    train_seconds = time.perf_counter() - started
    detection = dce_detection(config, study.users, expert)
    if "roc_auc" not in detection:
        raise ValueError(f"the {DATASET} users in {config.users.dir} carry no preference spans")
    donors = detection["references"].get("donors", {})
    detection["references"] = {name: {k: v for k, v in summary.items() if not k.startswith("roc_fpr")
                                      and not k.startswith("roc_tpr")}
                               for name, summary in detection["references"].items()}
    return {"steps": steps, "history_dropout": history_dropout, "seed": seed, "train_seconds": train_seconds,
            "roc_auc_own_vs_other_history": donors.get("roc_auc"), **detection}


def _name(steps: int, history_dropout: float) -> str:
    return f"steps-{steps}" + (f"-dropout-{history_dropout:g}" if history_dropout else "")


def write_report(out: Path, study: StudyConfig) -> Path:
    """report.md (a table) and auc-vs-steps.png from the measured budgets."""
    import matplotlib

    from simulations.study.report import machine

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((json.loads(p.read_text()) for p in out.glob("steps-*.json")),
                  key=lambda r: (r["history_dropout"], r["steps"], r["seed"]))
    study_steps = study.users * study.rounds * study.local_steps
    lines = [
        "# DCE against the expert's training budget", "",
        f"Commands: {'; '.join(_commands(rows, study, out))}; "
        f"base `{study.model}`, {study.users} generated reviewers, ContextSFT experts on their pooled training "
        f"samples, batch {study.batch_size}, learning rate {study.learning_rate}, prompt budgets "
        f"{study.history_tokens}/{study.context_tokens}/{study.response_tokens} tokens (history/context/response; "
        f"`settings.json`); machine: {machine()}. The study's expert is federated, {study_steps} client steps "
        "in all. Train seconds are wall time on that machine, at times shared with other jobs: not a benchmark.",
        "",
        "ROC AUC of DCE for the ground-truth preference tokens among all target tokens (the training "
        "samples; DCE against the counterfactual history of `weights.dce-reference`, the history removed in rows "
        "measured before it existed); the same counting only the first token of each preference word (each "
        "word of a style phrase is a span of the ground truth) against the tokens outside them; precision and "
        "recall of the tokens DCE weights high (DCE > δ); the AUC of the contrast of the user's own history "
        "against other users' (the `donors` reference) instead. History dropout: the fraction of the expert's "
        "training steps whose prompt had the history removed (0: ContextSFT as the study trains it).", "",
        "| expert steps | history dropout | seed | ROC AUC | AUC, span starts | AUC own vs other history | "
        "precision | recall | mean DCE pref. | mean DCE other | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        contrast = r.get("roc_auc_own_vs_other_history")
        lines.append(f"| {r['steps']} | {r['history_dropout']:g} | {r['seed']} | {r['roc_auc']:.3f} | "
                     f"{r['roc_auc_span_start']:.3f} | "
                     f"{'–' if contrast is None else f'{contrast:.3f}'} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['mean_dce_preference_tokens']:.3f} | {r['mean_dce_other_tokens']:.3f} | "
                     f"{r['train_seconds']:.0f} |")
    fig, (ax, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    untrained = [r for r in rows if r["steps"] == 0]
    for dropout in sorted({r["history_dropout"] for r in rows}):
        curve = [r for r in rows if r["history_dropout"] == dropout and r["seed"] == rows[0]["seed"]]
        curve = sorted(curve + ([] if dropout == 0 else untrained[:1]), key=lambda r: r["steps"])
        steps = [r["steps"] for r in curve]
        for key, label, style in (("roc_auc", "all preference tokens", "o-"), ("roc_auc_span_start", "span starts",
                                                                              "s--")):
            ax.plot(steps, [r[key] for r in curve], style, label=f"{label}, history dropout {dropout:g}")
        for key, style in (("precision", "o-"), ("recall", "s--")):
            right.plot(steps, [r[key] for r in curve], style, label=f"{key}, history dropout {dropout:g}")
    ax.axhline(0.5, color="#888888", linestyle=":", label="chance")
    ax.axhline(0.9, color="#c44e52", linestyle="--", label="the issue's aim")
    ax.set_ylabel("ROC AUC, preference tokens")
    right.set_ylabel("high-weight tokens (DCE > δ)")
    for axis in (ax, right):
        axis.axvline(study_steps, color="#55a868", linestyle="-.", label="the study's expert")
        axis.set_xscale("symlog", linthresh=10)
        axis.set_xlabel(f"expert training steps (batch {study.batch_size})")
        axis.legend(fontsize=7)
    fig.tight_layout()
    ensure_folder(out)
    atomic_write_png(fig, out / "auc-vs-steps.png", dpi=120)
    lines += ["", "![ROC AUC, precision and recall against expert steps](auc-vs-steps.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"


def _commands(rows: list[dict[str, Any]], study: StudyConfig, out: Path) -> list[str]:
    """The command lines that measured `rows`, one per history dropout."""
    default = StudyConfig()
    options = [f"--{name.replace('_', '-')} {getattr(study, name)}" for name in BUDGET_SETTINGS
               if name != "device" and getattr(study, name) != getattr(default, name)]
    if out.resolve() != DEFAULT_OUT.resolve():
        options.append(f"--out {os.path.relpath(out.resolve(), Path.cwd())}")
    commands = []
    for dropout in sorted({r["history_dropout"] for r in rows}):
        steps = sorted({r["steps"] for r in rows if r["history_dropout"] == dropout})
        line = ["python -m simulations.study.expert_budget --steps", *map(str, steps),
                *([f"--history-dropout {dropout:g}"] if dropout else []), *options]
        commands.append(f"`{' '.join(line)}`")
    return commands


def run(study: StudyConfig, budgets: list[int], seed: int, out: Path, history_dropout: float = 0.0,
        progress: bool = True) -> Path:
    from tqdm.auto import tqdm

    ensure_folder(out)
    recorded = out / "settings.json"
    settings = {name: getattr(study, name) for name in BUDGET_SETTINGS if name != "device"}
    if recorded.is_file() and (earlier := json.loads(recorded.read_text())) != settings:
        different = sorted(k for k in settings if earlier.get(k) != settings[k])
        raise ValueError(f"{out} holds experts measured with other settings ({', '.join(different)}); they would "
                         "not compare: choose another --out")
    atomic_write_json(recorded, settings)
    work = work_dir(study)
    for steps in tqdm(budgets, desc="expert budgets", unit="budget", disable=not progress):
        dropout = history_dropout if steps else 0.0  # an untrained expert is the same whatever the dropout
        path = out / f"{_name(steps, dropout)}-seed-{seed}.json"
        if path.is_file():
            continue
        result = measure(study, steps, seed, dropout, work)
        result.pop("roc_fpr"), result.pop("roc_tpr")
        atomic_write_json(path, result)
        log.info("expert of %d steps: ROC AUC %.3f (own vs other %.3f), precision %.3f, recall %.3f", steps,
                 result["roc_auc"], result.get("roc_auc_own_vs_other_history") or float("nan"), result["precision"],
                 result["recall"])
    return write_report(out, study)


def main(argv: list[str] | None = None) -> int:
    from simulations.options import add_settings, run_command, settings_from, whole_number

    parser = argparse.ArgumentParser(prog="python -m simulations.study.expert_budget", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=whole_number(0), nargs="+", default=[0, 24, 96],
                        help="expert training steps to measure")
    parser.add_argument("--seed", type=whole_number(0), default=0,
                        help="seed of the expert's initialisation and sample order")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder of the results and report")
    add_settings(parser, TrainConfig(), only=("history_dropout",))
    add_settings(parser, StudyConfig(), only=BUDGET_SETTINGS)
    args = parser.parse_args(argv)
    if any(s < 0 for s in args.steps):
        parser.error("--steps must be 0 or more")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    study = settings_from(args, StudyConfig(), only=BUDGET_SETTINGS)
    return run_command("expert-budget", lambda: print(
        f"report: {run(study, args.steps, args.seed, Path(args.out), args.history_dropout)}") or 0)


if __name__ == "__main__":
    sys.exit(main())
