"""Tiny Flower apps for the process backend's tests (``tests/test_process_backend.py``).

The ClientApp does what each message's ``action`` asks: ``echo`` replies with
facts about the worker process that ran it (its environment's :data:`MARK_ENV` too), ``raise`` raises, ``exit`` ends the
process the way an out-of-memory kill would, ``log`` logs an INFO and a WARNING
line and echoes. The ServerApp sends one message
to every node once all ``nodes`` have registered (``raise`` to the node indices
listed in ``fail``), twice, and writes what came back to ``run_config["out"]``.
"""

from __future__ import annotations

import json
import os
import time

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedpriv.devices import ASSIGNED_GPUS_ENV
from fedpriv.logs import get_logger

MARK_ENV = "FEDPRIV_TEST_MARK"
"""An environment variable the tests set, which ``echo`` reports."""

logger = get_logger(__name__)
client = ClientApp()
server = ServerApp()
not_an_app = object()


@client.train()
def train(msg: Message, context: Context) -> Message:
    """Answer ``msg`` as its ``action`` says; count the messages this node has answered in its state."""
    action = msg.content["config"]["action"]
    if action == "raise":
        raise RuntimeError("asked to fail")
    if action == "exit":
        os._exit(3)
    if action == "log":
        logger.info("an info line from the client")
        logger.warning("a warning from the client")
    answered = int(context.state.config_records.get("seen", ConfigRecord({"count": 0}))["count"]) + 1
    context.state["seen"] = ConfigRecord({"count": answered})
    facts = ConfigRecord(
        {
            "pid": os.getpid(),
            "threads": torch.get_num_threads(),
            "gpus": os.environ.get(ASSIGNED_GPUS_ENV, ""),
            "mark": os.environ.get(MARK_ENV, ""),
            "answered": answered,
            "partition": int(context.node_config["partition-id"]),
        }
    )
    return Message(RecordDict({"facts": facts, "metrics": MetricRecord({"ok": 1})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Two rounds of one message per node; write every reply's facts or error to ``run_config['out']``."""
    failing = {int(node) for node in str(context.run_config.get("fail", "")).split(",") if node}
    # The engine registers the simulated nodes while the ServerApp starts.
    deadline = time.monotonic() + 60
    while len(grid.get_node_ids()) < int(context.run_config["nodes"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    nodes = sorted(grid.get_node_ids())
    rounds = []
    for _ in range(2):
        messages = [
            Message(
                RecordDict({"config": ConfigRecord({"action": "raise" if index in failing else "echo"})}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
            )
            for index, node in enumerate(nodes)
        ]
        replies = grid.send_and_receive(messages, timeout=120)
        rounds.append(
            [
                {"error": reply.error.reason} if reply.has_error() else dict(reply.content["facts"])
                for reply in sorted(replies, key=lambda reply: reply.metadata.src_node_id)
            ]
        )
    with open(str(context.run_config["out"]), "w") as file:
        json.dump({"server_pid": os.getpid(), "rounds": rounds}, file)
