"""The coordinator averages only well-formed shared parameters and excludes the rest; Flower's DP
wrapper composes with it."""

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.supercore.task_identity import TaskIdentity

from coordinator.strategy import SampledFedAvg, ScreenedReplies

# Messages carry the run they belong to; a ServerApp's runtime sets this identity.
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _arrays(value, shape=(2, 2), dtype=np.float32):
    return ArrayRecord({"lora_A": Array(np.full(shape, value, dtype))})


def _reply(node, arrays, metrics):
    instruction = Message(content=RecordDict({"arrays": _arrays(0.0)}), message_type=MessageType.TRAIN,
                          dst_node_id=node)
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    reply = Message(content, reply_to=instruction)
    return reply


def test_fedavg_of_valid_replies_is_weighted_by_examples_and_bad_replies_are_excluded():
    strategy = ScreenedReplies(SampledFedAvg(clients_per_round=5))
    strategy.sent = _arrays(0.0)
    replies = [
        _reply(1, _arrays(1.0), {"num-examples": 1, "train-loss": 2.0}),
        _reply(2, _arrays(4.0), {"num-examples": 3, "train-loss": 1.0}),
        _reply(3, _arrays(np.nan), {"num-examples": 100, "train-loss": 1.0}),
        _reply(4, _arrays(9.0, shape=(3,)), {"num-examples": 100, "train-loss": 1.0}),
        _reply(5, _arrays(9.0), {"num-examples": 100, "history-text-length": 12.0}),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["lora_A"].numpy(), np.full((2, 2), (1 * 1 + 4 * 3) / 4))
    assert metrics["train-loss"] == (2.0 * 1 + 1.0 * 3) / 4
    assert sorted(node for _, node, _ in strategy.rejected) == [3, 4, 5]
    assert "not allowed to leave a device" in strategy.rejected[-1][2]


def test_too_few_valid_replies_aggregate_nothing():
    strategy = ScreenedReplies(SampledFedAvg(clients_per_round=3), min_replies=2)
    strategy.sent = _arrays(0.0)
    replies = [_reply(1, _arrays(1.0), {"num-examples": 1}), _reply(2, _arrays(np.inf), {"num-examples": 1})]
    assert strategy.aggregate_train(1, replies) == (None, None)


def test_flowers_dp_wrapper_composes_inside_the_screening():
    # Accounted DP requires the wrapped FedAvg's own aggregation: ours leaves it untouched.
    assert SampledFedAvg.aggregate_train is FedAvg.aggregate_train
    dp = DifferentialPrivacyServerSideFixedClipping(SampledFedAvg(clients_per_round=2), noise_multiplier=0.0,
                                                    clipping_norm=1.0, num_sampled_clients=2)
    strategy = ScreenedReplies(dp)
    strategy.sent = dp.current_arrays = _arrays(0.0)
    replies = [_reply(1, _arrays(3.0), {"num-examples": 1}), _reply(2, _arrays(3.0), {"num-examples": 1}),
               _reply(3, _arrays(np.nan), {"num-examples": 1})]
    arrays, _ = strategy.aggregate_train(1, replies)
    # The update (norm 6 over four entries of 3) is clipped to norm 1: every entry becomes 0.5.
    np.testing.assert_allclose(arrays["lora_A"].numpy(), np.full((2, 2), 0.5), rtol=1e-6)
    assert [node for _, node, _ in strategy.rejected] == [3]


def test_poisoned_or_broken_replies_are_each_excluded_and_logged(caplog):
    strategy = ScreenedReplies(SampledFedAvg(clients_per_round=8), max_update_norm=10.0)
    strategy.sent = _arrays(0.0)
    personal = ArrayRecord({"lora_A": Array(np.ones((2, 2), np.float32)),
                            "base_model.model.layers.0.q_proj.lora_B.personal.weight": Array(np.ones(2, np.float32))})
    poisoned = {
        2: (_arrays(np.nan), "holds a non-finite value"),
        3: (_arrays(1.0, shape=(4,)), "has shape (4,), expected (2, 2)"),
        4: (_arrays(1.0, dtype=np.float64), "has dtype float64, expected float32"),
        5: (ArrayRecord({"lora_A": Array(np.ones((2, 2), np.float32)), "extra": Array(np.ones(1, np.float32))}),
            "1 keys that are not shared parameters, e.g. 'extra'"),
        6: (personal, "not shared parameters, e.g. 'base_model.model.layers.0.q_proj.lora_B.personal.weight'"),
        7: (_arrays(1e6), "update norm 2e+06 exceeds federation.max-update-norm 10"),
    }
    replies = [_reply(1, _arrays(1.0), {"num-examples": 1})]
    replies += [_reply(node, arrays, {"num-examples": 1}) for node, (arrays, _) in poisoned.items()]
    with caplog.at_level("WARNING", logger="flwr.nextquill"):
        arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["lora_A"].numpy(), np.ones((2, 2)))  # the one honest reply
    reasons = {node: why for _, node, why in strategy.rejected}
    assert sorted(reasons) == sorted(poisoned)
    for node, (_, why) in poisoned.items():
        assert why in reasons[node]
        assert f"reply from node {node} excluded" in caplog.text
    assert strategy.update_norms == [2.0]
