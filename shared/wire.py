"""What travels between the coordinator and a device, besides Flower's own bookkeeping.

Down (coordinator -> device): a round instruction (phase, round, run id, expert digest), the
shared parameters (one flat array, with their names and shapes in the config: `SharedLayout`),
the run config, and once per device the expert's files.

Up (device -> coordinator), by message, and nothing else:

  query     `has-expert`: 0 or 1.
  train     the shared parameters after local training (expert phase: the whole expert
            LoRA; personalization: the split's shared part only), in the layout received,
            and `TRAIN_METRICS`: the number of training samples, the losses (means over the
            local steps), the step count and seconds.
  evaluate  `EVALUATE_METRICS`: the number of held-out samples and the personalized model's
            scores on them (with `evaluate.base`, the base's too): ROUGE-1/L, BLEU, METEOR,
            NLL and history sensitivity, each a mean over the user's held-out samples.
  failure   a fixed code and category (`client.failures`), never the error's text.
With secure aggregation on, a train reply is SecAgg+'s instead: the shared parameters and the
train metrics, quantized and masked together, so that only their sum over a round's devices
can be read (`coordinator/secure_aggregation.py`).

Never text, token ids, personal parameters or token weights. The metrics are per-user
numbers computed from the user's text: one mean each, from which no text can be read back,
but they do say how many samples a user has, how predictable their writing is (NLL) and how
much their history helps (history sensitivity). Flower adds its own metadata (node and
message ids, the round's group id, the seconds a ClientApp ran). `tests/test_deployment.py`
proves this at the wire with canaries (`simulations.operations.wire_audit`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord

from shared.config import TRANSPORT_DTYPES
from shared.metrics import SCORE_KEYS

if TYPE_CHECKING:
    import torch

NUM_EXAMPLES = "num-examples"


class Phase(StrEnum):
    """The phases of a federated run, in order. Train messages name one of the first two."""

    EXPERT = "expert"  # federated ContextSFT of the expert LoRA
    PERSONALIZE = "personalize"  # the method on the shared / personal split
    EVALUATE = "evaluate"  # every device evaluates its personalized model
    DONE = "done"


ROUND_PHASES = (Phase.EXPERT, Phase.PERSONALIZE)

# Query actions: the expert's distribution (status first, files only where missing).
EXPERT_STATUS = "expert-status"
EXPERT_DELIVER = "expert-deliver"
HAS_EXPERT = "has-expert"
EXPERT_RECORD = "expert"  # the record of a query message that carries the expert's files

TRAIN_METRICS = frozenset({
    NUM_EXAMPLES, "train-loss", "train-l-n", "train-l-p", "train-steps", "train-seconds", "setup-seconds",
    "weights-seconds",
})
# The personalized model's scores, and with `evaluate.base` the same of the base alone (no
# adapter) on the same samples and prompts, and, for a method that reads the history, of the
# base without it: what personalization bought, and what the history alone buys.
EVALUATE_METRICS = frozenset({NUM_EXAMPLES, *(f"eval-{s}" for s in SCORE_KEYS),
                              *(f"eval-base-{s}" for s in SCORE_KEYS),
                              *(f"eval-base-no-history-{s}" for s in SCORE_KEYS)})
QUERY_METRICS = frozenset({HAS_EXPERT})

# Secure aggregation (SecAgg+, `coordinator/secure_aggregation.py`) carries a train message in
# Flower's legacy FitIns / FitRes form, whose arrays have no names (the layout in the config
# names them), and the train metrics ride inside the masked vector, so that the coordinator
# learns only their mean: for each metric, in this order, [reported (0 or 1), value × METRIC_SCALE].
# SecAgg+ clips every value to ±8 before quantizing it; the scale keeps values up to 8192.
SECURE_METRICS = tuple(sorted(TRAIN_METRICS))
METRIC_SCALE = 2.0**-10


def metrics_to_vector(metrics: Mapping[str, float]) -> np.ndarray:
    """A device's train metrics as the float64 vector [2 × len(SECURE_METRICS)] that SecAgg+
    sums with its update."""
    return np.array([x for key in SECURE_METRICS
                     for x in ((1.0, float(metrics[key]) * METRIC_SCALE) if key in metrics else (0.0, 0.0))])


def metrics_from_mean(mean: np.ndarray) -> dict[str, float]:
    """The mean of each metric over the devices that reported it, from the mean of their
    `metrics_to_vector`s; a metric no device reported (a share that is quantization error
    only) is left out."""
    pairs = np.asarray(mean, dtype=np.float64).reshape(len(SECURE_METRICS), 2)
    return {key: float(total / METRIC_SCALE / share) for key, (share, total) in zip(SECURE_METRICS, pairs, strict=True)
            if share > 1e-3}

# Shared parameters travel in float32 or float16: half the bytes, and for LoRA-sized values
# (|w| well inside 6e-5..65504) more mantissa than bfloat16, which numpy (and so Flower's
# ArrayRecord) cannot carry. Both sides train and aggregate in float32.
#
# Flower sends every array of a record as its own object, each with its own HTTP request and
# headers: hundreds of small LoRA matrices cost more in requests than in values. Packed (the
# default), the shared parameters travel as one flat array, `PACKED`, in the order of the
# layout that each train and evaluate message carries in its config (`SHARED_KEYS`,
# `SHARED_SHAPES`); the reply comes back in the same layout.
PACKED = "shared"
SHARED_KEYS = "shared-keys"
SHARED_SHAPES = "shared-shapes"


@dataclass(frozen=True)
class SharedLayout:
    """The names and shapes of the shared parameters, in the order they travel."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> SharedLayout:
        return cls(tuple(state), tuple(tuple(v.shape) for v in state.values()))

    def to_config(self) -> dict[str, list[str]]:
        return {SHARED_KEYS: list(self.keys), SHARED_SHAPES: ["x".join(map(str, shape)) for shape in self.shapes]}

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> SharedLayout:
        try:
            keys, shapes = [str(k) for k in values[SHARED_KEYS]], [str(s) for s in values[SHARED_SHAPES]]
            layout = cls(tuple(keys), tuple(tuple(int(d) for d in s.split("x")) if s else () for s in shapes))
        except KeyError as error:
            raise ValueError(f"message config lacks the shared layout's {error.args[0]!r}") from None
        except ValueError:
            raise ValueError(f"message config: {SHARED_SHAPES!r} holds a shape that is not NxM...: {shapes}") from None
        if len(keys) != len(shapes):
            raise ValueError(f"message config: {len(keys)} shared keys for {len(shapes)} shapes")
        return layout

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def encode(self, state: Mapping[str, torch.Tensor], dtype: str = "float32", packed: bool = True) -> ArrayRecord:
        """`state` (these keys, these shapes) as the ArrayRecord that travels, in the transport
        dtype: one flat array, or one array per parameter."""
        if dtype not in TRANSPORT_DTYPES:
            raise ValueError(f"transport dtype must be one of {TRANSPORT_DTYPES}, got {dtype!r}")
        import torch

        tensors = [state[key].detach().to(getattr(torch, dtype)) for key in self.keys]
        if not packed or not tensors:  # nothing shared (the `local` split): an empty record
            return ArrayRecord(dict(zip(self.keys, tensors, strict=True)))
        return ArrayRecord({PACKED: torch.cat([t.reshape(-1) for t in tensors])})

    @staticmethod
    def is_packed(record: ArrayRecord) -> bool:
        return set(record) == {PACKED}

    def decode(self, record: ArrayRecord) -> dict[str, torch.Tensor]:
        """The float32 tensors of a received record of this layout, packed or not."""
        import torch  # noqa: F401  (Flower converts to tensors only once torch is imported)

        arrays = record.to_torch_state_dict()
        if self.is_packed(record) and PACKED not in self.keys:
            flat = arrays[PACKED].float()
            if flat.numel() != self.numel:
                raise ValueError(f"packed shared parameters hold {flat.numel()} values, the layout {self.numel}")
            pieces = flat.split([math.prod(shape) for shape in self.shapes])
            return {key: piece.reshape(shape) for key, piece, shape in zip(self.keys, pieces, self.shapes, strict=True)}
        if set(arrays) != set(self.keys):
            raise ValueError(f"shared parameters: {len(arrays)} arrays that are not the layout's {len(self.keys)}")
        return {key: arrays[key].float() for key in self.keys}


@dataclass(frozen=True)
class RoundInstruction:
    """What a train or evaluate message tells a device besides the parameters."""

    phase: Phase
    server_round: int
    run_id: str
    expert_digest: str = ""

    def __post_init__(self) -> None:
        if self.phase not in ROUND_PHASES:
            raise ValueError(f"round phase must be one of {[p.value for p in ROUND_PHASES]}, got {self.phase!r}")
        object.__setattr__(self, "phase", Phase(self.phase))
        if not self.run_id.isalnum():
            raise ValueError(f"run id must be alphanumeric, got {self.run_id!r}")

    @property
    def run_name(self) -> str:
        """Names the device's personal state of this run and phase."""
        return f"{self.run_id}-{self.phase}"

    def to_config(self) -> dict[str, Any]:
        return {"phase": self.phase.value, "server-round": self.server_round, "run-id": self.run_id,
                "expert-digest": self.expert_digest}

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> RoundInstruction:
        try:
            return cls(str(values["phase"]), int(values["server-round"]), str(values["run-id"]),
                       str(values.get("expert-digest", "")))
        except KeyError as error:
            raise ValueError(f"round instruction lacks {error.args[0]!r}") from None


def disallowed_metrics(metrics: Mapping[str, Any], allowed: frozenset[str]) -> list[str]:
    """Metric names not on the allow-list, or with a value that is not a plain number."""
    bad = [k for k in metrics if k not in allowed]
    bad += [k for k, v in metrics.items() if k in allowed and (isinstance(v, bool) or not isinstance(v, int | float))]
    return sorted(bad)
