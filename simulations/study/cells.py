"""One cell of the study, run: a federated run of the real ServerApp and ClientApp in this
process (`simulations.inprocess`), the non-private central reference, the expert's DCE against
every counterfactual history, and the data's budgets and headroom."""


from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from shared.run_config import RunConfig


def run_federated_cell(config: RunConfig, users: int) -> dict[str, Any]:
    """One federated cell through the real apps: per-user and macro metrics, metrics per
    round, upload bytes per client per round."""
    from client.client_app import app as client_app
    from coordinator.checkpoint import load_checkpoint
    from coordinator.federation import run_federation
    from coordinator.run_directory import EVALUATION_FILE, RoundLog
    from simulations.inprocess import InProcessGrid

    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": users} for i in range(users)],
                         config.to_flower())
    result = run_federation(grid, config)
    run_dir = config.resolve(config.federation.run_dir)
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
    for index, path in enumerate(list_user_stores(config.resolve(config.users.dir))[:users]):
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
    from client.device import Expert
    from client.evaluation import public_donor_history
    from shared.metrics import SCORE_KEYS, SCORES, macro_average
    from shared.user_store import UserStore
    from simulations.datasets.simulated import simulated_user_stores

    device = federated.resident_device(config)
    stores = [UserStore.open(p) for p in simulated_user_stores(config, users)[:users]]
    steps = users * config.federation.rounds * config.federation.local_steps
    train = dataclasses.replace(config.train_config(config.train.method, config.federation.seed), max_steps=steps)
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
    from client.device import Expert
    from client.inspect_weights import detection_summary, roc_curve, token_rows
    from client.reference import donor_stores
    from shared.config import REFERENCES
    from shared.user_store import UserStore, list_user_stores

    stores = [UserStore.open(p) for p in list_user_stores(config.resolve(config.users.dir))[:users]]
    device = federated.resident_device(config)
    by_reference = {}
    for reference in REFERENCES:
        scheme = dataclasses.replace(config.weights, dce_reference=reference)
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
    return {**by_reference[config.weights.dce_reference], "reference": config.weights.dce_reference,
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

    stores = [UserStore.open(p) for p in list_user_stores(config.resolve(config.users.dir))[:users]]
    tokenizer = federated.resident_device(config).tokenizer
    samples = [(store, s) for store in stores for s in store.samples()]
    lengths = [len(tokenizer(s.y, add_special_tokens=False)["input_ids"]) for _, s in samples]
    kept = [len(cut_history(tokenizer, [h.text for h in store.history_for(s)], config.prompt.history_tokens))
            for store, s in samples if s.split == "test"]
    tests = [(store, s) for store, s in samples if s.split == "test"]
    references = [s.y for _, s in tests]
    if config.users.dataset == "reviewers":
        floor = [non_personal_review(s.x) for _, s in tests]
        ceiling = [oracle_review(s.x, store.meta) for store, s in tests]
        names = ("non-personal (shared template)", "oracle (the user's favourite words)")
    else:
        floor = [next((h.text for h in store.history_for(s)), "") for store, s in tests]
        ceiling = [max((h.text for h in store.history_for(s)), key=lambda h, y=s.y: rouge([h], [y])["rouge1"],
                       default="") for store, s in tests]
        names = ("the user's latest message", "oracle (the best single message of the user's history)")
    return {"targets": len(lengths), "response_tokens": config.prompt.response_tokens,
            "targets_cut_share": sum(n >= config.prompt.response_tokens for n in lengths) / len(lengths),
            "target_tokens_mean": sum(lengths) / len(lengths),
            "history_items_kept_mean": sum(kept) / max(1, len(kept)),
            "headroom": {names[0]: rouge(floor, references)["rouge1"], names[1]: rouge(ceiling, references)["rouge1"]}}
