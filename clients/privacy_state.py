"""What every private client keeps and says about its budget.

A private client (record-level DP-SGD or local DP) keeps its privacy ledger in
the node's persistent state under :data:`STATE_KEY`, and declines a round that
would take it past its budget by raising :class:`PrivacyBudgetExhausted`.

The node state is Flower's ``RecordDict`` in a ClientApp, or a plain ``dict``
where Flower is not installed (``scripts/bench.py`` times a private local
round on a GPU machine with only torch and Opacus): Flower is imported only
to store into a ``RecordDict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedpriv.protocol import PRIVACY_REPLY_KEYS

STATE_KEY = "fedpriv.privacy"
"""Key of the ``ConfigRecord`` in the node state that holds the client's ledger."""


def stored_ledger(state: Any) -> Mapping[str, Any] | None:
    """The client's ledger record in the node ``state``; ``None`` before its first release."""
    if isinstance(state, dict):
        return state.get(STATE_KEY)
    return state.config_records.get(STATE_KEY)


def store_ledger(state: Any, values: Mapping[str, Any]) -> None:
    """Put the client's ledger ``values`` into the node ``state`` (a ``ConfigRecord`` in a ``RecordDict``)."""
    if isinstance(state, dict):
        state[STATE_KEY] = dict(values)
        return
    from flwr.app import ConfigRecord

    state[STATE_KEY] = ConfigRecord(dict(values))


class PrivacyBudgetExhausted(RuntimeError):
    """Training this round would take the client past its budget.

    Raised before any training; the node state changes only by a release the
    decision depends on (the record-level client's first count release).

    Parameters
    ----------
    epsilon : float
        Epsilon the client has spent so far.
    projected_epsilon : float
        Epsilon the client would reach by training this round.
    delta : float
        The client's target delta.
    max_epsilon : float
        The client's budget.
    level : str
        ``record`` (DP-SGD) or ``local`` (local DP): which reply keys carry the epsilon.
    """

    def __init__(
        self, *, epsilon: float, projected_epsilon: float, delta: float, max_epsilon: float, level: str = "record"
    ) -> None:
        super().__init__(
            f"client.max_epsilon={max_epsilon}: training this round would reach "
            f"epsilon={projected_epsilon:.4g} (delta={delta:.3g}); spent so far "
            f"epsilon={epsilon:.4g}"
        )
        self.epsilon = epsilon
        self.projected_epsilon = projected_epsilon
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.level = level

    def reply_metrics(self) -> dict[str, float]:
        """The privacy spent so far, under the reply keys of the client's level."""
        epsilon_key, delta_key = PRIVACY_REPLY_KEYS[self.level]
        return {epsilon_key: self.epsilon, delta_key: self.delta}
