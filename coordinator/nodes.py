"""Which SuperNodes a round goes to, with a deadline on every wait.

Flower's `FedAvg` waits, with no deadline, until `min_available_nodes` SuperNodes are
connected: a run config asking for more clients than there are devices, or a device that
dies mid-run, would stop the run forever. So the coordinator looks first:

  NodeWaiter     at the start of a run, waits up to `federation.connect-timeout` for `federation.clients-per-round`
                 SuperNodes, then goes on with those connected; later rounds go on with
                 whoever is connected, waiting (again at most `federation.connect-timeout`) only when
                 fewer than `federation.min-replies` are; still too few ends the run with a message
                 (a rerun resumes from the checkpoint).
  NodeSnapshot   the grid as a strategy sees it for one round: the nodes counted above and
                 no others, so that FedAvg's sampling finds what it wants and never waits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.serverapp import Grid

log = logging.getLogger("flwr.nextquill")

_LOG_EVERY = 10.0  # seconds between "waiting" lines


class NotEnoughNodes(RuntimeError):
    """Fewer SuperNodes are connected than a round needs, after waiting for them."""


class NodeWaiter:
    def __init__(self, grid: Grid, timeout: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, poll: float = 1.0) -> None:
        self.grid = grid
        self.timeout = timeout
        self.clock = clock
        self.sleep = sleep
        self.poll = poll
        self.settle_by = clock() + timeout  # until then, wait for the full number wanted

    def nodes(self, wanted: int, needed: int) -> list[int]:
        """The connected node ids: at least `needed` of them, and `wanted` where they connect before
        the run's settling deadline."""
        wanted = max(wanted, needed)
        if self.clock() < self.settle_by:
            nodes = self._wait(wanted, self.settle_by)
        else:
            nodes = self._wait(needed, self.clock() + self.timeout)
        if len(nodes) < needed:
            raise NotEnoughNodes(
                f"{len(nodes)} SuperNode(s) connected after waiting {self.timeout:.0f} s "
                f"(federation.connect-timeout), fewer than the {needed} a round needs (federation.min-replies); start "
                "more SuperNodes or lower federation.min-replies, then run the same command again to resume"
            )
        if len(nodes) < wanted:
            log.warning("%d SuperNode(s) connected, fewer than the %d wanted: going on with them", len(nodes), wanted)
        return nodes

    def _wait(self, count: int, deadline: float) -> list[int]:
        last_log = -_LOG_EVERY
        while True:
            nodes = sorted(self.grid.get_node_ids())
            now = self.clock()
            if len(nodes) >= count or now >= deadline:
                return nodes
            if now - last_log >= _LOG_EVERY:
                log.info("waiting for SuperNodes: %d connected, %d wanted (%.0f s left)", len(nodes), count,
                         deadline - now)
                last_log = now
            self.sleep(min(self.poll, deadline - now))


class NodeSnapshot:
    """`grid` with its node list fixed to `nodes` (everything else is the grid's own)."""

    def __init__(self, grid: Grid, nodes: Iterable[int]) -> None:
        self._grid = grid
        self._nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
