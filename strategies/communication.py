"""Bytes on the wire: the serialized size of the messages a round sends and receives."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Message
from flwr.common.serde import message_to_proto


def message_bytes(messages: Iterable[Message]) -> int:
    """Total size of ``messages`` as Flower serializes them (protobuf), in bytes.

    A message Flower cannot serialize (a hostile reply in a simulation, where
    nothing is serialized: a declared shape beyond protobuf's integers, say)
    counts the bytes of its arrays: counting never fails a round.
    """
    return sum(_size(msg) for msg in messages)


def _size(msg: Message) -> int:
    try:
        return message_to_proto(msg).ByteSize()
    except (ValueError, TypeError, OverflowError):
        if msg.has_error():
            return 0
        return sum(len(array.data) for record in msg.content.array_records.values() for array in record.values())


class TrafficTally:
    """The bytes each round sent to clients (down) and received from them (up), and the run's totals.

    A resume carries the totals over (:meth:`state`, :meth:`restore`).
    """

    def __init__(self) -> None:
        self.down = 0
        self.up = 0
        self._down: dict[int, int] = {}
        self._up: dict[int, int] = {}

    def sent(self, server_round: int, messages: Iterable[Message]) -> None:
        """Count messages sent in round ``server_round`` (a round may send several times)."""
        size = message_bytes(messages)
        self._down[server_round] = self._down.get(server_round, 0) + size
        self.down += size

    def arrived(self, server_round: int, replies: Iterable[Message]) -> None:
        """Count replies received in round ``server_round`` before its last ones."""
        size = message_bytes(replies)
        self._up[server_round] = self._up.get(server_round, 0) + size
        self.up += size

    def received(self, server_round: int, replies: Iterable[Message]) -> dict[str, int]:
        """Count round ``server_round``'s last replies; return its ``bytes_down`` and ``bytes_up``."""
        self.arrived(server_round, replies)
        return {"bytes_down": self._down.pop(server_round, 0), "bytes_up": self._up.pop(server_round, 0)}

    def summary(self) -> dict[str, int]:
        """``bytes_down_total`` and ``bytes_up_total`` of the whole run."""
        return {"bytes_down_total": self.down, "bytes_up_total": self.up}

    def state(self) -> dict[str, int]:
        """What a checkpoint keeps."""
        return self.summary()

    def restore(self, state: Mapping[str, Any]) -> None:
        """Go on from :meth:`state` of an earlier run."""
        self.down = int(state.get("bytes_down_total") or 0)
        self.up = int(state.get("bytes_up_total") or 0)
