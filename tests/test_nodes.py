"""The coordinator never waits for SuperNodes without a deadline, and FedAvg's sampling never
waits at all once the coordinator has counted the nodes."""

import logging

import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from coordinator.nodes import NodeSnapshot, NodeWaiter, NotEnoughNodes
from coordinator.strategy import SampledFedAvg

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


class FakeGrid:
    """A grid whose nodes connect at given (fake) times."""

    def __init__(self, clock, connect_times):
        self.clock = clock
        self.connect_times = connect_times

    def get_node_ids(self):
        return [node for node, at in self.connect_times.items() if at <= self.clock.now]

    def create_message(self, *args, **kwargs):  # what FedAvg builds its messages with
        raise AssertionError("not used")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        assert seconds > 0
        self.now += seconds


def _waiter(connect_times, timeout=30.0):
    clock = FakeClock()
    return NodeWaiter(FakeGrid(clock, connect_times), timeout, clock=clock, sleep=clock.sleep), clock


def test_the_first_round_waits_for_late_nodes_until_they_connect():
    waiter, clock = _waiter({1: 0.0, 2: 0.0, 3: 12.0})
    assert waiter.nodes(wanted=3, needed=1) == [1, 2, 3]
    assert 12.0 <= clock.now < 13.0


def test_too_many_wanted_goes_on_with_those_connected_at_the_deadline(caplog):
    waiter, clock = _waiter({1: 0.0, 2: 0.0})
    with caplog.at_level(logging.INFO, logger="flwr.nextquill"):
        assert waiter.nodes(wanted=5, needed=1) == [1, 2]
    assert clock.now == pytest.approx(30.0)
    assert "2 SuperNode(s) connected, fewer than the 5 wanted: going on with them" in caplog.text
    # Once the run has settled, a round does not wait for the full number again.
    assert waiter.nodes(wanted=5, needed=1) == [1, 2] and clock.now == pytest.approx(30.0)


def test_fewer_than_needed_end_the_wait_with_a_message_after_the_deadline():
    waiter, clock = _waiter({1: 0.0})
    with pytest.raises(NotEnoughNodes,
                       match=r"1 SuperNode\(s\) connected after waiting 30 s \(federation.connect-timeout\), "
                                             r"fewer than the 2 a round needs \(federation.min-replies\)"):
        waiter.nodes(wanted=3, needed=2)
    assert clock.now == pytest.approx(30.0)


def test_after_settling_a_round_waits_again_only_for_the_minimum():
    waiter, clock = _waiter({1: 0.0, 2: 0.0, 3: 70.0})
    assert waiter.nodes(wanted=3, needed=1) == [1, 2]  # the run settles at 30 s
    waiter.grid.connect_times[1] = waiter.grid.connect_times[2] = 10**9  # both went away
    with pytest.raises(NotEnoughNodes):
        waiter.nodes(wanted=3, needed=1)  # waits 30 s more; node 3 connects at 70 s, after this deadline
    assert clock.now == pytest.approx(60.0)
    assert waiter.nodes(wanted=3, needed=1) == [3]
    assert 70.0 <= clock.now < 71.0


def test_fedavg_samples_what_is_connected_without_waiting():
    clock = FakeClock()
    grid = FakeGrid(clock, {1: 0.0, 2: 0.0})
    strategy = SampledFedAvg(clients_per_round=5, evaluate_clients=4)
    train = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), NodeSnapshot(grid, [1, 2])))
    evaluate = list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), NodeSnapshot(grid, [1, 2])))
    assert sorted(m.metadata.dst_node_id for m in train) == [1, 2]
    assert sorted(m.metadata.dst_node_id for m in evaluate) == [1, 2]
    everyone = SampledFedAvg(clients_per_round=5)  # evaluate-clients 0: every connected node
    assert len(list(everyone.configure_evaluate(1, ArrayRecord(), ConfigRecord(), NodeSnapshot(grid, [1, 2])))) == 2
    few = list(SampledFedAvg(clients_per_round=1).configure_train(1, ArrayRecord(), ConfigRecord(),
                                                                  NodeSnapshot(grid, [1, 2])))
    assert len(few) == 1
