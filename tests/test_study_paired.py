"""The study's paired comparisons (simulations/study/paired.py): per-user differences against the
fair baseline, their two-level bootstrap interval, the style metric and the CSV files."""

import math

import pytest

from shared.metrics import content_recall, content_words, span_words, style_scores
from simulations.study.paired import bootstrap_interval, dce_rows, paired_rows, per_user


def _cell(method, seed, rouge1, dataset="reviewers"):
    return {"dataset": dataset, "method": method, "seed": seed,
            "per_user": [{"node_id": 1000.0 + i, "rouge1": r, "nll": 1.0} for i, r in enumerate(rouge1)]}


def test_the_interval_excludes_zero_only_when_users_agree():
    steady = {0: [0.05, 0.06, 0.04, 0.05], 1: [0.05, 0.07, 0.05, 0.06]}
    mean, low, high = bootstrap_interval(steady)
    assert mean == pytest.approx(0.05375) and 0 < low <= mean <= high
    mixed = {0: [0.2, -0.2, 0.1, -0.1], 1: [0.15, -0.15, 0.0, 0.05]}
    _, low, high = bootstrap_interval(mixed)
    assert low < 0 < high


def test_differences_are_paired_by_user_and_seed_and_cover_the_fair_pairs():
    cells = [_cell("nextquill-fed", 0, [0.5, 0.6, 0.7]), _cell("feddpa", 0, [0.4, 0.5, 0.6]),
             _cell("nextquill-fed", 1, [0.5, 0.5]), _cell("feddpa", 1, [0.5, 0.4]),
             _cell("history-prompt", 0, [0.1, 0.1, 0.1]), _cell("reference-removed", 0, [0.5, 0.6, 0.6])]
    paired = paired_rows(cells, {"reference-removed": "nextquill-fed"})
    rows = {(r["method"], r["baseline"], r["metric"]): r for r in paired}
    against_feddpa = rows[("nextquill-fed", "feddpa", "rouge1")]
    assert against_feddpa["mean_difference"] == pytest.approx((0.1 * 3 + 0.0 + 0.1) / 5)
    assert (against_feddpa["users"], against_feddpa["seeds"]) == (5, 2)
    assert rows[("nextquill-fed", "history-prompt", "rouge1")]["seeds"] == 1  # only where both rows have a cell
    assert rows[("reference-removed", "nextquill-fed", "rouge1")]["mean_difference"] == pytest.approx(-0.1 / 3)
    assert rows[("nextquill-fed", "feddpa", "nll")]["mean_difference"] == pytest.approx(0.0)


def test_the_style_metric_counts_the_users_own_words():
    text = "Honestly, the kettle is sleek and handy, mind you. Worth it."
    spans = [(text.index(w), text.index(w) + len(w)) for w in ("Honestly", "sleek", "handy")]
    reference_words = span_words(text, spans)
    assert reference_words == {"honestly", "sleek", "handy"}
    vocabulary = {"honestly", "well", "sleek", "handy", "clunky", "dull"}
    mine = {"honestly", "sleek", "handy"}
    assert style_scores("Honestly it is sleek and handy.", reference_words, mine, vocabulary)["style_f1"] == 1.0
    others = style_scores("Well it is clunky and dull.", reference_words, mine, vocabulary)
    assert others["style_precision"] == 0.0 and others["style_recall"] == 0.0 and others["style_f1"] == 0.0
    half = style_scores("Well, it is sleek.", reference_words, mine, vocabulary)
    assert half["style_precision"] == 0.5 and half["style_recall"] == pytest.approx(1 / 3)
    assert math.isnan(style_scores("no style", set(), mine, vocabulary)["style_f1"])


def test_style_f1_and_content_recall_enter_the_per_user_metrics_from_the_devices_outputs():
    cell = _cell("nextquill-fed", 0, [0.5, 0.6])
    cell["outputs"] = [
        {"index": 0, "x": "Review the kettle, priced at $12.", "reference": "The kettle is sleek and handy, $12.",
         "prediction": "kettle: sleek and handy", "reference_style_words": ["sleek", "handy"],
         "user_style_words": ["sleek", "handy"]},
        {"index": 1, "x": "Review the lamp.", "reference": "A dull thing.", "prediction": "sleek",
         "reference_style_words": ["dull"], "user_style_words": ["dull"]},
    ]
    users = per_user(cell)
    assert users[0]["style-f1"] == 1.0 and users[1]["style-f1"] == 0.0 and users[0]["rouge1"] == 0.5
    assert users[0]["content-recall"] == 0.5  # the kettle carried, the price not
    assert "content-recall" not in users[1]  # its reference repeats nothing of the input


def test_content_recall_counts_the_inputs_content_words_that_the_reference_repeats():
    context = "Review the keyboard: it has a non-stick coating and a padded strap, priced at $67."
    reference = "Hmm, for $67 this keyboard comes with a non-stick coating and a padded strap."
    assert content_words(context) == {"review", "keyboard", "non-stick", "coating", "padded", "strap", "priced", "67"}
    assert content_recall(context, reference, reference) == 1.0
    assert content_recall(context, reference, "The keyboard has a padded strap, and it costs $298.") == 0.5
    assert math.isnan(content_recall(context, "Five stars from me.", "anything"))


def test_dce_rows_average_each_counterfactual_over_seeds(tmp_path):
    def detection(auc):
        return {"references": {"removed": {"roc_auc": auc, "precision": 0.4, "recall": 0.8, "share_high_weight": 0.5,
                                           "mean_dce": 0.1},
                               "generic": {"roc_auc": auc + 0.1, "precision": 0.7, "recall": 0.8,
                                           "share_high_weight": 0.3, "mean_dce": 0.05}}}

    detections = {tmp_path / "cells" / "reviewers" / f"seed-{s}" / "fedit-context-sft.dce.json": detection(0.7 + s / 10)
                  for s in (0, 1)}
    rows = {r["counterfactual"]: r for r in dce_rows(detections, "fedit-context-sft")}
    assert rows["removed"]["roc_auc"] == pytest.approx(0.75) and rows["generic"]["roc_auc"] == pytest.approx(0.85)
    assert rows["generic"]["seeds"] == 2 and rows["generic"]["dataset"] == "reviewers"
