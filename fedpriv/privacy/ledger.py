"""One privacy ledger for every party that releases DP outputs.

Shaped like Opacus' ``IAccountant`` (a history of releases, ``state_dict`` /
``load_state_dict``) and Flower's ``PrivacyAccountant``: the ledger only records
releases; the arithmetic is in the pure functions of
:mod:`fedpriv.privacy.accounting` (Gaussian) and
:mod:`fedpriv.privacy.laplace_accounting` (Laplace). Server-side DP-FedAvg
keeps one for the run (client-level), each Opacus client keeps one for itself
(record-level), each local-DP client one for its own releases, and resume
stores them all.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from fedpriv.checks import check_choice
from fedpriv.privacy.accounting import (
    ACCOUNTANTS,
    HistoryEntry,
    compute_epsilon,
    history_from_lists,
    history_to_lists,
    record_steps,
)

MECHANISMS = ("gaussian", "laplace", "skellam")
"""What a ledger's releases are: Poisson-sampled Gaussian, Laplace (local DP), or
Poisson-sampled distributed Skellam (secure aggregation with DP)."""

LAPLACE_ACCOUNTANT = "pld"
"""Laplace releases are composed by dp-accounting's PLD accountant."""
SKELLAM_ACCOUNTANT = "rdp"
"""Skellam releases are composed in RDP with a sampling bound that holds for any mechanism."""
_ACCOUNTANTS = {"gaussian": ACCOUNTANTS, "laplace": (LAPLACE_ACCOUNTANT,), "skellam": (SKELLAM_ACCOUNTANT,)}


class PrivacyLedger:
    """The releases one party has made, and the epsilon they add up to.

    With ``mechanism="gaussian"`` every release is a Poisson-sampled Gaussian
    mechanism ``(noise_multiplier, sample_rate, steps)`` under add/remove
    adjacency; a plain Gaussian release (a noisy count) is one with
    ``sample_rate = 1``. With ``mechanism="laplace"`` every release is a Laplace
    mechanism whose noise multiplier is its scale over its L1 sensitivity, at
    ``sample_rate = 1``. With ``mechanism="skellam"`` every release is a
    Poisson-sampled distributed Skellam sum, recorded under the noise
    multiplier of a Gaussian whose RDP bounds it
    (:func:`fedpriv.privacy.skellam.gaussian_dominating_noise_multiplier`).

    Parameters
    ----------
    accountant : str
        ``prv`` (default) or ``rdp`` for Gaussian releases; ``pld`` for Laplace;
        ``rdp`` for Skellam.
    history : sequence of (float, float, int)
        Releases already made, oldest first.
    mechanism : str
        ``gaussian`` (default), ``laplace`` or ``skellam``.
    """

    def __init__(
        self, *, accountant: str = "prv", history: Sequence[HistoryEntry] = (), mechanism: str = "gaussian"
    ) -> None:
        self.mechanism = check_choice("mechanism", mechanism, MECHANISMS)
        self.accountant = check_choice("accountant", accountant, _ACCOUNTANTS[self.mechanism])
        self._history: list[HistoryEntry] = record_steps_all(history)

    @property
    def history(self) -> list[HistoryEntry]:
        """A copy of the releases, oldest first."""
        return list(self._history)

    @property
    def releases(self) -> int:
        """How many releases were recorded (steps summed)."""
        return sum(steps for _, _, steps in self._history)

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` releases of one mechanism."""
        self._history = record_steps(
            self._history, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
        )

    def after(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> PrivacyLedger:
        """A new ledger with these releases added; this one is unchanged."""
        projected = PrivacyLedger(accountant=self.accountant, history=self._history, mechanism=self.mechanism)
        projected.record(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return projected

    def epsilon(self, delta: float) -> float:
        """Epsilon of everything recorded, at ``delta`` (0 without releases)."""
        return _epsilon(tuple(self._history), delta, self.accountant, self.mechanism)

    def basic_epsilon(self) -> float | None:
        """Laplace releases: the sum of their epsilons (delta 0); ``None`` for Gaussian ones.

        A Gaussian mechanism has no pure-DP bound, so there is no basic composition to report.
        """
        if self.mechanism != "laplace":
            return None
        from fedpriv.privacy.laplace_accounting import laplace_basic_epsilon

        return laplace_basic_epsilon(self._history)

    def epsilon_if_over(
        self, *, max_epsilon: float | None, delta: float, noise_multiplier: float, sample_rate: float, steps: int = 1
    ) -> float | None:
        """The epsilon these releases would bring, if that exceeds ``max_epsilon``; else ``None``.

        The one budget check of fedpriv: a party calls it before a release and
        releases nothing when it answers a number.
        """
        if max_epsilon is None:
            return None
        projected = self.after(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps).epsilon(delta)
        return projected if projected > max_epsilon else None

    def state_dict(self) -> dict[str, list]:
        """The history as parallel lists of scalars (what a ``ConfigRecord`` or JSON holds)."""
        return history_to_lists(self._history)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history with one from :meth:`state_dict`.

        Raises
        ------
        ValueError
            If the lists are missing, of different lengths, or hold an invalid entry.
        """
        self._history = history_from_lists(state)


@functools.lru_cache(maxsize=256)
def _epsilon(history: tuple[HistoryEntry, ...], delta: float, accountant: str, mechanism: str) -> float:
    # A budget check projects the very history that is recorded right after
    # (server: before sampling, then after the round; client: before training,
    # then for its reply): the expensive PRV computation runs once for both.
    # dp-accounting is imported for the mechanisms that need it only: a Gaussian
    # ledger (DP-SGD) works where only torch and Opacus are installed, as
    # scripts/bench.py's section 3 on a bare GPU machine.
    if mechanism == "laplace":
        from fedpriv.privacy.laplace_accounting import laplace_epsilon

        return laplace_epsilon(history, delta=delta)
    if mechanism == "skellam":
        from fedpriv.privacy.skellam import skellam_epsilon

        return skellam_epsilon(history, delta=delta)
    return compute_epsilon(history, delta=delta, accountant=accountant)


def record_steps_all(history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    """``history`` validated and merged as :func:`record_steps` merges (a new list)."""
    merged: list[HistoryEntry] = []
    for noise_multiplier, sample_rate, steps in history:
        if steps:
            merged = record_steps(merged, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return merged
