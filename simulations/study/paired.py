"""The study's paired comparisons: each method against its fair baseline, user by user.

Every (dataset, seed) cell evaluates the same users (drawn afresh for each seed) with every
method, so a method and its baseline can be compared per user: the difference of a metric on
the same user, same seed, same held-out samples. The mean difference gets a 95% bootstrap
interval over users and seeds (two levels: seeds drawn with replacement, then users within
each drawn seed), so that a few seeds with many users each count as what they are.

    paired.csv  dataset, method, baseline, metric, mean difference, interval low, interval high
    dce.csv     dataset, counterfactual, ROC AUC, precision, recall (means over seeds)
    paired.png  the ROUGE-1, style-F1 and content-recall differences with their intervals

The style and content metrics (`shared.metrics.style_scores`, `content_recall`) are computed
here from the texts the devices generated (kept in their stores and gathered by the simulation, never sent by a device).
"""

from __future__ import annotations

import csv
import io
import math
import random
from pathlib import Path
from typing import Any

from shared.metrics import content_recall, style_scores
from shared.paths import atomic_write_png, atomic_write_text

# (method, its fair baseline): equal capacity first, then the untrained bar, then the ablations
# against ours. A pair is reported where both rows have cells.
FAIR_PAIRS = (
    ("nextquill-fed", "feddpa"),  # both: shared + personal adapter (the dual split)
    ("nextquill-fedavg", "fedit-context-sft"),  # both: one FedAvg LoRA
    ("nextquill-fed", "history-prompt"),  # the untrained base reading the history
    ("nextquill-fedavg", "history-prompt"),
    ("feddpa", "history-prompt"),
    ("nextquill-fed", "fedit-context-sft"),
)
TEXT_METRICS = ("style-f1", "content-recall")  # read from the generated texts (`user_text_scores`)
METRICS = ("rouge1", "rougeL", "nll", "history-sensitivity", *TEXT_METRICS)
BOOTSTRAP_DRAWS = 4000


def user_text_scores(cell: dict[str, Any]) -> dict[str, dict[int, float]]:
    """Metric -> user index -> mean over the user's generated texts, of the scores read from the
    texts themselves: style F1 (users with known style words) and content recall (every user)."""
    outputs = cell.get("outputs") or []
    vocabulary = {w for o in outputs for w in o.get("user_style_words", [])}
    found: dict[str, dict[int, list[float]]] = {metric: {} for metric in TEXT_METRICS}
    for o in outputs:
        scores = {"content-recall": content_recall(o.get("x", ""), o["reference"], o["prediction"])}
        if vocabulary:
            scores["style-f1"] = style_scores(o["prediction"], set(o["reference_style_words"]),
                                              set(o["user_style_words"]), vocabulary)["style_f1"]
        for metric, value in scores.items():
            if not math.isnan(value):
                found[metric].setdefault(o["index"], []).append(value)
    return {metric: {user: sum(v) / len(v) for user, v in by_user.items()} for metric, by_user in found.items()}


def per_user(cell: dict[str, Any]) -> dict[int, dict[str, float]]:
    """User index -> metrics of one cell (the federation numbers its nodes from 1000)."""
    users = {int(row["node_id"]) % 1000: {m: row[m] for m in METRICS if m in row} for row in cell["per_user"]}
    for metric, by_user in user_text_scores(cell).items():
        for user, value in by_user.items():
            users.setdefault(user, {})[metric] = value
    return users


def bootstrap_interval(differences: dict[int, list[float]], draws: int = BOOTSTRAP_DRAWS,
                       seed: int = 0) -> tuple[float, float, float]:
    """Mean of the per-user differences (seed -> users' differences) and its 95% interval by a
    two-level bootstrap (seeds, then users within a seed)."""
    seeds = [s for s in differences if differences[s]]
    values = [d for s in seeds for d in differences[s]]
    mean = sum(values) / len(values)
    rng = random.Random(seed)
    means = []
    for _ in range(draws):
        drawn = []
        for s in rng.choices(seeds, k=len(seeds)):
            users = differences[s]
            drawn += rng.choices(users, k=len(users))
        means.append(sum(drawn) / len(drawn))
    means.sort()
    return mean, means[int(0.025 * draws)], means[min(draws - 1, int(0.975 * draws))]


def paired_rows(cells: list[dict[str, Any]], paired_with: dict[str, str]) -> list[dict[str, Any]]:
    """One row per (dataset, method, baseline, metric) that both rows have, over the seeds where
    both have a cell: the fair pairs, and each row of `paired_with` (an ablation) against its row."""
    by_key = {(c["dataset"], c["seed"], c["method"]): per_user(c) for c in cells}
    datasets = sorted({c["dataset"] for c in cells})
    methods = {c["method"] for c in cells}
    pairs = [p for p in FAIR_PAIRS if set(p) <= methods]
    pairs += [(m, paired_with[m]) for m in sorted(methods) if m in paired_with and paired_with[m] in methods]
    rows = []
    for dataset in datasets:
        for method, baseline in pairs:
            for metric in METRICS:
                differences: dict[int, list[float]] = {}
                for seed in sorted({c["seed"] for c in cells if c["dataset"] == dataset}):
                    ours, theirs = by_key.get((dataset, seed, method)), by_key.get((dataset, seed, baseline))
                    if ours is None or theirs is None:
                        continue
                    found = [ours[u][metric] - theirs[u][metric] for u in sorted(set(ours) & set(theirs))
                             if metric in ours[u] and metric in theirs[u]
                             and not math.isnan(ours[u][metric] - theirs[u][metric])]
                    if found:
                        differences[seed] = found
                if not differences:
                    continue
                mean, low, high = bootstrap_interval(differences)
                rows.append({"dataset": dataset, "method": method, "baseline": baseline, "metric": metric,
                             "mean_difference": mean, "interval_low": low, "interval_high": high,
                             "users": sum(len(v) for v in differences.values()), "seeds": len(differences)})
    return rows


def dce_rows(detections: dict[Path, dict[str, Any]], expert: str) -> list[dict[str, Any]]:
    """Means over seeds of the expert row `expert`'s DCE per counterfactual history."""
    rows = []
    for dataset in sorted({p.parts[-3] for p in detections}):
        found = [d for p, d in detections.items() if p.parts[-3] == dataset and p.name.startswith(expert + ".")
                 and "references" in d]
        for reference in (found[0]["references"] if found else {}):
            scores = [d["references"][reference] for d in found]

            def mean(key: str, scores: list[dict] = scores) -> float:
                values = [s[key] for s in scores if s.get(key) is not None]
                return sum(values) / len(values) if values else float("nan")

            def share(kind: str, part: str, scores: list[dict] = scores) -> float:
                values = [s[kind][part] for s in scores if part in s.get(kind, {})]
                return sum(values) / len(values) if values else float("nan")

            rows.append({"dataset": dataset, "counterfactual": reference, "roc_auc": mean("roc_auc"),
                         "precision": mean("precision"), "recall": mean("recall"),
                         "share_high_weight": mean("share_high_weight"), "mean_dce": mean("mean_dce"),
                         **{f"{kind}_{part}": share(kind, part) for kind in ("token_share", "weight_share")
                            for part in ("style", "content")},
                         **{f"high_weight_share_{part}": share("high_weight_share", part)
                            for part in ("style", "content", "other")},
                         "seeds": len(scores)})
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    text = io.StringIO()
    if rows:
        writer = csv.DictWriter(text, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return text.getvalue()


def _number(value: float, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:+.{digits}f}"


def paired_section(paired: list[dict[str, Any]], dce: list[dict[str, Any]]) -> list[str]:
    """The report's Markdown for the paired differences and the DCE per counterfactual."""
    lines = ["## Paired differences against the fair baselines", "",
             "Per user (same seed, same held-out samples), method minus baseline; mean over users and seeds "
             "with a 95% two-level bootstrap interval (seeds, then users). Higher is better except for NLL; "
             "history-sensitivity (NLL with another user's history minus NLL with the user's own) is how much "
             "the model's predictions rest on this user's history, what causal preference modeling is meant to "
             "widen. An interval that excludes 0 separates the two.", "",
             "| dataset | method | baseline | metric | difference | 95% interval | users × seeds |",
             "|---|---|---|---|---|---|---|"]
    for row in paired:
        apart = row["interval_low"] > 0 or row["interval_high"] < 0
        lines.append(f"| {row['dataset']} | `{row['method']}` | `{row['baseline']}` | {row['metric']} | "
                     f"{'**' if apart else ''}{_number(row['mean_difference'])}{'**' if apart else ''} | "
                     f"[{_number(row['interval_low'])}, {_number(row['interval_high'])}] | "
                     f"{row['users']} over {row['seeds']} |")
    if dce:
        lines += ["", "## The expert's DCE against each counterfactual history", "",
                  "ROC AUC of DCE for the users' known style words over every target token, and precision and "
                  "recall of the tokens weighted λ (threshold δ); chitchat has no ground truth, only the share "
                  "of tokens weighted λ. Where the loss goes: the share of the summed token weight on the "
                  "style words and on the content carried over from the input (`shared.metrics.content_spans`), "
                  "beside their share of the tokens (an unweighted loss gives each its token share; the shares "
                  "follow the run config's ε), and the share of each kind's tokens that DCE weights λ (whatever "
                  "ε is). Means over seeds (`dce.csv`).", "",
                  "| dataset | h_ref | ROC AUC | precision | recall | share weighted λ | mean DCE | style: tokens → "
                  "weight | content: tokens → weight | weighted λ: style / content / rest | seeds |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in dce:
            cells = [f"{row[k]:.3f}" if not math.isnan(row[k]) else "–"
                     for k in ("roc_auc", "precision", "recall", "share_high_weight", "mean_dce")]
            cells += [f"{row[f'token_share_{part}']:.3f} → {row[f'weight_share_{part}']:.3f}"
                      if not math.isnan(row[f"weight_share_{part}"]) else "–" for part in ("style", "content")]
            cells.append(" / ".join(f"{row[f'high_weight_share_{part}']:.2f}"
                                    if not math.isnan(row[f"high_weight_share_{part}"]) else "–"
                                    for part in ("style", "content", "other")))
            lines.append(f"| {row['dataset']} | {row['counterfactual']} | {' | '.join(cells)} | {row['seeds']} |")
    return lines + [""]


def write_paired(out: Path, cells: list[dict[str, Any]], detections: dict[Path, dict[str, Any]],
                 paired_with: dict[str, str], expert: str) -> list[str]:
    """Write paired.csv, dce.csv and paired.png into `out`; returns the report's section."""
    paired = paired_rows(cells, paired_with)
    dce = dce_rows(detections, expert)
    atomic_write_text(out / "paired.csv", _csv(paired))
    atomic_write_text(out / "dce.csv", _csv(dce))
    if paired:
        _plot(out, paired)
    return paired_section(paired, dce)


def _plot(out: Path, paired: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in ("rouge1", "style-f1", "content-recall") if any(r["metric"] == m for r in paired)]
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 0.5 + 0.4 * len(paired) / len(shown) + 1.5),
                             squeeze=False)
    for ax, metric in zip(axes[0], shown, strict=True):
        rows = [r for r in paired if r["metric"] == metric]
        labels = [f"{r['dataset']}: {r['method']} − {r['baseline']}" for r in rows]
        ys = range(len(rows))
        for y, r in zip(ys, rows, strict=True):
            apart = r["interval_low"] > 0 or r["interval_high"] < 0
            ax.errorbar(r["mean_difference"], y, xerr=[[r["mean_difference"] - r["interval_low"]],
                                                        [r["interval_high"] - r["mean_difference"]]],
                        fmt="o", color="#c44e52" if apart else "#4c72b0", capsize=3)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(list(ys), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"{metric} difference (95% bootstrap over users and seeds)")
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    atomic_write_png(fig, out / "paired.png")
