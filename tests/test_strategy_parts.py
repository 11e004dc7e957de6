"""The plain objects a strategy owns: the node tracker and the record-level privacy tally."""

from __future__ import annotations

import pytest
from conftest import FakeGrid

from strategies.aggregation import MetricsReply
from strategies.nodes import NodeTracker
from strategies.record_privacy import RecordPrivacyTally


def test_the_tracker_waits_for_the_start_condition_then_goes_on_with_who_is_left():
    # Prepare: two nodes at first, then a third joins; later one leaves
    grid = FakeGrid([1, 2])
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        grid.node_ids = [1, 2, 3]

    tracker = NodeTracker(min_available_nodes=3, wait_seconds=10.0, sleep=sleep)

    # Execute
    first = tracker.connected(grid, server_round=1)
    grid.node_ids = [1, 3]
    second = tracker.connected(grid, server_round=2)

    # Assert
    assert (first, waits) == ([1, 2, 3], [1.0])
    assert second == [1, 3]
    assert tracker.counts == {"num_available": 2, "num_lost_nodes": 1}


def test_the_tracker_fails_in_one_line_when_the_start_condition_is_never_met():
    # Prepare
    tracker = NodeTracker(min_available_nodes=5, wait_seconds=0.0, sleep=lambda _: None)

    # Execute / Assert
    with pytest.raises(RuntimeError, match="only 2 nodes connected after 0s; strategy.min_available_nodes=5"):
        tracker.connected(FakeGrid([1, 2]), server_round=1)


def test_the_tally_keeps_each_nodes_largest_epsilon_and_a_floor_across_a_resume():
    # Prepare
    tally = RecordPrivacyTally()
    tally.restore({"epsilon_record_max": 4.0, "delta_record": 1e-5})

    # Execute
    metrics = tally.track(
        [
            MetricsReply(node_id=1, num_examples=1.0, metrics={"epsilon": 2.0, "delta": 1e-5}),
            MetricsReply(node_id=2, num_examples=1.0, metrics={"epsilon": 3.0, "delta": 1e-5}),
            MetricsReply(node_id=1, num_examples=1.0, metrics={"epsilon": 1.0}),
        ]
    )

    # Assert
    assert metrics == {"epsilon_record_max": 4.0, "epsilon_record_mean": 2.5}
    assert tally.summary() == {"epsilon_record_max": 4.0, "delta_record": 1e-5}
    assert tally.state() == {"epsilon_record_max": 4.0, "delta_record": 1e-5}


def test_the_run_ends_for_lack_of_budget_only_when_every_known_node_declined():
    # Prepare
    tally = RecordPrivacyTally()

    # Execute
    tally.decline([1, 2])

    # Assert
    assert not tally.everyone_declined({1, 2, 3})
    assert tally.everyone_declined({1, 2})
    assert not tally.everyone_declined(set())
