"""Which nodes are connected: waiting for them, and noticing the ones that leave."""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.serverapp import Grid

from fedpriv.logs import get_logger

logger = get_logger(__name__)

NODE_POLL_SECONDS = 0.1
"""Seconds between two looks at the connected nodes while waiting for them.

Short, so that a simulation whose engine is still registering its nodes
(about 1 s for 10,000) starts its first round when the last one is in.
"""
LOG_EVERY_POLLS = 10
"""While waiting, log the count once every this many looks (once a second)."""


class NodeTracker:
    """Follows the connected nodes of one run for a strategy.

    ``min_available_nodes`` is a start condition only: the first look waits
    (at most ``wait_seconds``) until that many nodes are connected. Later looks
    wait only while none is connected, and log a WARNING naming the nodes that
    have gone since the last look.

    Parameters
    ----------
    min_available_nodes : int
        Nodes that must be connected before the first round.
    wait_seconds : float
        How long one look waits before failing.
    sleep : Callable[[float], None]
        How to wait between polls (tests pass a fake).
    """

    def __init__(
        self, *, min_available_nodes: int, wait_seconds: float, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.min_available_nodes = min_available_nodes
        self.wait_seconds = wait_seconds
        self._sleep = sleep
        self.known: set[int] = set()  # every node seen connected in this run
        self._started = False  # min_available_nodes was reached once
        self._last: set[int] = set()  # connected at the last look
        self.counts: dict[str, int] = {}  # num_available / num_lost_nodes at the last look

    def connected(self, grid: Grid, *, server_round: int) -> list[int]:
        """The nodes connected now (sorted), waiting while there are too few.

        Records ``counts`` (``num_available``, ``num_lost_nodes``).

        Raises
        ------
        RuntimeError
            When too few nodes are connected for ``wait_seconds``.
        """
        needed = min(self.min_available_nodes, 1) if self._started else self.min_available_nodes
        deadline = time.monotonic() + self.wait_seconds
        looks = 0
        while len(nodes := sorted(grid.get_node_ids())) < needed:
            if time.monotonic() > deadline:
                if self._started:
                    raise RuntimeError(
                        f"no node connected for {self.wait_seconds:.0f}s: all "
                        f"{len(self.known)} nodes of this run are gone (strategy.node_wait_seconds)"
                    )
                raise RuntimeError(
                    f"only {len(nodes)} nodes connected after {self.wait_seconds:.0f}s; "
                    f"strategy.min_available_nodes={self.min_available_nodes}"
                )
            if looks % LOG_EVERY_POLLS == 0:
                logger.info("waiting for nodes: %d of %d connected", len(nodes), needed)
            looks += 1
            self._sleep(NODE_POLL_SECONDS)
        self._started = True
        self._observe(set(nodes), server_round=server_round)
        return nodes

    def _observe(self, connected: set[int], *, server_round: int) -> None:
        lost = sorted(self._last - connected)
        if lost:
            logger.warning(
                "round %d: %d node(s) lost since the last round (%s); going on with the %d connected",
                server_round,
                len(lost),
                ", ".join(map(str, lost)),
                len(connected),
            )
        joined = connected - self.known
        if joined and self.known:
            logger.info("round %d: %d node(s) joined: %s", server_round, len(joined), ", ".join(map(str, sorted(joined))))
        self.known.update(connected)
        self._last = connected
        self.counts = {"num_available": len(connected), "num_lost_nodes": len(self.known - connected)}
