"""The coordinator rejects replies that are not exactly the shared parameters."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from coordinator.validation import reply_problems


def _record(**arrays):
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


REFERENCE = _record(a=np.zeros((2, 3), np.float32), b=np.zeros(4, np.float32))


def test_a_reply_with_the_shared_layout_passes():
    assert reply_problems(_record(a=np.ones((2, 3), np.float32), b=np.ones(4, np.float32)), REFERENCE) == []


@pytest.mark.parametrize(
    ("reply", "complaint"),
    [
        (_record(a=np.ones((2, 3), np.float32)), "missing 1 shared keys"),
        (_record(a=np.ones((2, 3), np.float32), b=np.ones(4, np.float32), personal=np.ones(1, np.float32)),
         "not shared parameters"),
        (_record(a=np.ones((3, 2), np.float32), b=np.ones(4, np.float32)), "shape (3, 2)"),
        (_record(a=np.ones((2, 3), np.float64), b=np.ones(4, np.float32)), "dtype float64"),
        (_record(a=np.full((2, 3), np.nan, np.float32), b=np.ones(4, np.float32)), "non-finite"),
        (_record(a=np.ones((2, 3), np.float32), b=np.array([1, np.inf, 0, 0], np.float32)), "non-finite"),
    ],
)
def test_a_reply_that_differs_from_the_shared_spec_is_named_precisely(reply, complaint):
    problems = reply_problems(reply, REFERENCE)
    assert problems and any(complaint in p for p in problems)
