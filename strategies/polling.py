"""A Grid that waits for replies in short polls.

Flower 1.42's deployment grid (``HttpGrid``) sleeps a fixed 3 s between two
pulls for replies, so every exchange with the SuperNodes ends on a 3-s step
after the last reply arrived; the simulation's in-memory grid polls every
0.1 s. :class:`PollingGrid` runs the loop both of them run (push the messages,
then pull replies until all have come or ``timeout`` has passed) over the
grid's public ``push_messages`` and ``pull_messages``, at the in-memory grid's
interval, or at 0.01 s on the in-memory grid itself (:func:`poll_interval`).
Flower itself is not changed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

REPLY_POLL_SECONDS = 0.1
"""Seconds between two pulls for replies (Flower's in-memory grid waits as long)."""

IN_MEMORY_POLL_SECONDS = 0.01
"""The same in a simulation, where a pull reads the link state in this process."""


def poll_interval(grid: Grid) -> float:
    """Seconds between two pulls for replies on ``grid``.

    A pull on a deployment's grid is a request to the SuperLink, so it waits
    :data:`REPLY_POLL_SECONDS`; on the simulation's in-memory grid it is a
    lookup of the messages in flight, cheap enough for
    :data:`IN_MEMORY_POLL_SECONDS` (a round then ends within 10 ms of its last
    reply rather than within 100 ms: 1 s over 20 one-second rounds).
    """
    from flwr.superlink.grid import InMemoryGrid

    return IN_MEMORY_POLL_SECONDS if isinstance(grid, InMemoryGrid) else REPLY_POLL_SECONDS


class PollingGrid(Grid):
    """``grid`` whose :meth:`send_and_receive` polls every ``interval`` seconds.

    Everything else is ``grid``'s own.

    Parameters
    ----------
    grid : Grid
        The grid Flower gave the ServerApp.
    interval : float
        Seconds between two pulls for replies.
    clock, sleep : Callable
        Time source and how to wait (tests pass fakes).
    """

    def __init__(
        self,
        grid: Grid,
        *,
        interval: float = REPLY_POLL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval={interval!r}: must be > 0 seconds")
        self._grid = grid
        self.interval = float(interval)
        self._clock = clock
        self._sleep = sleep

    @property
    def run(self):
        """The run of the wrapped grid."""
        return self._grid.run

    def set_run(self, run) -> None:
        """Set the run of the wrapped grid."""
        self._grid.set_run(run)

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """Create a message with the wrapped grid."""
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes, per the wrapped grid."""
        return self._grid.get_node_ids()

    def get_nodes(self):
        """The connected nodes' records, per the wrapped grid."""
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push ``messages`` with the wrapped grid; returns their ids."""
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull the replies to ``message_ids`` that have arrived."""
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages`` and pull their replies until all are in or ``timeout`` seconds have passed.

        ``timeout=None`` waits for every reply, as Flower's grids do.
        """
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else self._clock() + timeout
        replies: list[Message] = []
        while pending:
            arrived = list(self._grid.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(msg.metadata.reply_to_message_id for msg in arrived)
            if not pending or (deadline is not None and self._clock() >= deadline):
                break
            self._sleep(self.interval)
        return replies
