"""An in-process Flower `Grid` for tests of the coordinator's phases: it hands each message
(a copy) to the real ClientApp with the node's own Context, and turns an exception into an
error reply, as a SuperNode does. The real network path (SuperLink, SuperNodes, Fleet API)
is tested in test_deployment.py; this one lets a test crash the coordinator mid-run."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Metadata
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

# Messages carry the run they belong to; a ServerApp's runtime sets this identity.
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


class CoordinatorCrash(RuntimeError):
    """Raised by the grid to stop the coordinator at a chosen point, as a crash would."""


class LoopbackGrid(Grid):
    def __init__(self, client_app: ClientApp, node_configs: list[dict[str, Any]], run_config: dict[str, Any],
                 crash_after_train_rounds: int | None = None, failing_nodes: frozenset[int] = frozenset()) -> None:
        self.client_app = client_app
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i, node_config=node_config, state=RecordDict(),
                              run_config=run_config)
            for i, node_config in enumerate(node_configs)
        }
        self.crash_after_train_rounds = crash_after_train_rounds
        self.failing_nodes = failing_nodes
        self.train_rounds = 0
        self.delivered: list[Message] = []  # every message the coordinator sent

    def set_run(self, run_id: int) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError("the loopback grid serves one implicit run")

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            if self.train_rounds == self.crash_after_train_rounds:
                raise CoordinatorCrash(f"coordinator stopped before train round {self.train_rounds + 1}")
            self.train_rounds += 1
        return [self._deliver(message) for message in messages]

    def _deliver(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        self.delivered.append(message)
        received = Message(
            metadata=Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=1, dst_node_id=node,
                              reply_to_message_id="", group_id="", created_at=0.0, ttl=3600.0,
                              message_type=message.metadata.message_type),
            content=copy.deepcopy(message.content),
        )
        try:
            if node in self.failing_nodes:
                raise RuntimeError(f"node {node} is down")
            return self.client_app(received, self.contexts[node])
        except Exception as error:  # a SuperNode reports a ClientApp exception as an error reply
            return Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=received)
