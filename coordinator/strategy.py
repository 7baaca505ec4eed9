"""FedAvg over the shared parameters only, with every reply checked before it is averaged.

The strategy is Flower's own `FedAvg`, extended: a reply whose parameters differ from the
shared ones sent (keys, shapes, dtypes, non-finite values) or whose metrics are not on
the allow-list is logged and excluded, and the round goes on with the rest. Flower's
differential-privacy wrappers (`DifferentialPrivacyServerSideFixedClipping`, ...) wrap it
like any other strategy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from coordinator.validation import reply_problems
from shared.wire import EVALUATE_METRICS, TRAIN_METRICS, disallowed_metrics

log = logging.getLogger(__name__)


class SharedFedAvg(FedAvg):
    """FedAvg (weighted by `num-examples`) of the shared parameters, rejecting bad replies."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: ArrayRecord | None = None
        self.rejected: list[tuple[int, int, str]] = []  # (round, node id, why)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def _screen(self, server_round: int, replies: Iterable[Message], train: bool) -> list[Message]:
        accepted = []
        for reply in replies:
            if reply.has_error():
                accepted.append(reply)  # FedAvg logs and skips failed replies itself
                continue
            problems = []
            metrics = [r for r in reply.content.metric_records.values()]
            for record in metrics:
                bad = disallowed_metrics(dict(record), TRAIN_METRICS if train else EVALUATE_METRICS)
                if bad:
                    problems.append(f"metrics not allowed to leave a device: {bad}")
            if not metrics:
                problems.append("no metrics (num-examples is needed to weight the average)")
            if train:
                arrays = list(reply.content.array_records.values())
                if len(arrays) != 1:
                    problems.append(f"expected one ArrayRecord of shared parameters, got {len(arrays)}")
                elif self.sent is not None:
                    problems += reply_problems(arrays[0], self.sent)
            if problems:
                node = reply.metadata.src_node_id
                log.warning("round %d: reply from node %d excluded: %s", server_round, node, "; ".join(problems))
                self.rejected.append((server_round, node, "; ".join(problems)))
            else:
                accepted.append(reply)
        return accepted

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round, self._screen(server_round, replies, train=True))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return super().aggregate_evaluate(server_round, self._screen(server_round, replies, train=False))
