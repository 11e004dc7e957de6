"""The privacy that clients report to the server (record-level and local DP), and their declines."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedpriv.protocol import LOCAL_BASIC_EPSILON_KEY, PRIVACY_REPLY_KEYS
from strategies.aggregation import MetricsReply, TrainReply


@dataclass(frozen=True)
class ReportedPrivacy:
    """One kind of client-side DP: the reply keys clients use and the names the run reports.

    Attributes
    ----------
    epsilon_key, delta_key : str
        Reply metrics holding a client's cumulative epsilon and its delta.
    basic_key : str or None
        Reply metric holding a pure-DP epsilon by basic composition, if the kind has one.
    name : str
        ``record`` or ``local``: the run reports ``epsilon_<name>_max``,
        ``epsilon_<name>_mean`` and ``delta_<name>``.
    """

    epsilon_key: str
    delta_key: str
    basic_key: str | None
    name: str


KINDS = tuple(
    ReportedPrivacy(
        epsilon_key=epsilon_key,
        delta_key=delta_key,
        basic_key=LOCAL_BASIC_EPSILON_KEY if name == "local" else None,
        name=name,
    )
    for name, (epsilon_key, delta_key) in PRIVACY_REPLY_KEYS.items()
)
REPLY_PRIVACY_KEYS = tuple(
    key for kind in KINDS for key in (kind.epsilon_key, kind.delta_key, kind.basic_key) if key is not None
)
"""Every reply metric through which a client reports privacy spent."""


@dataclass
class _Spent:
    epsilons: dict[int, float] = field(default_factory=dict)
    basic: dict[int, float] = field(default_factory=dict)
    delta: float | None = None
    floor: float = 0.0
    basic_floor: float = 0.0


class ClientPrivacyTally:
    """What private clients say they spent, and which of them declined.

    Clients that train with record-level DP (Opacus) or release under local DP
    report their cumulative epsilon and delta; the tally keeps each node's
    largest and reports the maximum and the mean, per kind. Rejected and
    declined replies count too: their privacy was spent all the same. Node ids
    change between runs, so a resume carries over only the maxima (floors).
    """

    def __init__(self) -> None:
        self._spent = {kind.name: _Spent() for kind in KINDS}
        self.declined: set[int] = set()

    def track(self, replies: Iterable[TrainReply | MetricsReply]) -> dict[str, float]:
        """Take the privacy that ``replies`` report; return the round's metrics."""
        replies = list(replies)
        metrics: dict[str, float] = {}
        for kind in KINDS:
            spent = self._spent[kind.name]
            for reply in replies:
                _keep_max(spent.epsilons, reply.node_id, reply.metrics.get(kind.epsilon_key))
                if kind.basic_key is not None:
                    _keep_max(spent.basic, reply.node_id, reply.metrics.get(kind.basic_key))
                if kind.delta_key in reply.metrics:
                    spent.delta = max(spent.delta or 0.0, reply.metrics[kind.delta_key])
            if spent.epsilons:
                values = list(spent.epsilons.values())
                metrics[f"epsilon_{kind.name}_max"] = max([spent.floor, *values])
                metrics[f"epsilon_{kind.name}_mean"] = sum(values) / len(values)
            elif spent.floor:
                metrics[f"epsilon_{kind.name}_max"] = spent.floor
            if spent.basic or spent.basic_floor:
                metrics[f"{kind.basic_key}_max"] = max([spent.basic_floor, *spent.basic.values()])
        return metrics

    def decline(self, node_ids: Iterable[int]) -> None:
        """These nodes declined: they are not sampled again in this run."""
        self.declined.update(node_ids)

    def everyone_declined(self, nodes: set[int]) -> bool:
        """Whether every one of ``nodes`` (at least one) has declined."""
        return bool(nodes) and nodes <= self.declined

    def summary(self) -> dict[str, float | None]:
        """Per kind: the largest epsilon (``None`` when no client reported one) and the delta.

        Keys: ``epsilon_record_max``, ``delta_record``, ``epsilon_local_max``,
        ``delta_local`` and ``epsilon_local_basic_max``.
        """
        summary: dict[str, float | None] = {}
        for kind in KINDS:
            spent = self._spent[kind.name]
            largest = max([spent.floor, *spent.epsilons.values()])
            summary[f"epsilon_{kind.name}_max"] = largest or None
            summary[f"delta_{kind.name}"] = spent.delta
            if kind.basic_key is not None:
                summary[f"{kind.basic_key}_max"] = max([spent.basic_floor, *spent.basic.values()]) or None
        return summary

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the maxima and the deltas."""
        return self.summary()

    def restore(self, state: Mapping[str, Any]) -> None:
        """Go on from :meth:`state` of an earlier run."""
        for kind in KINDS:
            spent = self._spent[kind.name]
            spent.floor = float(state.get(f"epsilon_{kind.name}_max") or 0.0)
            spent.delta = state.get(f"delta_{kind.name}")
            if kind.basic_key is not None:
                spent.basic_floor = float(state.get(f"{kind.basic_key}_max") or 0.0)


def _keep_max(spent: dict[int, float], node_id: int, value: float | None) -> None:
    if value is not None:
        spent[node_id] = max(spent.get(node_id, 0.0), value)
