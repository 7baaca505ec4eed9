"""Single-device comparison (one machine, no federation): an expert trained
with ContextSFT on other users, then, for each evaluated user, one LoRA per method on the
4-bit base, evaluated on that user's held-out samples; per-user CSV, macro-averaged table,
JSON and a PNG plot in the run directory."""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

from client.device import Device, Expert
from client.evaluation import donor_history
from shared.methods import METHODS
from shared.metrics import SCORES, macro_average
from shared.paths import atomic_directory, atomic_write_json, atomic_write_png, atomic_write_text
from shared.user_store import UserStore
from simulations.study.compare_config import CompareConfig

log = logging.getLogger(__name__)

REPORTED = (*SCORES, "seconds_per_step")


def split_users(stores: list[UserStore], config: CompareConfig) -> tuple[list[UserStore], list[UserStore]]:
    """Evaluated users (those with the most held-out samples, so per-user metrics are not read
    off three lines) and a seeded random pick of the others for the expert."""
    if len(stores) < config.users + (0 if config.expert else 1):
        raise ValueError(f"need at least {config.users + 1} user stores, found {len(stores)}")
    by_test_size = sorted(stores, key=lambda s: (-len(s.samples("test")), s.user_id))
    evaluated, others = by_test_size[: config.users], by_test_size[config.users :]
    random.Random(config.train.seed).shuffle(others)
    return evaluated, others[: config.expert_users]


def run_compare(stores: list[UserStore], config: CompareConfig, run_dir: Path, overwrite: bool = False) -> dict:
    """Compare the methods, writing into a staging folder that takes the place of `run_dir` once
    complete (a `run_dir` that holds something is refused unless `overwrite`)."""
    with atomic_directory(run_dir, overwrite=overwrite) as staging:
        return _compare(stores, config, staging)


def _compare(stores: list[UserStore], config: CompareConfig, run_dir: Path) -> dict:
    atomic_write_json(run_dir / "config.json", json.loads(json.dumps(asdict(config), default=str)))
    evaluated, expert_pool = split_users(stores, config)

    started = time.perf_counter()
    device = Device.load(config.base, config.lora, config.prompt)
    log.info("base loaded in %.1f s", time.perf_counter() - started)

    if config.expert is not None:
        expert = Expert.from_dir(config.expert)
    else:
        expert_config = replace(config.train, method="context-sft", epochs=config.expert_epochs)
        log.info("training the expert (context-sft) on %d other users", len(expert_pool))
        device.train(expert_pool, expert_config, save_to=run_dir / "expert")
        expert = Expert.from_dir(run_dir / "expert")
    log.info("expert digest %s", expert.digest[:16])

    rows = []
    for index, store in enumerate(evaluated):
        donor = evaluated[(index + 1) % len(evaluated)] if len(evaluated) > 1 else expert_pool[0]
        other_history = donor_history(donor)
        base_row = device.evaluate(store, uses_history=True, other_history=other_history, adapter=None,
                                   generation=config.generation)
        rows.append({"method": "base", **base_row, "seconds_per_step": float("nan")})
        for method in config.methods:
            train_config = replace(config.train, method=method)
            adapter_dir = run_dir / "adapters" / store.path.name / method
            report = device.train([store], train_config, expert, save_to=adapter_dir)
            row = device.evaluate(store, METHODS[method].uses_history, other_history, generation=config.generation)
            rows.append({"method": method, **row, **{k: v for k, v in report.summary().items()
                                                   if k in ("seconds_per_step", "steps", "final_l_n", "final_l_p")}})
            log.info("%s %s: rougeL %.3f nll %.3f sensitivity %.3f (%.2f s/step)", store.user_id, method,
                     row["rougeL"], row["nll"], row["history_sensitivity"], report.seconds_per_step)

    summary = {m: macro_average([r for r in rows if r["method"] == m], REPORTED) for m in ("base", *config.methods)}
    result = {"summary": summary, "users": [s.user_id for s in evaluated], "expert_digest": expert.digest,
              "seconds": time.perf_counter() - started}
    write_report(run_dir, rows, result)
    return result


def write_report(run_dir: Path, rows: list[dict], result: dict) -> None:
    columns = ["method", "user_id", "test_samples", *REPORTED, "nll_own_history", "nll_no_history"]
    table = io.StringIO()
    writer = csv.DictWriter(table, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "per_user.csv", table.getvalue())
    atomic_write_json(run_dir / "results.json", {**result, "rows": rows})
    atomic_write_text(run_dir / "summary.md", summary_table(result["summary"]))
    plot_summary(result["summary"], run_dir / "summary.png")


def summary_table(summary: dict[str, dict[str, float]]) -> str:
    header = "| method | " + " | ".join(REPORTED) + " |\n|---|" + "---|" * len(REPORTED) + "\n"
    body = ""
    for method, metrics in summary.items():
        cells = [f"{metrics[k]:.4f} ± {metrics[k + '_std']:.4f}" for k in REPORTED]
        body += f"| {method} | " + " | ".join(cells) + " |\n"
    return header + body


def plot_summary(summary: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("rouge1", "rougeL", "nll", "history_sensitivity")
    methods = list(summary)
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.5))
    for ax, key in zip(axes, shown, strict=True):
        values = [summary[m][key] for m in methods]
        errors = [summary[m][f"{key}_std"] for m in methods]
        # Dots, not bars: differences in NLL are small against its size, and a dot plot
        # needs no zero baseline.
        ax.errorbar(range(len(methods)), values, yerr=errors, fmt="o", capsize=4, color="#4c72b0")
        ax.set_xticks(range(len(methods)), methods, rotation=45)
        ax.set_xlim(-0.5, len(methods) - 0.5)
        ax.set_title(key)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("macro-average over users (whiskers: standard deviation across users)")
    fig.tight_layout()
    atomic_write_png(fig, path)
