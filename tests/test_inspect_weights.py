"""Inspecting the expert's DCE and token weights: one line per target, tokens with their
character offsets, and an HTML view."""

import json

import pytest

from client.inspect_weights import write_inspection
from shared.config import WeightScheme
from shared.user_store import UserStore
from simulations.datasets import import_lamp_json


def test_inspection_lists_each_target_token_with_offsets_dce_and_weight(user_device, user_stores, experts, tmp_path):
    store = user_stores[0]
    scheme = WeightScheme()
    summary = write_inspection(user_device, store, experts[0], scheme, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "token_weights.jsonl").read_text().splitlines()]
    assert len(rows) == len(store.samples())
    for row in rows:
        for token in row["tokens"]:
            assert 0 <= token["start"] <= token["end"] <= len(row["target"])
            assert token["weight"] in (pytest.approx(scheme.weight_high), pytest.approx(scheme.weight_low))
        pieces = "".join(row["target"][t["start"]:t["end"]] for t in row["tokens"])
        assert pieces.replace(" ", "") == row["target"].replace(" ", "")[: len(pieces.replace(" ", ""))]
    assert summary["preference_tokens"] > 0 and "recall" in summary
    spans = {s.id: s.preference_spans for s in store.samples()}
    scored_spans = 0
    for row in rows:  # each preference span starts at its first token, and only there
        for begin, end in spans[row["sample_id"]]:
            inside = [t for t in row["tokens"] if begin < t["end"] and t["start"] < end]
            if inside:  # else beyond the response budget
                scored_spans += 1
                assert inside[0]["preference_start"] and not any(t["preference_start"] for t in inside[1:])
    assert summary["preference_spans"] == scored_spans > 0
    assert 0.0 <= summary["roc_auc_span_start"] <= 1.0
    html = (tmp_path / "token_weights.html").read_text()
    assert html.startswith("<!doctype html>") and "DCE" in html


def test_inspection_works_for_an_imported_lamp_store(user_device, experts, tmp_path):
    records = [
        {"id": f"r{i}", "user_id": "u1", "input": f"Write about item {i}", "output": f"Item {i} is lovely, truly.",
         "profile": [{"id": f"p{j}", "text": f"Old review {j}, truly lovely."} for j in range(3)]}
        for i in range(4)
    ]
    (tmp_path / "lamp.json").write_text(json.dumps(records))
    store = UserStore.open(import_lamp_json(tmp_path / "user_stores", tmp_path / "lamp.json")[0])
    summary = write_inspection(user_device, store, experts[0], WeightScheme(weighting="continuous"), tmp_path / "out")
    assert summary["targets"] == len(store.samples()) and summary["tokens"] > 0


def test_roc_auc_is_the_chance_a_positive_outscores_a_negative():
    from client.inspect_weights import roc_auc, roc_curve

    assert roc_auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert roc_auc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5
    assert roc_auc([0.3, 0.6, 0.1, 0.6], [True, True, False, False]) == pytest.approx(0.625)
    fpr, tpr = roc_curve([0.9, 0.8, 0.1, 0.2], [True, True, False, False])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0) and tpr[2] == 1.0 and fpr[2] == 0.0


def test_the_summary_says_where_the_loss_weight_goes_by_kind_of_token():
    from client.inspect_weights import detection_summary

    def token(weight, preference=False, content=False):
        return {"dce": weight, "weight": weight, "preference": preference, "preference_start": preference,
                "content": content}

    rows = [{"tokens": [token(0.9, preference=True), token(0.1, content=True), token(0.1, content=True),
                        token(0.9), token(0.1)]}]
    summary = detection_summary(rows, WeightScheme())
    assert summary["token_share"] == {"style": 0.2, "content": 0.4, "other": 0.4}
    assert summary["weight_share"] == pytest.approx({"style": 0.9 / 2.1, "content": 0.2 / 2.1, "other": 1.0 / 2.1})
    assert summary["high_weight_share"] == {"style": 1.0, "content": 0.0, "other": 0.5}
    no_truth = detection_summary([{"tokens": [token(0.9), token(0.1, content=True)]}], WeightScheme())
    assert set(no_truth["weight_share"]) == {"content", "other"}  # no style words known: no class of its own


def test_content_spans_are_where_a_target_repeats_its_inputs_content_words():
    from shared.metrics import content_spans

    text = "For $67 this Keyboard has a padded strap."
    spans = content_spans("Review the keyboard: a padded strap, priced at $67.", text)
    assert [text[a:b] for a, b in spans] == ["67", "Keyboard", "padded", "strap"]
