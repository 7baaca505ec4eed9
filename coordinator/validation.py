"""Checks on what a client sends back: exactly the shared parameters, in the shapes and
dtypes of the shared spec, all finite. A reply that fails is excluded from aggregation."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord


def reply_problems(reply: ArrayRecord, reference: ArrayRecord) -> list[str]:
    """What is wrong with `reply` against `reference` (the shared parameters the coordinator
    sent): missing or extra keys, other shapes or dtypes, non-finite values. Empty if none."""
    problems = []
    missing = sorted(set(reference) - set(reply))
    extra = sorted(set(reply) - set(reference))
    if missing:
        problems.append(f"missing {len(missing)} shared keys, e.g. {missing[0]!r}")
    if extra:
        problems.append(f"{len(extra)} keys that are not shared parameters, e.g. {extra[0]!r}")
    for key in sorted(set(reply) & set(reference)):
        got, want = reply[key], reference[key]
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{key!r} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif got.dtype != want.dtype:
            problems.append(f"{key!r} has dtype {got.dtype}, expected {want.dtype}")
        elif not np.isfinite(got.numpy()).all():
            problems.append(f"{key!r} holds a non-finite value")
    return problems
