"""FedAvg over the shared parameters only, with every reply checked before it is averaged.

The strategy is Flower's own `FedAvg`, extended: exactly `clients_per_round` clients per
round, at least `min_replies` valid replies to aggregate, and a reply whose parameters differ from the
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

    def __init__(self, clients_per_round: int, min_replies: int = 1, **kwargs) -> None:
        # FedAvg samples max(int(fraction_train * connected), min_train_nodes): with the
        # fraction set per round (below), exactly `clients_per_round` however many connect.
        super().__init__(min_train_nodes=clients_per_round, min_available_nodes=clients_per_round,
                         min_evaluate_nodes=clients_per_round, **kwargs)
        self.clients_per_round = clients_per_round
        self.min_replies = min_replies
        self.sent: ArrayRecord | None = None
        self.rejected: list[tuple[int, int, str]] = []  # (round, node id, why)
        self.accepted: list[Message] = []  # the replies the last aggregation used

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = arrays
        connected = max(1, len(list(grid.get_node_ids())))
        self.fraction_train = min(1.0, self.clients_per_round / connected)
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

    def _enough(self, server_round: int, replies: list[Message]) -> bool:
        self.accepted = [reply for reply in replies if not reply.has_error()]
        if len(self.accepted) < self.min_replies:
            log.warning("round %d: %d valid replies, fewer than min-replies %d: nothing aggregated",
                        server_round, len(self.accepted), self.min_replies)
            return False
        return True

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        screened = self._screen(server_round, replies, train=True)
        if not self._enough(server_round, screened):
            return None, None
        return super().aggregate_train(server_round, screened)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        screened = self._screen(server_round, replies, train=False)
        if not self._enough(server_round, screened):
            return None
        return super().aggregate_evaluate(server_round, screened)
