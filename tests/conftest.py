"""Shared test helpers: Flower message construction outside a running Flower app."""

from __future__ import annotations

import os

# Flower reads this when first imported.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True, scope="session")
def task_identity():
    """Messages need a task identity, which a running ServerApp would set."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


def arrays_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord holding copies of ``arrays``."""
    return ArrayRecord({name: Array(np.array(value)) for name, value in arrays.items()})


def reply(
    node_id: int,
    arrays: dict[str, np.ndarray] | None,
    metrics: dict | None,
    *,
    message_type: str = MessageType.TRAIN,
) -> Message:
    """A reply from ``node_id`` carrying ``arrays`` and ``metrics`` (either may be None)."""
    request = Message(content=RecordDict(), message_type=message_type, dst_node_id=node_id)
    content = {}
    if arrays is not None:
        content["arrays"] = arrays_record(arrays)
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    return Message(content=RecordDict(content), reply_to=request)


def error_reply(node_id: int, *, code: int = 101, reason: str = "boom") -> Message:
    """An error reply from ``node_id``."""
    request = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node_id)
    return Message(error=Error(code=code, reason=reason), reply_to=request)


class FakeGrid:
    """The part of Flower's Grid that strategies use for sampling nodes."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)
