"""The record-level privacy that clients report to the server, and their declines."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from strategies.aggregation import MetricsReply, TrainReply


class RecordPrivacyTally:
    """What private clients say they spent, and which of them declined.

    Clients that train with record-level DP report their cumulative
    ``epsilon`` and ``delta``; the tally keeps each node's largest and reports
    the maximum and the mean. Rejected and declined replies count too: their
    privacy was spent all the same. Node ids change between runs, so a resume
    carries over only the maximum (``floor``).
    """

    def __init__(self) -> None:
        self.epsilons: dict[int, float] = {}
        self.delta: float | None = None
        self.floor = 0.0
        self.declined: set[int] = set()

    def track(self, replies: Iterable[TrainReply | MetricsReply]) -> dict[str, float]:
        """Take the ``epsilon`` and ``delta`` of ``replies``; return the round's metrics."""
        for reply in replies:
            if "epsilon" in reply.metrics:
                self.epsilons[reply.node_id] = max(self.epsilons.get(reply.node_id, 0.0), reply.metrics["epsilon"])
            if "delta" in reply.metrics:
                self.delta = max(self.delta or 0.0, reply.metrics["delta"])
        if not self.epsilons:
            return {"epsilon_record_max": self.floor} if self.floor else {}
        spent = list(self.epsilons.values())
        return {"epsilon_record_max": max(self.floor, *spent), "epsilon_record_mean": sum(spent) / len(spent)}

    def decline(self, node_ids: Iterable[int]) -> None:
        """These nodes declined: they are not sampled again in this run."""
        self.declined.update(node_ids)

    def everyone_declined(self, nodes: set[int]) -> bool:
        """Whether every one of ``nodes`` (at least one) has declined."""
        return bool(nodes) and nodes <= self.declined

    def summary(self) -> dict[str, float | None]:
        """``epsilon_record_max`` (``None`` when no client reported one) and ``delta_record``."""
        spent = [self.floor, *self.epsilons.values()]
        return {"epsilon_record_max": max(spent) if any(spent) else None, "delta_record": self.delta}

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the maximum epsilon and the delta."""
        return {"epsilon_record_max": self.summary()["epsilon_record_max"], "delta_record": self.delta}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Go on from :meth:`state` of an earlier run."""
        self.floor = float(state.get("epsilon_record_max") or 0.0)
        self.delta = state.get("delta_record")
