"""What a federated run leaves in its run directory besides the checkpoint:

  config.json        the run config (a resumed run must match it)
  rounds.jsonl       one line per round: phase, round, clients sampled / replied / accepted,
                     upload bytes, seconds, aggregated metrics
  evaluation.csv     the final evaluation, one row per user (node), numeric metrics only
  summary.json       the final evaluation macro-averaged over users, with the spread
  rounds.png         the metrics per round
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.metrics import macro_average
from shared.paths import (
    OutputExistsError,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_png,
    atomic_write_text,
    holds_something,
)
from shared.run_config import upgrade_keys
from shared.wire import EVALUATE_METRICS, NUM_EXAMPLES, Phase

CONFIG_FILE = "config.json"
ROUNDS_FILE = "rounds.jsonl"
EVALUATION_FILE = "evaluation.csv"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "rounds.png"
_PHASE_ORDER = {phase: order for order, phase in enumerate(Phase)}


def check_run_config(run_dir: Path, config: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
    """Record the config of a new run in an absent or empty `run_dir`; refuse to resume a run that
    had another config, and to write into a folder that holds anything else. A key the saved
    config lacks (added by a later version) matches when `config` holds its default; a config
    saved with the flat keys of earlier versions is compared in today's keys."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        if holds_something(run_dir):
            raise OutputExistsError(f"federation.run-dir {run_dir} holds files that are not a NextQuill run (it has no "
                                    f"{CONFIG_FILE}); choose another federation.run-dir")
        atomic_write_json(path, config)
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"federation.run-dir {run_dir}: {path} is not a NextQuill run config ({error}); choose "
                         "another federation.run-dir") from None
    if not isinstance(saved, dict):
        raise ValueError(f"federation.run-dir {run_dir}: {path} is not a NextQuill run config; choose another "
                         "federation.run-dir")
    defaults = defaults or {}
    saved = upgrade_keys(saved)
    saved = {**{k: v for k, v in defaults.items() if k in config}, **saved}
    changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if changed:
        raise ValueError(
            f"run directory {run_dir} holds a run with another config ({', '.join(changed)} differ); "
            "resume it with the same config or choose another federation.run-dir"
        )


class RoundLog:
    """rounds.jsonl, rewritten atomically after every round."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ROUNDS_FILE
        self.rows: list[dict[str, Any]] = []
        if self.path.is_file():
            self.rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def keep_until(self, phase: str, server_round: int) -> None:
        """Drop rows the checkpoint does not cover (written just before a crash)."""
        mark = (_PHASE_ORDER[phase], server_round)
        self.rows = [r for r in self.rows if (_PHASE_ORDER[r["phase"]], r["round"]) <= mark]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        atomic_write_jsonl(self.path, self.rows)


def write_evaluation(run_dir: Path, rows: Sequence[dict[str, Any]], extra: dict[str, Any] | None = None,
                     ) -> dict[str, Any]:
    """Per-user table and macro-average (± standard deviation across users); `extra` is added
    to the summary as it is (the run's privacy guarantee)."""
    columns = ["node_id", NUM_EXAMPLES, *sorted(EVALUATE_METRICS - {NUM_EXAMPLES})]
    table = io.StringIO()
    writer = csv.DictWriter(table, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: r["node_id"]))
    atomic_write_text(Path(run_dir) / EVALUATION_FILE, table.getvalue())
    summary = {"users": len(rows), "macro_average": macro_average(list(rows), columns[2:]), **(extra or {})}
    atomic_write_json(Path(run_dir) / SUMMARY_FILE, summary)
    return summary


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The final evaluation's summary of a finished run, or None where it has none."""
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def plot_rounds(run_dir: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Training loss per round of each phase and, where evaluated, the evaluation metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [("train-loss", "train loss L_n + α·L_p (mean over clients)"), ("eval-nll", "held-out NLL"),
              ("eval-rouge1", "ROUGE-1"), ("eval-history-sensitivity", "history sensitivity")]
    panels = [(key, title) for key, title in panels if any(_finite(r.get(key)) for r in rows)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for label, colour, points in plotted_series(rows, key):
            ax.plot(*zip(*points, strict=True), "o-", color=colour, label=label)
        # The base beside the personalized model: reading the history as the method does, and without it.
        for prefix, style, label in (("eval-base-", "s--", "base, no training"),
                                     ("eval-base-no-history-", "v:", "base, no training, no history")):
            base_key = key.replace("eval-", prefix, 1)
            base = [(r["round"], r[base_key]) for r in rows if key.startswith("eval-") and _finite(r.get(base_key))]
            if base:
                ax.plot(*zip(*base, strict=True), style, color="#888888", label=label)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_png(fig, Path(run_dir) / PLOT_FILE)


def plotted_series(rows: Sequence[dict[str, Any]], key: str) -> list[tuple[str, str, list[tuple[int, float]]]]:
    """(label, colour, (round, value) points) of one panel. Training: a line per phase.
    Evaluation: one line for the personalized model, from the evaluations after personalization
    rounds to the final one."""
    training = ((Phase.EXPERT, "#dd8452", (Phase.EXPERT,)), (Phase.PERSONALIZE, "#4c72b0", (Phase.PERSONALIZE,)))
    evaluated = (("personalized", "#4c72b0", (Phase.PERSONALIZE, Phase.EVALUATE)),)
    found = []
    for label, colour, phases in evaluated if key.startswith("eval-") else training:
        points = sorted((r["round"], r[key]) for r in rows if r["phase"] in phases and _finite(r.get(key)))
        if points:
            found.append((str(label), colour, points))
    return found


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
