"""Bytes on the wire: what a round's messages and replies weigh, serialized as Flower sends them."""

from __future__ import annotations

import numpy as np
from conftest import FakeGrid, arrays_record, error_reply, reply
from flwr.app import ConfigRecord
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_to_proto

from strategies import DPFedAvg, WeightedFedAvg

GLOBAL = {"w": np.zeros((50, 4), dtype=np.float32), "b": np.zeros(4, dtype=np.float32)}
DP = {"num_clients": 2, "sample_rate": 1.0, "noise_multiplier": 1.0, "clipping_norm": 1.0,
      "min_available_nodes": 1, "node_wait_seconds": 0}


def serialized(messages) -> int:
    return sum(len(message_to_proto(msg).SerializeToString()) for msg in messages)


def test_each_round_counts_the_bytes_of_what_was_sent_and_received_and_the_run_adds_them_up():
    # Prepare
    strategy = WeightedFedAvg(min_available_nodes=1, node_wait_seconds=0)
    rows, sent_all, replies_all = [], [], []

    # Execute: two rounds; the second has an error reply and Flower's stand-in for a lost node
    for server_round, extra in ((1, []), (2, [error_reply(12, reason="boom")])):
        sent = list(strategy.configure_train(server_round, arrays_record(GLOBAL), ConfigRecord(), FakeGrid([10, 11, 12])))
        replies = [reply(node, GLOBAL, {"num-examples": 5, "train_loss": 1.0}) for node in (10, 11)] + extra
        stand_in = error_reply(SUPERLINK_NODE_ID, code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable")
        _, metrics = strategy.aggregate_train(server_round, [*replies, stand_in] if extra else replies)
        rows.append(metrics)
        sent_all += sent
        replies_all += replies

    # Assert: the exact protobuf sizes; the SuperLink's stand-in crossed no client's link
    assert rows[0]["bytes_down"] == serialized(sent_all[:3]) > 3 * 50 * 4 * 4
    assert rows[0]["bytes_up"] == serialized(replies_all[:2])
    assert rows[1]["bytes_up"] == serialized(replies_all[2:])
    assert strategy.traffic.summary() == {
        "bytes_down_total": serialized(sent_all),
        "bytes_up_total": serialized(replies_all),
    }


def test_the_totals_go_on_after_a_resume():
    # Prepare
    first = DPFedAvg(**DP)
    sent = list(first.configure_train(1, arrays_record(GLOBAL), ConfigRecord(), FakeGrid([10, 11])))
    first.aggregate_train(1, [reply(msg.metadata.dst_node_id, GLOBAL, {"num-examples": 5}) for msg in sent])

    # Execute
    resumed = DPFedAvg(**DP)
    resumed.restore(first.resume_state(), completed_rounds=1)

    # Assert
    assert resumed.traffic.summary() == first.traffic.summary() != {"bytes_down_total": 0, "bytes_up_total": 0}
