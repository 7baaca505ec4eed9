"""FedAvg over the shared parameters only, with every reply checked before it is averaged.

Two pieces, composed like Flower's own wrappers:
  SampledFedAvg     Flower's `FedAvg`, sampling exactly `clients_per_round` clients however
                    many are connected; its aggregation is FedAvg's own, untouched, which is
                    what Flower's accounted differential privacy requires of the strategy it
                    wraps (`DifferentialPrivacyServerSideFixedClipping(..., accountant=...)`
                    refuses a FedAvg whose `aggregate_train` is overridden).
  ScreenedReplies   wraps any strategy (FedAvg, or a DP wrapper around it): a reply whose
                    parameters differ from the shared ones sent (keys, shapes, dtypes,
                    non-finite values), whose update is longer than `max_update_norm`, or
                    whose metrics are not on the allow-list is logged and excluded before the
                    wrapped strategy sees it, so clipping and noise
                    only ever meet well-formed updates; a round with fewer than
                    `min_replies` valid replies aggregates nothing.

What a training round gives the run, plain or under SecAgg+, is one `RoundOutcome`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from coordinator.validation import reply_problems
from shared.wire import EVALUATE_METRICS, TRAIN_METRICS, disallowed_metrics

log = logging.getLogger("flwr.nextquill")


@dataclass
class RoundOutcome:
    """One training round, as the run records it."""

    shared: dict[str, torch.Tensor] | None  # the aggregated shared parameters; None: nothing aggregated
    metrics: dict[str, float]  # the aggregated train metrics
    sampled: int  # devices sent the round
    replies: int  # replies received (SecAgg+: devices in the sum)
    accepted: int  # replies aggregated
    upload_bytes_per_client: int
    update_norms: dict[str, float] = field(default_factory=dict)  # plain rounds: the updates' L2 norms


class SampledFedAvg(FedAvg):
    """FedAvg (weighted by `weighted_by_key`: `num-examples`, or a uniform weight under central
    DP, `coordinator.privacy`) that samples exactly `clients_per_round` clients, or
    every connected one where fewer are connected (it never waits for more: the coordinator
    decides beforehand, with a deadline, which nodes a round may use; `coordinator/nodes.py`)."""

    def __init__(self, clients_per_round: int, evaluate_clients: int = 0, **kwargs) -> None:
        super().__init__(min_train_nodes=clients_per_round, min_available_nodes=clients_per_round,
                         min_evaluate_nodes=evaluate_clients or clients_per_round, **kwargs)
        self.clients_per_round = clients_per_round
        self.evaluate_clients = evaluate_clients

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.fraction_train, self.min_train_nodes = self._sampling(self.clients_per_round, grid)
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.fraction_evaluate, self.min_evaluate_nodes = self._sampling(self.evaluate_clients, grid)
        return super().configure_evaluate(server_round, arrays, config, grid)

    def _sampling(self, clients: int, grid: Grid) -> tuple[float, int]:
        """FedAvg samples max(int(fraction * connected), min_nodes) once `min_available_nodes` are
        connected: with these, that is min(clients, connected) (all of them for 0), at once."""
        connected = len(list(grid.get_node_ids()))
        size = min(clients, connected) if clients else connected
        self.min_available_nodes = size
        return (size / connected if connected else 0.0), size


def _float32(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """A record's arrays in float32, whatever the transport dtype (packed or not: screening
    and aggregation see the arrays as they travel)."""
    return {key: tensor.float() for key, tensor in record.to_torch_state_dict().items()}


class ScreenedReplies(Strategy):
    """Checks every reply before the wrapped strategy aggregates it."""

    def __init__(self, strategy: Strategy, min_replies: int = 1,
                 expected_metrics: dict[str, float] | None = None, max_update_norm: float = 0.0) -> None:
        self.strategy = strategy
        self.min_replies = min_replies
        self.max_update_norm = max_update_norm  # exclude a train reply whose update is longer (0: no bound)
        # Train metrics every valid reply must hold with exactly these values (with central DP,
        # the uniform aggregation weight: a reply claiming another weight is excluded here rather
        # than stopping Flower's accounted aggregation).
        self.expected_metrics = expected_metrics or {}
        self.sent: ArrayRecord | None = None
        self.rejected: list[tuple[int, int, str]] = []  # (round, node id, why)
        self.accepted: list[Message] = []  # the replies the last aggregation used
        self.update_norms: list[float] = []  # L2 norm of each accepted train reply's update (reply - sent)

    def summary(self) -> None:
        log.info("screening replies: shared parameters as sent, allow-listed metrics, at least %d valid",
                 self.min_replies)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not self._screen(server_round, replies, train=True):
            return None, None
        return self.strategy.aggregate_train(server_round, self.accepted)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if not self._screen(server_round, replies, train=False):
            return None
        return self.strategy.aggregate_evaluate(server_round, self.accepted)

    def _screen(self, server_round: int, replies: Iterable[Message], train: bool) -> bool:
        """Keep the valid replies in `self.accepted`; whether there are enough of them."""
        self.accepted, self.update_norms = [], []
        sent = _float32(self.sent) if train and self.sent is not None else {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("round %d: node %d failed: %s", server_round, node, reply.error.reason)
                continue
            problems = self._problems(reply, train)
            if train and not problems:
                # Aggregate in float32, whatever the transport dtype, in the order sent (Flower's DP
                # wrappers pair a reply's arrays with those sent by position).
                key, record = next(iter(reply.content.array_records.items()))
                decoded = _float32(record)
                norm = float(sum(((decoded[k] - sent[k]) ** 2).sum() for k in sent) ** 0.5) if sent else None
                if norm is not None and self.max_update_norm and norm > self.max_update_norm:
                    problems.append(f"update norm {norm:.4g} exceeds federation.max-update-norm "
                                    f"{self.max_update_norm:g}")
                else:
                    reply.content[key] = ArrayRecord({name: decoded[name] for name in (self.sent or decoded)})
                    if norm is not None:
                        self.update_norms.append(norm)
            if problems:
                log.warning("round %d: reply from node %d excluded: %s", server_round, node, "; ".join(problems))
                self.rejected.append((server_round, node, "; ".join(problems)))
                continue
            self.accepted.append(reply)
        if len(self.accepted) < self.min_replies:
            log.warning("round %d: %d valid replies, fewer than federation.min-replies %d: nothing aggregated",
                        server_round, len(self.accepted), self.min_replies)
            return False
        return True

    def _problems(self, reply: Message, train: bool) -> list[str]:
        problems = []
        metrics = list(reply.content.metric_records.values())
        if len(metrics) != 1:
            problems.append(f"expected one MetricRecord, got {len(metrics)}")
        for record in metrics:
            bad = disallowed_metrics(dict(record), TRAIN_METRICS if train else EVALUATE_METRICS)
            if bad:
                problems.append(f"metrics not allowed to leave a device: {bad}")
            if train:
                problems += [f"metric {key!r} is {record.get(key)!r}, expected {value!r}"
                             for key, value in self.expected_metrics.items() if record.get(key) != value]
        arrays = list(reply.content.array_records.values())
        if train:
            if len(arrays) != 1:
                problems.append(f"expected one ArrayRecord of shared parameters, got {len(arrays)}")
            elif self.sent is not None:
                problems += reply_problems(arrays[0], self.sent)
        elif arrays:
            problems.append("an evaluation reply carries parameters")
        return problems
