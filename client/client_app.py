"""The Flower ClientApp: a thin skin over `client.federated`.

  train     a round of the expert phase or of personalization: shared parameters in,
            shared parameters and numeric metrics out (the personal part stays on disk)
  evaluate  the personalized model on the user's held-out samples: metrics only
  query     the expert's distribution: does this device hold it, and here it is

A handler that fails replies with a fixed code and category only (`client.failures`). With
differential privacy on, Flower's own client mods clip (and with local DP noise) the update
of every train reply (`client.privacy`); with secure aggregation on, Flower's SecAgg+ mod
masks it, outermost (`client.secure_aggregation`).
"""

from __future__ import annotations

from types import ModuleType

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.failures import replies_without_details
from client.privacy import device_privacy
from client.secure_aggregation import device_secure_aggregation
from shared.expert_package import holds_expert, unpack_expert
from shared.run_config import RunConfig
from shared.wire import (
    EXPERT_DELIVER,
    EXPERT_RECORD,
    EXPERT_STATUS,
    HAS_EXPERT,
    RoundInstruction,
    SharedLayout,
)

app = ClientApp(mods=[device_secure_aggregation, device_privacy])


def _federated() -> ModuleType:
    """The training side (torch, transformers, PEFT), imported by the handlers that train or
    evaluate: Flower starts a process per message, and a query or one of SecAgg+'s key
    stages (which the mod answers without calling `train`) then never pays for loading it."""
    from client import federated

    return federated


@app.train()
@replies_without_details
def train(msg: Message, context: Context) -> Message:
    config = RunConfig.from_flower(context.run_config)
    instruction = RoundInstruction.from_config(msg.content["config"])
    layout = SharedLayout.from_config(msg.content["config"])
    result = _federated().handle_train(instruction, layout.decode(msg.content["arrays"]), context.node_config, config)
    # In the layout and form received: Flower's DP mods pair the reply's arrays with those sent.
    arrays = layout.encode(result.shared, config.sharing.transport_dtype, layout.is_packed(msg.content["arrays"]))
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(result.metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@replies_without_details
def evaluate(msg: Message, context: Context) -> Message:
    config = RunConfig.from_flower(context.run_config)
    instruction = RoundInstruction.from_config(msg.content["config"])
    shared = SharedLayout.from_config(msg.content["config"]).decode(msg.content["arrays"])
    metrics = _federated().handle_evaluate(instruction, shared, context.node_config, config)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query()
@replies_without_details
def query(msg: Message, context: Context) -> Message:
    request = msg.content["config"]
    action = request["action"]
    if action == EXPERT_STATUS:
        has_expert = holds_expert(str(request["expert-digest"]))
    elif action == EXPERT_DELIVER:
        unpack_expert(dict(msg.content[EXPERT_RECORD]))
        has_expert = True
    else:
        raise ValueError(f"unknown query action {action!r}")
    return Message(content=RecordDict({"metrics": MetricRecord({HAS_EXPERT: int(has_expert)})}), reply_to=msg)
