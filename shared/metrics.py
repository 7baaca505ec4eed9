"""Text-generation metrics and macro-averaging over users.

ROUGE-1 / ROUGE-L F1 from `rouge-score` (with stemming), BLEU from `sacrebleu` (corpus
BLEU over a user's samples, 0-100). METEOR is not offered: the library that serves it
(nltk) needs WordNet data fetched at run time, which this project never does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer

_ROUGE = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F1 over pairs."""
    _check_pairs(predictions, references)
    scores = [_ROUGE.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return {
        "rouge1": sum(s["rouge1"].fmeasure for s in scores) / len(scores),
        "rougeL": sum(s["rougeL"].fmeasure for s in scores) / len(scores),
    }


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100)."""
    _check_pairs(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def macro_average(rows: Sequence[dict[str, float]], keys: Sequence[str]) -> dict[str, float]:
    """Mean and population standard deviation across users of each key: {key, key_std}."""
    out: dict[str, float] = {}
    for key in keys:
        values = [row[key] for row in rows if row.get(key) is not None and not math.isnan(row[key])]
        if not values:
            out[key] = out[f"{key}_std"] = float("nan")
            continue
        mean = sum(values) / len(values)
        out[key] = mean
        out[f"{key}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return out


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"need as many predictions as references, at least one; got {len(predictions)} and {len(references)}"
        )
