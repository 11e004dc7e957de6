"""The plain objects a strategy owns: the node tracker and the client privacy tally."""

from __future__ import annotations

import pytest
from conftest import FakeGrid

from strategies.aggregation import MetricsReply
from strategies.nodes import NodeTracker
from strategies.client_privacy import ClientPrivacyTally


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
    assert (first, waits) == ([1, 2, 3], [0.1])
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
    tally = ClientPrivacyTally()
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
    no_local = {"epsilon_local_max": None, "delta_local": None, "epsilon_local_basic_max": None}
    assert tally.summary() == {"epsilon_record_max": 4.0, "delta_record": 1e-5, **no_local}
    assert tally.state() == tally.summary()


def test_local_dp_epsilons_are_tallied_apart_from_record_level_ones_and_survive_a_resume():
    # Prepare
    tally = ClientPrivacyTally()
    tally.restore({"epsilon_local_max": 1.5, "delta_local": 1e-5, "epsilon_local_basic_max": 2.0})
    local = {"epsilon_local": 2.9, "delta_local": 1e-5, "epsilon_local_basic": 3.0}

    # Execute
    metrics = tally.track(
        [
            MetricsReply(node_id=1, num_examples=1.0, metrics=local),
            MetricsReply(node_id=2, num_examples=1.0, metrics={**local, "epsilon_local": 0.9, "epsilon_local_basic": 1.0}),
        ]
    )

    # Assert: the floor counts for the maxima, not for this run's mean
    assert metrics == {"epsilon_local_max": 2.9, "epsilon_local_mean": 1.9, "epsilon_local_basic_max": 3.0}
    assert tally.summary() == {
        "epsilon_record_max": None, "delta_record": None,
        "epsilon_local_max": 2.9, "delta_local": 1e-5, "epsilon_local_basic_max": 3.0,
    }


def test_the_run_ends_for_lack_of_budget_only_when_every_known_node_declined():
    # Prepare
    tally = ClientPrivacyTally()

    # Execute
    tally.decline([1, 2])

    # Assert
    assert not tally.everyone_declined({1, 2, 3})
    assert tally.everyone_declined({1, 2})
    assert not tally.everyone_declined(set())
