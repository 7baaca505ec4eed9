"""Make the expert's token weights inspectable: for every target of a user store, each token
with its character offsets in the target text, its DCE and its weight, as JSON lines, plus
an HTML view that highlights the preference-driven words. Where the store knows which
words are preference-driven (synthetic users), the summary scores DCE as a detector."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import torch

from client.device import Device, Expert
from client.token_weights import user_weight_scheme
from shared.config import WeightScheme
from shared.losses import token_weights
from shared.metrics import content_spans
from shared.paths import atomic_directory, atomic_write_jsonl, atomic_write_text, refuse_to_replace
from shared.user_store import UserStore


def token_rows(device: Device, store: UserStore, expert: Expert, scheme: WeightScheme,
               donors: Sequence[UserStore] = (), split: str | None = None) -> list[dict]:
    """One row per target of `split` (None: train and test samples): its tokens with offsets,
    DCE against the scheme's counterfactual history, and weight (`donors`: other users, for the
    'donors' reference)."""
    probs = device.expert_probs(store, expert, scheme.dce_reference, donors, split=split)
    scheme = user_weight_scheme(scheme, probs.values())
    rows = []
    for sample in store.samples(split):
        p = probs[sample.id]
        carried = content_spans(sample.x, sample.y)
        weights = token_weights(scheme, torch.tensor(p.prob_with), torch.tensor(p.prob_without)).tolist()
        offsets = device.tokenizer(sample.y, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        tokens = []
        for i, token_id in enumerate(p.token_ids):
            start, end = offsets[i] if i < len(offsets) else (len(sample.y), len(sample.y))
            tokens.append({
                "token": device.tokenizer.decode([token_id]),
                "start": start,
                "end": end,
                "dce": p.prob_with[i] - p.prob_without[i],
                "weight": weights[i],
                "preference": any(s < end and start < e for s, e in sample.preference_spans),
                "preference_start": False,
                "content": any(s < end and start < e for s, e in carried),
            })
        # The token where a preference span (a word) begins is where the user's choice shows;
        # the rest of a multi-token word follows from it, with or without history.
        for span_start, span_end in sample.preference_spans:
            first = next((t for t in tokens if span_start < t["end"] and t["start"] < span_end), None)
            if first is not None:
                first["preference_start"] = True
        rows.append({"sample_id": sample.id, "split": sample.split, "target": sample.y, "tokens": tokens})
    return rows


def detection_summary(rows: list[dict], scheme: WeightScheme) -> dict:
    """How DCE separates tokens; with ground truth, precision/recall of the high-weight tokens."""
    tokens = [t for row in rows for t in row["tokens"]]
    threshold = (scheme.weight_low + scheme.weight_high) / 2
    high = [t for t in tokens if t["weight"] > threshold]
    summary = {"targets": len(rows), "tokens": len(tokens), "high_weight_tokens": len(high),
               "mean_dce": sum(t["dce"] for t in tokens) / max(1, len(tokens))}
    # Where the weights put the loss: the style words (ground truth), the content carried over
    # from the input, and the rest (template, function words), each as a share of the tokens
    # and of the summed weight.
    classes = {"style": [t for t in tokens if t["preference"]],
               "content": [t for t in tokens if t.get("content") and not t["preference"]]}
    classes["other"] = [t for t in tokens if not t["preference"] and not t.get("content")]
    if not classes["style"]:  # no ground truth: not a class of its own
        del classes["style"]
    total = sum(t["weight"] for t in tokens)
    if tokens and total > 0:
        summary["token_share"] = {k: len(v) / len(tokens) for k, v in classes.items()}
        summary["weight_share"] = {k: sum(t["weight"] for t in v) / total for k, v in classes.items()}
        # The share of each kind's tokens weighted λ: what DCE decides, whatever ε is.
        summary["high_weight_share"] = {k: sum(1 for t in v if t["weight"] > threshold) / len(v)
                                        for k, v in classes.items() if v}
    truth = [t for t in tokens if t["preference"]]
    if truth:
        others = [t for t in tokens if not t["preference"]]
        hits = sum(1 for t in high if t["preference"])
        summary.update({
            "preference_tokens": len(truth),
            "mean_dce_preference_tokens": sum(t["dce"] for t in truth) / len(truth),
            "mean_dce_other_tokens": sum(t["dce"] for t in others) / max(1, len(others)),
            "precision": hits / max(1, len(high)),
            "recall": hits / len(truth),
            "roc_auc": roc_auc([t["dce"] for t in tokens], [t["preference"] for t in tokens]),
        })
        # The same, counting only the first token of each preference span against the tokens
        # outside every span.
        decisive = [t for t in tokens if t["preference_start"] or not t["preference"]]
        starts = [t for t in decisive if t["preference_start"]]
        summary.update({
            "preference_spans": len(starts),
            "recall_span_start": sum(1 for t in starts if t["weight"] > threshold) / max(1, len(starts)),
            "roc_auc_span_start": roc_auc([t["dce"] for t in decisive], [t["preference_start"] for t in decisive]),
        })
    return summary


def roc_auc(scores: list[float], positive: list[bool]) -> float:
    """Area under the ROC curve of `scores` for telling `positive` items from the others: the
    chance that a random positive scores above a random negative (ties count half)."""
    n_pos = sum(positive)
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return float("nan")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):  # average ranks over ties
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    positive_ranks = sum(rank for rank, pos in zip(ranks, positive, strict=True) if pos)
    return (positive_ranks - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def roc_curve(scores: list[float], positive: list[bool], points: int = 200) -> tuple[list[float], list[float]]:
    """(false positive rates, true positive rates) as the threshold falls through `scores`, at
    most `points` of them (for a plot)."""
    n_pos = sum(positive)
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return [], []
    ranked = sorted(zip(scores, positive, strict=True), key=lambda pair: -pair[0])
    fpr, tpr, tp, fp = [0.0], [0.0], 0, 0
    every = max(1, len(ranked) // points)
    for index, (_, pos) in enumerate(ranked, start=1):
        tp, fp = tp + pos, fp + (not pos)
        if index % every == 0 or index == len(ranked):
            fpr.append(fp / n_neg)
            tpr.append(tp / n_pos)
    return fpr, tpr


def render_html(rows: list[dict], title: str) -> str:
    """Targets with each token shaded by its DCE (red: history made it likelier) and
    preference-driven (high-weight) tokens in bold; ground-truth preference words underlined."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:serif;max-width:60em;margin:2em auto}p{white-space:pre-wrap}"
             "span.t{border-radius:2px}span.gt{text-decoration:underline}small{color:#666}</style>",
             f"<h1>{html.escape(title)}</h1><p><small>Shade: DCE (expert probability with history minus "
             "without). Bold: high token weight. Underlined: known preference words (synthetic users).</small></p>"]
    for row in rows:
        text = row["target"]
        cursor = 0
        out = []
        for t in row["tokens"]:
            if t["start"] < cursor or t["end"] <= t["start"]:
                continue
            out.append(html.escape(text[cursor : t["start"]]))
            shade = max(0.0, min(1.0, t["dce"] / 0.5))
            style = f"background:rgba(220,40,40,{shade:.2f})"
            classes = "t gt" if t["preference"] else "t"
            piece = html.escape(text[t["start"] : t["end"]])
            if t["weight"] > 0.5:
                piece = f"<b>{piece}</b>"
            out.append(f"<span class='{classes}' style='{style}' title='DCE {t['dce']:+.3f}, "
                       f"weight {t['weight']:.2f}'>{piece}</span>")
            cursor = t["end"]
        out.append(html.escape(text[cursor:]))
        parts.append(f"<p><small>{html.escape(row['sample_id'])} ({row['split']})</small><br>{''.join(out)}</p>")
    return "\n".join(parts)


def write_inspection(device: Device, store: UserStore, expert: Expert, scheme: WeightScheme, out: Path,
                     overwrite: bool = False) -> dict:
    """Write the folder `out` with token_weights.jsonl and token_weights.html (in one rename; an
    `out` that holds something is replaced only when `overwrite`); returns the summary."""
    refuse_to_replace(out, overwrite)
    rows = token_rows(device, store, expert, scheme)
    with atomic_directory(out, overwrite=overwrite) as staging:
        atomic_write_jsonl(staging / "token_weights.jsonl", rows)
        atomic_write_text(staging / "token_weights.html", render_html(rows, f"Token weights of {store.user_id}"))
    summary = detection_summary(rows, scheme)
    summary["files"] = [str(out / "token_weights.jsonl"), str(out / "token_weights.html")]
    return summary
