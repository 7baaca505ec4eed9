"""The device's side of secure aggregation: Flower's own `secaggplus_mod` around every train
message when the run config's `secagg.enabled` is on (the coordinator's side and what it
protects: `coordinator/secure_aggregation.py`).

SecAgg+ speaks Flower's legacy FitIns / FitRes, so the training it wraps is handed our train
message (the shared parameters packed into one array, their layout in its config, whatever
`sharing.pack` says), and its reply goes back as a FitRes whose parameters are the shared
update followed by the train metrics as a vector (`shared.wire.metrics_to_vector`): the mod
masks both, so no metric of this device is readable on its own. The FitRes weight is 1: a
weight travels in clear, and a sample count is a per-user number. A failure replies like any
other, with a fixed category only.
"""

from __future__ import annotations

import functools

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, MessageType, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from client.failures import failure_reply
from shared.run_config import RunConfig
from shared.wire import PACKED, metrics_to_vector

FITINS_PARAMETERS = "fitins.parameters"  # Flower's names for the legacy records
FITINS_CONFIG = "fitins.config"


class TrainingFailed(Exception):
    """The wrapped training replied with an error: that error is the device's reply."""

    def __init__(self, error: Error) -> None:
        super().__init__(error.reason)
        self.error = error


def device_secure_aggregation(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: SecAgg+ around a train message when the run config asks for it."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    try:
        if not RunConfig.from_flower(context.run_config).secagg.enabled:
            return call_next(msg, context)
        return secaggplus_mod(msg, context, functools.partial(_train_as_fit, call_next=call_next))
    except TrainingFailed as failed:
        return Message(failed.error, reply_to=msg)
    except Exception as error:  # noqa: BLE001  (as in client.failures: nothing of it leaves the device)
        return failure_reply(msg, error)


def _train_as_fit(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the train handler on SecAgg+'s FitIns; reply with the FitRes it masks."""
    config = ConfigRecord(dict(msg.content.config_records[FITINS_CONFIG]))
    arrays = list(msg.content.array_records[FITINS_PARAMETERS].values())
    if len(arrays) != 1:
        raise ValueError(f"secure aggregation: {len(arrays)} arrays, expected the one packed array")
    shared = ArrayRecord({PACKED: Array(arrays[0].numpy())})
    reply = call_next(Message(metadata=msg.metadata, content=RecordDict({"arrays": shared, "config": config})),
                      context)
    if reply.has_error():
        raise TrainingFailed(reply.error)
    trained = next(iter(reply.content.array_records.values()))
    metrics = dict(next(iter(reply.content.metric_records.values())))
    update = [trained[PACKED].numpy(), metrics_to_vector(metrics)]
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), num_examples=1, metrics={})
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
