"""PollingGrid: Flower's send-and-receive loop at a short poll interval, on a fake grid."""

from __future__ import annotations

import pytest

from strategies.polling import IN_MEMORY_POLL_SECONDS, REPLY_POLL_SECONDS, PollingGrid, poll_interval


class _Reply:
    def __init__(self, message_id: str) -> None:
        self.metadata = type("Metadata", (), {"reply_to_message_id": message_id})()


class _FakeGrid:
    """Replies to message ``i`` on the ``arrivals[i]``-th pull (never if absent)."""

    def __init__(self, arrivals: dict[str, int]) -> None:
        self.arrivals = arrivals
        self.pulls = 0
        self.pushed: list[str] = []

    def push_messages(self, messages):
        self.pushed = list(messages)
        return list(self.pushed)

    def pull_messages(self, message_ids):
        self.pulls += 1
        return [_Reply(i) for i in sorted(message_ids) if self.arrivals.get(i) == self.pulls]

    def get_node_ids(self):
        return [1, 2]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_waits_for_every_reply_polling_at_the_interval():
    # Prepare
    fake, clock = _FakeGrid({"a": 1, "b": 4}), _Clock()
    grid = PollingGrid(fake, interval=0.1, clock=clock, sleep=clock.sleep)

    # Execute
    replies = grid.send_and_receive(["a", "b"], timeout=None)

    # Assert
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert fake.pulls == 4 and clock.sleeps == [0.1, 0.1, 0.1]


def test_stops_at_the_timeout_with_the_replies_it_has():
    # Prepare
    fake, clock = _FakeGrid({"a": 2}), _Clock()
    grid = PollingGrid(fake, interval=0.5, clock=clock, sleep=clock.sleep)

    # Execute
    replies = grid.send_and_receive(["a", "lost"], timeout=2.0)

    # Assert
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert clock.now == pytest.approx(2.0) and fake.pulls == 5


def test_no_messages_means_no_pull_and_the_rest_is_the_wrapped_grid():
    # Prepare
    fake = _FakeGrid({})
    grid = PollingGrid(fake)

    # Execute
    replies = grid.send_and_receive([], timeout=10.0)

    # Assert
    assert replies == [] and fake.pulls == 0
    assert grid.get_node_ids() == [1, 2]


def test_a_non_positive_interval_is_refused():
    with pytest.raises(ValueError, match="interval=0"):
        PollingGrid(_FakeGrid({}), interval=0)


def test_the_simulations_in_memory_grid_is_polled_more_often_than_a_deployments():
    # Prepare: the grid Flower's simulation engine gives the ServerApp, and another
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.grid import InMemoryGrid

    in_memory = InMemoryGrid(
        state_factory=LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    )

    # Execute
    intervals = (poll_interval(in_memory), poll_interval(_FakeGrid({})))

    # Assert
    assert intervals == (IN_MEMORY_POLL_SECONDS, REPLY_POLL_SECONDS) == (0.01, 0.1)
