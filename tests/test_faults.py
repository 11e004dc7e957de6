"""Faults: a SuperNode that dies mid-run.

Flower 1.42 does not notice a killed SuperNode at once: the SuperLink keeps it
online until 2 x 30 s after its last heartbeat (sent every 17.5-22.5 s), so
37.5-60 s after the kill, plus up to 3 s of the grid's polling. The round in
flight then ends with a "node unavailable" error reply standing in for the
dead node's, and later rounds no longer see the node. ``round_timeout=120``
keeps that order of events: a timeout under ~65 s would end the round first,
and the next round could still sample the dead node.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, FakeGrid, arrays_record, error_reply, reply, stop_and_assert_gone
from flwr.app import ConfigRecord
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from fedpriv import federation

from strategies import DPFedAvg, WeightedFedAvg

GLOBAL = {"w": np.zeros((3, 2), dtype=np.float32)}
NODES = (10, 11, 12)


def train_round(strategy, server_round, nodes, answering):
    """Sample from ``nodes``; replies from ``answering`` (node ids, or an error message)."""
    sent = list(strategy.configure_train(server_round, arrays_record(GLOBAL), ConfigRecord(), FakeGrid(nodes)))
    replies = [
        node if not isinstance(node, int) else reply(node, GLOBAL, {"num-examples": 5, "train_loss": 1.0})
        for node in answering
    ]
    _, metrics = strategy.aggregate_train(server_round, replies)
    return sent, metrics


def node_unavailable():
    """What Flower's SuperLink returns for a message whose node missed its heartbeats."""
    return error_reply(SUPERLINK_NODE_ID, code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable")


def test_min_available_nodes_only_gates_the_start_then_rounds_go_on_with_fewer(caplog):
    # Prepare
    strategy = WeightedFedAvg(min_available_nodes=3, node_wait_seconds=0)
    with pytest.raises(RuntimeError, match="only 2 nodes connected"):
        train_round(strategy, 1, NODES[:2], [])
    _, first = train_round(strategy, 1, NODES, NODES)

    # Execute: node 12 died in round 2 (Flower's stand-in error), is gone in round 3
    with caplog.at_level(logging.WARNING, logger="flwr"):
        _, in_flight = train_round(strategy, 2, NODES, [10, node_unavailable(), 11])
        sent, after = train_round(strategy, 3, NODES[:2], NODES[:2])

    # Assert
    counts = ("num_clients", "num_rejected", "num_available", "num_lost_nodes", "num_sampled", "num_unreachable")
    assert [first[k] for k in counts] == [3, 0, 3, 0, 3, 0]
    assert [in_flight[k] for k in counts] == [2, 0, 3, 0, 3, 1]
    assert [after[k] for k in counts] == [2, 0, 2, 1, 2, 0]
    assert sorted(m.metadata.dst_node_id for m in sent) == [10, 11]
    assert strategy.train_metrics[3]["num_lost_nodes"] == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("unreachable (12)" in m and "1 by Flower's node-unavailable" in m for m in messages), messages
    assert any("1 node(s) lost since the last round (12)" in m for m in messages), messages


def test_a_reply_missing_at_round_timeout_counts_as_unreachable():
    strategy = WeightedFedAvg()
    _, metrics = train_round(strategy, 1, NODES, [10, 11])  # 12 never answered
    assert (metrics["num_clients"], metrics["num_rejected"], metrics["num_unreachable"]) == (2, 0, 1)


def test_no_node_left_fails_after_node_wait_seconds():
    strategy = WeightedFedAvg(min_available_nodes=2, node_wait_seconds=0)
    train_round(strategy, 1, NODES, NODES)
    with pytest.raises(RuntimeError, match="no node connected for 0s: all 3 nodes of this run are gone"):
        train_round(strategy, 2, [], [])


def test_dp_fedavg_samples_from_the_nodes_left():
    strategy = DPFedAvg(
        num_clients=3, sample_rate=1.0, noise_multiplier=0.0, clipping_norm=1.0, min_available_nodes=3,
        sampling_seed=0, noise_seed=0, target_delta=1e-3,
    )
    train_round(strategy, 1, NODES, NODES)
    sent, metrics = train_round(strategy, 2, NODES[1:], NODES[1:])
    assert sorted(m.metadata.dst_node_id for m in sent) == [11, 12]
    assert (metrics["num_available"], metrics["num_lost_nodes"], metrics["num_clients"]) == (2, 1, 2)


# --------------------------------------------------------------------------- end to end


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and every descendant; the tree is frozen first so none can fork meanwhile."""
    tree = [pid]
    while True:
        for member in tree:
            try:
                os.kill(member, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        new = [child for child in federation._descendants(tree) if child not in tree]
        if not new:
            break
        tree += new
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


def rounds_recorded(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


def run_and_kill_supernode(
    tmp_path: Path, fed, *, overrides: list[str], kill_when: Callable[[], bool], what: str, victim: int = 2
) -> tuple[subprocess.Popen, list[int], str]:
    """Run ``scripts/run.py`` on ``fed``; once ``kill_when()`` holds, kill SuperNode ``victim`` and its tree.

    Returns the finished run, the killed PIDs and the run's output.
    """
    with open(tmp_path / "run.log", "wb") as log:
        run = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "run.py"), *fed.mode_overrides(), *overrides],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
        )
    try:
        deadline = time.monotonic() + 300
        while not kill_when():
            assert run.poll() is None and time.monotonic() < deadline, f"{what} never came"
            time.sleep(0.1)
        victim_tree = kill_tree(fed.supernode_pids[victim])
        federation._reap(fed.supernode_pids[victim])
        run.wait(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    return run, victim_tree, (tmp_path / "run.log").read_text(errors="replace")


@pytest.mark.slow
def test_a_supernode_killed_mid_run_the_run_completes_with_the_other_two(tmp_path):
    # Prepare
    directory = tmp_path / "federation"
    fed = federation.start_federation(directory, 3)
    started = fed.pids
    out = tmp_path / "run"
    try:
        # Execute: kill SuperNode 2 (and its SuperExec / ClientApp) once round 1 is recorded
        run, victim_tree, output = run_and_kill_supernode(
            tmp_path,
            fed,
            overrides=[f"output_dir={out}", "num_clients=3", "num_rounds=3", "client.local_epochs=1", "round_timeout=120"],
            kill_when=lambda: len(rounds_recorded(out / "results.json")) >= 1,
            what="round 1",
        )

        # Assert: completed, 3 clients before, 2 after, the loss recorded
        assert run.returncode == 0, output[-4000:]
        document = json.loads((out / "results.json").read_text())
        rows = document["rounds"]
        assert document["final"]["stopped_reason"] == "completed"
        assert [row["round"] for row in rows] == [1, 2, 3]
        counts = ("num_clients", "num_rejected", "num_available", "num_lost_nodes", "num_unreachable")
        table = [[row[k] for k in counts] for row in rows]
        assert table[0] == [3, 0, 3, 0, 0], table
        # round 2 was in flight: sent to 3, the dead node's reply replaced by Flower's error
        assert table[1] == [2, 0, 3, 0, 1], table
        assert table[2] == [2, 0, 2, 1, 0], table
        with open(out / "metrics.csv", newline="") as handle:
            assert [row["num_lost_nodes"] for row in csv.DictReader(handle)] == ["0", "0", "1"]
        assert "1 node(s) lost since the last round" in output
        assert "by Flower's node-unavailable error" in output
        assert not any(federation.is_running(pid) for pid in victim_tree)
    finally:
        stop_and_assert_gone(directory, started)


@pytest.mark.slow
def test_a_supernode_killed_mid_secagg_round_over_tls_the_sum_of_the_other_two_is_used(tmp_path):
    # Prepare: 3 SuperNodes over TLS, SecAgg+ with threshold 2 and short stage timeouts.
    directory = tmp_path / "federation"
    fed = federation.start_federation(directory, 3, tls=True)
    started = fed.pids
    out = tmp_path / "run"
    try:
        # Execute: kill SuperNode 2 once the round has its keys and starts sharing them
        run, victim_tree, output = run_and_kill_supernode(
            tmp_path,
            fed,
            overrides=[f"output_dir={out}", "num_clients=3", "num_rounds=1", "client.local_epochs=1", "round_timeout=120",
                       "secure=secagg", "secure.reconstruction_threshold=2", "secure.timeout=20"],
            kill_when=lambda: "round 1: SecAgg+ share-keys" in (tmp_path / "run.log").read_text(errors="replace"),
            what="the round's key sharing",
        )

        # Assert: the round released the sum of the two survivors only
        assert run.returncode == 0, output[-4000:]
        document = json.loads((out / "results.json").read_text())
        rows = document["rounds"]
        assert document["final"]["stopped_reason"] == "completed"
        assert document["privacy"]["secure_aggregation"] == "secagg"
        assert [(row["num_clients"], row["secagg_dropped"], row["secagg_refused"]) for row in rows] == [(2, 1, 0)]
        assert rows[0]["test_accuracy"] > 0.5
        assert not any(federation.is_running(pid) for pid in victim_tree)
    finally:
        stop_and_assert_gone(directory, started)
