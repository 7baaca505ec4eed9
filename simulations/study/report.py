"""The study's report, from the cells `simulations/study/runner.py` wrote: per dataset a Markdown table
of every method with 95% intervals over seeds, the comparisons the study is for, a CSV of
every number, and plots (metrics per round, ablations, DCE's ROC on generated users, quality
against upload bytes). Rewritten whole from the cells, so it always matches them."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from shared.metrics import SCORE_KEYS
from shared.paths import atomic_write_png, atomic_write_text
from simulations.study.outputs import outputs_lines, profile_lines, profiles
from simulations.study.paired import TEXT_METRICS, user_text_scores, write_paired

DCE_SUFFIX = ".dce.json"  # an expert row's DCE scores, beside its cell (the study names them so)
PROFILE_SUFFIX = ".profile.json"  # a (dataset, seed)'s budgets and headroom (`data.profile.json`)
METRICS = SCORE_KEYS  # as the federation reports them
# Two-sided 95% Student t quantiles by degrees of freedom (seeds - 1).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (t over seeds; nan with one seed)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, _T95.get(len(values) - 1, 1.96) * sd / math.sqrt(len(values))


def load_cells(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("cells/*/seed-*/*.json"))
            if not p.name.endswith((DCE_SUFFIX, PROFILE_SUFFIX))]


def summarize(cells: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """dataset -> method -> {metric: (mean, half-width), seeds, upload, seconds}."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for cell in cells:
        table.setdefault(cell["dataset"], {}).setdefault(cell["method"], {"cells": []})["cells"].append(cell)
    for methods in table.values():
        for row in methods.values():
            row["seeds"] = sorted(c["seed"] for c in row["cells"])
            for metric in METRICS:
                row[metric] = interval([c["macro"].get(metric) for c in row["cells"]])
            texts = [user_text_scores(c) for c in row["cells"]]
            for metric in TEXT_METRICS:
                means = [sum(v) / len(v) for scores in texts if (v := list(scores[metric].values()))]
                row[metric] = interval(means)
            row["upload_mb"] = max(c["upload_bytes_per_client_round"] for c in row["cells"]) / 1e6
            # The median: a cell whose cores were shared by another job does not move it.
            row["seconds"] = statistics.median(c["wall_seconds"] for c in row["cells"])
    return table


def _cell(mean: float, half: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def comparisons(methods: dict[str, dict[str, Any]]) -> list[str]:
    """The study's questions, answered from the numbers."""
    lines = []

    def relative(a: str, b: str) -> str | None:
        if a not in methods or b not in methods:
            return None
        parts = []
        for metric in ("rouge1", "nll"):
            (ma, ha), (mb, hb) = methods[a][metric], methods[b][metric]
            if math.isnan(ma) or math.isnan(mb):
                continue
            if math.isnan(ha) or math.isnan(hb):
                overlap = "one seed: no interval"
            else:
                overlap = "intervals overlap" if abs(ma - mb) <= ha + hb else "intervals do not overlap"
            change = f"{100 * (ma - mb) / mb:+.1f}% relative; " if mb else ""
            parts.append(f"{metric} {ma:.4f} vs {mb:.4f} ({change}{overlap})")
        return f"`{a}` vs `{b}`: " + "; ".join(parts) if parts else None

    for other in ("fedit-context-sft", "fedit-sft", "local", "fedsa", "feddpa", "history-prompt", "base",
                  "nextquill-central"):
        line = relative("nextquill-fed", other)
        if line:
            lines.append(line)
    federated = [m for m in ("fedit-sft", "fedit-context-sft", "local", "fedsa", "feddpa") if m in methods]
    if "nextquill-fed" in methods and federated:
        ours = methods["nextquill-fed"]["rouge1"][0]
        best = max(federated, key=lambda m: methods[m]["rouge1"][0])
        verdict = "above" if ours > methods[best]["rouge1"][0] else "not above"
        lines.append(f"`nextquill-fed` is {verdict} the best federated or local baseline (`{best}`) in ROUGE-1.")
    order = [m for m in ("fedit-sft", "mce-only", "dce-only", "nextquill-fed") if m in methods]
    if len(order) > 1:
        ranked = " < ".join(sorted(order, key=lambda m: methods[m]["rouge1"][0]))
        lines.append(f"ROUGE-1 order of SFT and the ablations here: {ranked} (the paper: fedit-sft < mce-only < "
                     "dce-only < nextquill-fed).")
    return lines


def write_report(out: Path, study: Any, rows: dict[str, Any], planned: int | None = None) -> Path:
    """Write report.md, cells.csv, per_user.csv and the plots into `out`; returns `out`.
    `rows`: the study's method table (name -> a row with `label` and `group`), in order;
    `planned`: how many cells the study has in all (the report says how far it is)."""
    out = Path(out)
    cells = load_cells(out)
    table = summarize(cells)
    order = {name: index for index, name in enumerate(rows)}
    detections = {p: json.loads(p.read_text()) for p in sorted(out.glob(f"cells/*/seed-*/*{DCE_SUFFIX}"))}
    data_profiles = profiles(out)
    lines = [
        "# NextQuill-Fed study", "",
        f"Base `{study.model}`; {study.users} users per dataset, every one training in every round; "
        f"{study.rounds} rounds × {study.local_steps} local steps × batch {study.batch_size} for every method "
        f"(the central reference: the same number of samples, pooled); greedy decoding; prompt budgets "
        f"{study.history_tokens}/{study.context_tokens}/{study.response_tokens} tokens. Intervals: 95% over seeds "
        "(t); with one seed, none. Metrics are macro-averages over users of their held-out (latest) samples.",
        "", f"Report written on: {machine()}. Made by `python -m simulations.study` with the settings in "
        "`study.json`.", "", *_machines_line(cells), "",
    ]
    if planned is not None:
        lines += [f"Cells finished: {len(cells)} of {planned}"
                  + (" (under way: rerunning the commands that asked for the rest goes on; `study.json` lists the "
                     "cells asked for)." if len(cells) < planned
                     else "."), ""]
    for dataset, methods in table.items():
        lines += [f"## {dataset}", "",
                  "| method | what | seeds | " + " | ".join((*METRICS, *TEXT_METRICS)) + " | upload MB/client/round | "
                  "s/cell (median) |",
                  "|---|---|---|" + "---|" * (len(METRICS) + 3)]
        for method in sorted(methods, key=lambda m: order.get(m, 99)):
            row = methods[method]
            label = rows[method].label if method in rows else ""
            cells_text = " | ".join(_cell(*row[m]) for m in (*METRICS, *TEXT_METRICS))
            lines.append(f"| `{method}` | {label} | {len(row['seeds'])} | {cells_text} | {row['upload_mb']:.2f} | "
                         f"{row['seconds']:.0f} |")
        lines += ["", *[f"- {line}" for line in comparisons(methods)], ""]
        lines += privacy_table(methods, study.users)
        lines += profile_lines(data_profiles.get(dataset, []))
        lines += outputs_lines(cells, dataset, order)
        for expert in sorted({_expert(p) for p in detections if p.parts[-3] == dataset},
                             key=lambda e: order.get(e, 99)):
            found = [d for p, d in detections.items() if p.parts[-3] == dataset and _expert(p) == expert]
            if not all("roc_auc" in d for d in found):
                continue
            auc = interval([d["roc_auc"] for d in found])
            precision = interval([d["precision"] for d in found])
            recall = interval([d["recall"] for d in found])
            starts = interval([d.get("roc_auc_span_start", float("nan")) for d in found])
            reference = found[0].get("reference", "removed")
            lines += [f"DCE of the expert `{expert}` against the run's h_ref (`{reference}`) as a detector of the "
                      f"known preference words ({len(found)} seeds): ROC AUC {_cell(*auc, 3)}, precision "
                      f"{_cell(*precision, 3)} and recall {_cell(*recall, 3)} of the high-weight tokens. Counting "
                      "only the first token of each preference word (the rest of a word follows from it) against "
                      f"the tokens outside them: ROC AUC {_cell(*starts, 3)}.", ""]
    lines += write_paired(out, cells, detections, {name: row.baseline for name, row in rows.items() if row.baseline},
                          "fedit-context-sft")
    memorization = out / "memorization" / "memorization.md"  # python -m simulations.study.memorization
    if memorization.is_file():
        lines += ["## Memorization: a canary's exposure", "", memorization.read_text().strip(), ""]
    findings = out / "findings.md"  # written by hand from the numbers; kept when the report is rewritten
    if findings.is_file():
        lines += ["## Findings", "", findings.read_text().strip(), ""]
    lines += ["Files: `cells.csv` (every cell's macro metrics), `per_user.csv`, `paired.csv` (the paired "
              "differences), `dce.csv` (DCE per counterfactual history), `cells/` (one JSON per cell, with the "
              "generated texts), plots `paired.png`, `rounds-*.png`, `ablations-*.png`, `quality-vs-upload-*.png`, "
              "`privacy-*.png`, `dce-roc.png`.", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    _write_csvs(out, cells)
    _plot(out, table, detections, order, {name: row.group for name, row in rows.items()})
    return out


def privacy_table(methods: dict[str, dict[str, Any]], users: int) -> list[str]:
    """The quality cost of differential privacy: `nextquill-fed` without DP against its rows
    with central DP (ε at δ from the run's accountant, over every aggregated round), and the
    size of the noise against the size of an update."""
    shown = _privacy_rows(methods)
    if len(shown) < 2:
        return []
    delta = next(_privacy(methods[m])["delta"] for m in shown if _privacy(methods[m])["clip"] is not None)
    lines = ["### The cost of differential privacy", "",
             f"| row | ε (δ = {delta:g}) | noise multiplier σ | clip | ROUGE-1 | NLL | noise on the mean update | "
             "median update norm |", "|---|---|---|---|---|---|---|---|"]
    for method in shown:
        row = methods[method]
        privacy = _privacy(row)
        epsilon = privacy["epsilon"]
        sigma, clip = privacy.get("noise_multiplier", 0.0), privacy.get("clip")
        # Gaussian noise of std σ·clip/users on each of the d shared parameters.
        value_bytes = 2 if row["cells"][0]["run_config"].get("transport-dtype") == "float16" else 4
        dims = row["upload_mb"] * 1e6 / value_bytes
        noise = sigma * clip / users * math.sqrt(dims) if clip else 0.0
        norm = interval([c.get("update_norm_median", float("nan")) for c in row["cells"]])
        lines.append(f"| `{method}` | {'∞' if epsilon is None else f'{epsilon:.2f}'} | {sigma:.3g} | "
                     f"{'–' if clip is None else f'{clip:g}'} | {_cell(*row['rouge1'])} | {_cell(*row['nll'])} | "
                     f"{noise:.3g} | {_cell(*norm, 3)} |")
    lines += ["", "Noise on the mean update: the expected L2 norm of the Gaussian noise the coordinator adds to "
              f"the mean of the {users} clipped updates (σ × clip / users × √(shared parameters)); an update's "
              "norm is what the devices' training moved the shared parameters in a round (clipped to `clip` "
              "under DP). Central DP with so few users buries the update under the noise. The guarantee covers "
              "the personalization rounds: the expert these rows weight tokens with (`fedit-context-sft`) was "
              "trained on the same users without DP, outside it.", ""]
    return lines


def _privacy_rows(methods: dict[str, dict[str, Any]]) -> list[str]:
    """`nextquill-fed` (no DP) and the rows whose cells ran with DP, by ε from ∞ down."""
    private = [m for m, row in methods.items() if _privacy(row)["clip"] is not None]
    if not private:
        return []
    ours = ["nextquill-fed"] if "nextquill-fed" in methods else []
    return ours + sorted(private, key=lambda m: -(_privacy(methods[m])["epsilon"] or math.inf))


def _privacy(row: dict[str, Any]) -> dict[str, Any]:
    """The DP settings of a row's cells and the ε they spent (the largest over seeds)."""
    found = [c["privacy"] for c in row["cells"] if c.get("privacy") and c["privacy"].get("dp", "off") != "off"]
    if not found:
        return {"epsilon": None, "noise_multiplier": 0.0, "clip": None, "delta": None}
    spent = [f["epsilon"] for f in found]
    return {**found[0], "epsilon": None if None in spent else max(spent)}


def machine() -> str:
    """The CPU (model name, the flags that decide its speed) and the GPU where one is at hand."""
    import torch

    from simulations.benchmarks.step import cpu_description

    return cpu_description() + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")


UNRECORDED_MACHINE = "not recorded (computed before cells named their machine)"


def _machines_line(cells: list[dict[str, Any]]) -> list[str]:
    """Which machines computed the cells: wall times compare only within one machine, and a
    cell that another machine does not reproduce can be traced to where it ran (the two CPUs
    seen so far, an AMD EPYC and an Intel Xeon, gave the same cells)."""
    counts = Counter(cell.get("machine", UNRECORDED_MACHINE) for cell in cells)
    if not counts:
        return []
    return ["Cells computed on: " + "; ".join(f"{name}: {n} cells" for name, n in counts.most_common()) + "."]


def _write_csvs(out: Path, cells: list[dict[str, Any]]) -> None:
    columns = ["dataset", "method", "seed", *METRICS, "upload_bytes_per_client_round", "wall_seconds", "machine"]
    table = io.StringIO()
    writer = csv.DictWriter(table, columns)
    writer.writeheader()
    for cell in cells:
        writer.writerow({**{k: cell[k] for k in ("dataset", "method", "seed", "upload_bytes_per_client_round",
                                                  "wall_seconds")}, **{m: cell["macro"].get(m) for m in METRICS},
                         "machine": cell.get("machine", UNRECORDED_MACHINE)})
    atomic_write_text(out / "cells.csv", table.getvalue())
    users = io.StringIO()
    writer = csv.DictWriter(users, ["dataset", "method", "seed", "node_id", *METRICS], extrasaction="ignore")
    writer.writeheader()
    for cell in cells:
        for row in cell["per_user"]:
            writer.writerow({"dataset": cell["dataset"], "method": cell["method"], "seed": cell["seed"], **row})
    atomic_write_text(out / "per_user.csv", users.getvalue())


def _plot(out: Path, table: dict, detections: dict, order: dict, groups: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def save(fig, name: str) -> None:
        fig.tight_layout()
        atomic_write_png(fig, out / name)

    for dataset, methods in table.items():
        names = sorted(methods, key=lambda m: order.get(m, 99))
        # Metrics per round (mean over seeds) of the methods that trained.
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        colours = plt.get_cmap("tab20").colors
        for index, method in enumerate(names):
            rounds: dict[int, list[dict]] = {}
            for cell in methods[method]["cells"]:
                for row in cell["per_round"]:
                    rounds.setdefault(row["round"], []).append(row)
            if len(rounds) < 2:
                continue
            xs = sorted(rounds)
            style = "-" if method == "nextquill-fed" else "--"
            for ax, metric in zip(axes, ("rougeL", "nll"), strict=True):
                ys = [sum(r[metric] for r in rounds[x]) / len(rounds[x]) for x in xs]
                ax.plot(xs, ys, style, marker="o", label=method, linewidth=2.5 if style == "-" else 1,
                        color="#c44e52" if method == "nextquill-fed" else colours[index % len(colours)])
        for ax, metric in zip(axes, ("rougeL", "nll"), strict=True):
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            # The coordinator's per-round metrics are means weighted by each user's test samples.
            ax.set_title(f"{dataset}: held-out {metric} per round\n(mean over users, weighted by test samples)",
                         fontsize=10)
            ax.grid(alpha=0.3)
        if axes[0].lines:
            axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        save(fig, f"rounds-{dataset}.png")
        # Ours against its ablations and the main baselines, with intervals.
        shown = [m for m in names if m in ("fedit-context-sft", "nextquill-fed", "nextquill-central")
                 or groups.get(m) == "ablation"]
        if shown:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for ax, metric in zip(axes, ("rouge1", "nll"), strict=True):
                means = [methods[m][metric][0] for m in shown]
                errors = [0 if math.isnan(methods[m][metric][1]) else methods[m][metric][1] for m in shown]
                colours = ["#c44e52" if m == "nextquill-fed" else "#4c72b0" for m in shown]
                ax.barh(range(len(shown)), means, xerr=errors, color=colours, capsize=3)
                ax.set_yticks(range(len(shown)), shown, fontsize=8)
                ax.set_title(f"{dataset}: {metric} (95% interval over seeds)")
                finite = [v for v in means if not math.isnan(v)]
                if finite:  # differences are small against the values: zoom in on them
                    low, high = min(finite), max(finite)
                    pad = max((high - low) * 0.6, 1e-3)
                    ax.set_xlim(low - pad, high + pad)
                ax.grid(axis="x", alpha=0.3)
            save(fig, f"ablations-{dataset}.png")
        # Quality against the privacy guarantee (rows with central DP, and ours without).
        shown = _privacy_rows(methods)
        if len(shown) > 1:
            ticks = []
            for m in shown:
                privacy = _privacy(methods[m])
                ticks.append("no DP" if privacy["clip"] is None else
                             "ε = ∞\n(clip only)" if privacy["epsilon"] is None else f"ε = {privacy['epsilon']:.3g}")
            fig, axes = plt.subplots(1, 2, figsize=(10, 4))
            for ax, metric in zip(axes, ("rouge1", "nll"), strict=True):
                means = [methods[m][metric][0] for m in shown]
                errors = [0 if math.isnan(methods[m][metric][1]) else methods[m][metric][1] for m in shown]
                ax.bar(range(len(shown)), means, yerr=errors, capsize=3,
                       color=["#c44e52" if m == "nextquill-fed" else "#8172b2" for m in shown])
                ax.set_xticks(range(len(shown)), ticks, fontsize=8)
                ax.set_title(f"{dataset}: {metric} of NextQuill-Fed under DP\n(95% interval over seeds)",
                             fontsize=10)
                ax.grid(axis="y", alpha=0.3)
            save(fig, f"privacy-{dataset}.png")
        # Quality against what each client uploads.
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in names:
            mean = methods[method]["rouge1"][0]
            if not math.isnan(mean):
                ax.scatter(methods[method]["upload_mb"], mean, color="#c44e52" if method == "nextquill-fed"
                           else "#4c72b0")
                ax.annotate(method, (methods[method]["upload_mb"], mean), fontsize=7)
        ax.set_xlabel("upload per client per round (MB)")
        ax.set_ylabel("ROUGE-1")
        ax.set_title(f"{dataset}: quality vs upload")
        ax.grid(alpha=0.3)
        save(fig, f"quality-vs-upload-{dataset}.png")
    curves = [(path, reference, found) for path, detection in detections.items()
              for reference, found in detection.get("references", {"": detection}).items() if "roc_fpr" in found]
    if curves:
        fig, ax = plt.subplots(figsize=(6, 6))
        for path, reference, found in curves:
            ax.plot(found["roc_fpr"], found["roc_tpr"], linewidth=1,
                    label=f"{path.parts[-3]} {path.parts[-2]} {_expert(path)} {reference} (AUC {found['roc_auc']:.3f})")
        ax.plot([0, 1], [0, 1], ":", color="#888888")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("expert DCE against each counterfactual history:\nROC for the known preference tokens")
        ax.legend(fontsize=6)
        save(fig, "dce-roc.png")


def _expert(path: Path) -> str:
    """The expert row whose DCE scores `path` holds."""
    return path.name.removesuffix(DCE_SUFFIX)
