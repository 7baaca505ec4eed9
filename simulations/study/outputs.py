"""The study's look at what the models wrote and at what the data leaves room for: a few held-out
samples of each dataset with every method's text beside the reference and the history, the
generated lengths, and each dataset's budgets and headroom (`data.profile.json`, written by
`simulations.study.cells.data_profile`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.metrics import words

SHOWN_USERS = 2  # users whose first held-out sample the report shows, per dataset


def _quote(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit] + " …"
    return text.replace("|", "\\|") or "(empty)"


def profiles(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Dataset -> the data profiles of its seeds."""
    found: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(Path(out).glob("cells/*/seed-*/data.profile.json")):
        found.setdefault(path.parts[-3], []).append(json.loads(path.read_text()))
    return found


def profile_lines(found: list[dict[str, Any]]) -> list[str]:
    if not found:
        return []

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    headroom = {name: mean([p["headroom"][name] for p in found]) for name in found[0]["headroom"]}
    return [f"Data ({len(found)} seeds): targets average {mean([p['target_tokens_mean'] for p in found]):.1f} "
            f"tokens; the response budget of {found[0]['response_tokens']} tokens cuts "
            f"{100 * mean([p['targets_cut_share'] for p in found]):.1f}% of them; the history budget holds "
            f"{mean([p['history_items_kept_mean'] for p in found]):.1f} past items on average. Headroom (ROUGE-1 "
            "over the held-out samples): " + "; ".join(f"{name} {value:.3f}" for name, value in headroom.items())
            + ".", ""]


def outputs_lines(cells: list[dict[str, Any]], dataset: str, order: dict[str, int]) -> list[str]:
    """Generated lengths of every method, and the first held-out sample of a few users with each
    method's text (the first seed)."""
    mine = [c for c in cells if c["dataset"] == dataset and c.get("outputs")]
    if not mine:
        return []
    lines = ["Generated length (words, mean over every held-out sample and seed):", ""]
    references = [len(words(o["reference"])) for o in mine[0]["outputs"]]
    lines.append(f"- reference: {sum(references) / len(references):.1f}")
    for method in sorted({c["method"] for c in mine}, key=lambda m: order.get(m, 99)):
        lengths = [len(words(o["prediction"])) for c in mine if c["method"] == method for o in c["outputs"]]
        empty = sum(1 for n in lengths if n == 0)
        lines.append(f"- `{method}`: {sum(lengths) / len(lengths):.1f}" + (f" ({empty} empty)" if empty else ""))
    seed = min(c["seed"] for c in mine)
    first = [c for c in mine if c["seed"] == seed]
    by_method = {c["method"]: {(o["index"], o["sample_id"]): o for o in c["outputs"]} for c in first}
    samples = []
    for output in first[0]["outputs"]:
        if output["index"] not in {s["index"] for s in samples}:
            samples.append(output)
        if len(samples) == SHOWN_USERS:
            break
    for sample in samples:
        key = (sample["index"], sample["sample_id"])
        lines += ["", f"Seed {seed}, user `{sample['user']}`, held-out sample `{sample['sample_id']}`:", "",
                  "| | text |", "|---|---|",
                  f"| context | {_quote(sample['x'])} |",
                  f"| latest history item | {_quote(sample['history'][0] if sample['history'] else '')} |",
                  f"| **reference** | {_quote(sample['reference'])} |"]
        for method in sorted(by_method, key=lambda m: order.get(m, 99)):
            if key in by_method[method]:
                lines.append(f"| `{method}` | {_quote(by_method[method][key]['prediction'])} |")
    return lines + [""]
