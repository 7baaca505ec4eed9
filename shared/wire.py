"""What may leave a device, besides the shared parameters: an allow-list of numeric metrics.
Never text, token ids, history-derived statistics, personal parameters or token weights."""

from __future__ import annotations

NUM_EXAMPLES = "num-examples"

TRAIN_METRICS = frozenset({NUM_EXAMPLES, "train-loss", "train-l-n", "train-l-p", "train-steps", "train-seconds"})
EVALUATE_METRICS = frozenset({
    NUM_EXAMPLES, "eval-rouge1", "eval-rougeL", "eval-bleu", "eval-nll", "eval-history-sensitivity",
})


def disallowed_metrics(metrics: dict, allowed: frozenset[str]) -> list[str]:
    """Metric names not on the allow-list, or with a value that is not a plain number."""
    bad = [k for k in metrics if k not in allowed]
    bad += [k for k, v in metrics.items() if k in allowed and (isinstance(v, bool) or not isinstance(v, int | float))]
    return sorted(bad)
