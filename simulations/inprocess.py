"""An in-process Flower `Grid`: the real ServerApp code drives the real ClientApp in the same
process, with real Flower messages (each delivered as a copy, with the node's own Context),
and a ClientApp exception comes back as an error reply, as a SuperNode sends it.

What it leaves out is the transport: no SuperLink, no SuperNodes, no Ray. It serves the
coordinator's tests (which crash the coordinator at chosen points) and the scale benchmark
on machines where Ray is not installed (a lent GPU machine, say); the network path itself is
tested with real processes in tests/test_deployment.py.
"""

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


class InProcessGrid(Grid):
    """Nodes 1000, 1001, ... with the given node configs; `record=True` keeps every message
    the coordinator sent in `delivered` (for tests; a long run would hold them all)."""

    def __init__(self, client_app: ClientApp, node_configs: list[dict[str, Any]], run_config: dict[str, Any],
                 record: bool = False) -> None:
        self.client_app = client_app
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i, node_config=node_config, state=RecordDict(),
                              run_config=run_config)
            for i, node_config in enumerate(node_configs)
        }
        self.record = record
        self.delivered: list[Message] = []

    def set_run(self, run_id: int) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError("the in-process grid serves one implicit run")

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
        return [self.deliver(message) for message in messages]

    def deliver(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        if self.record:
            self.delivered.append(message)
        received = Message(
            metadata=Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=1, dst_node_id=node,
                              reply_to_message_id="", group_id="", created_at=0.0, ttl=3600.0,
                              message_type=message.metadata.message_type),
            content=copy.deepcopy(message.content),
        )
        try:
            self.before_delivery(node)
            return self.client_app(received, self.contexts[node])
        except Exception as error:  # a SuperNode reports a ClientApp exception as an error reply
            return Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=received)

    def before_delivery(self, node: int) -> None:
        """A hook for tests: raise here to make `node` fail."""
