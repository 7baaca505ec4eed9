"""The in-process grid with the faults the coordinator's tests need: a coordinator that
crashes before a chosen train round, nodes that are down, and nodes that leave mid-run."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.clientapp import ClientApp

from simulations.inprocess import InProcessGrid


class CoordinatorCrash(RuntimeError):
    """Raised by the grid to stop the coordinator at a chosen point, as a crash would."""


class LoopbackGrid(InProcessGrid):
    def __init__(self, client_app: ClientApp, node_configs: list[dict[str, Any]], run_config: dict[str, Any],
                 crash_after_train_rounds: int | None = None, failing_nodes: frozenset[int] = frozenset(),
                 leaving: dict[int, int] | None = None) -> None:
        """`leaving`: node -> the number of train rounds after which it disconnects for good."""
        super().__init__(client_app, node_configs, run_config, record=True)
        self.crash_after_train_rounds = crash_after_train_rounds
        self.failing_nodes = failing_nodes
        self.leaving = leaving or {}
        self.train_rounds = 0
        self.completed_train_rounds = 0
        self.train_replies: list[Message] = []  # every reply to a train message, as the coordinator got it

    def get_node_ids(self) -> list[int]:
        return [node for node in super().get_node_ids()
                if node not in self.leaving or self.completed_train_rounds < self.leaving[node]]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            if self.train_rounds == self.crash_after_train_rounds:
                raise CoordinatorCrash(f"coordinator stopped before train round {self.train_rounds + 1}")
            self.train_rounds += 1
        replies = super().send_and_receive(messages, timeout=timeout)
        if messages and messages[0].metadata.message_type == "train":
            self.completed_train_rounds += 1
            self.train_replies += replies
        return replies

    def before_delivery(self, node: int) -> None:
        if node in self.failing_nodes or node not in self.get_node_ids():
            raise RuntimeError(f"node {node} is down")
