"""Privacy accounting for Laplace releases (local DP), by Google's ``dp-accounting``.

A history has the same format as for Gaussian releases, ``(noise_multiplier,
sample_rate, steps)``, where a Laplace release's noise multiplier is its scale
over its L1 sensitivity, ``b / Delta``; each one is ``(1 / noise_multiplier,
0)``-DP. Local DP samples nothing on the client, so ``sample_rate`` is 1.

Two bounds are reported, both upper bounds on the same releases:

- basic composition, the sum of the per-release epsilons, at delta 0;
- privacy-loss-distribution (PLD) accounting (Meiser and Mohammadi 2018;
  Koskela et al. 2020) at a delta, tighter after a few releases. A
  multi-dimensional Laplace mechanism with L1 sensitivity ``Delta`` is
  dominated by the one-dimensional pair ``Laplace(0, b)`` / ``Laplace(Delta, b)``,
  which is what ``dp_accounting.LaplaceDpEvent`` composes.

Pure functions of plain values, as in :mod:`fedpriv.privacy.accounting`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import dp_accounting
from dp_accounting.pld import PLDAccountant

from fedpriv.checks import check_delta, fail

HistoryEntry = tuple[float, float, int]

# dp-accounting's default grid, widened with the per-release epsilon: a release
# of epsilon e spans [-e, e] in privacy loss, and a fixed grid would hold 2e4 * e
# points (seconds and gigabytes at e = 1000). A coarser grid stays a pessimistic
# upper bound, only a little looser.
_VALUE_DISCRETIZATION = 1e-4
PLD_MAX_RELEASE_EPSILON = 100.0
"""Above this per-release epsilon the PLD bound is not computed: basic composition is reported.

dp-accounting's truncation fails on such grids (epsilon 1000 a release, 51
releases), and at these epsilons PLD gains nothing worth having."""


def _counted(history: Sequence[HistoryEntry]) -> list[tuple[float, int]]:
    counted = []
    for noise_multiplier, sample_rate, steps in history:
        if sample_rate != 1.0:
            raise fail("sample_rate", sample_rate, "must be 1 for a Laplace release (local DP samples nothing)")
        if steps:
            counted.append((float(noise_multiplier), int(steps)))
    return counted


def laplace_basic_epsilon(history: Sequence[HistoryEntry]) -> float:
    """Epsilon of the releases by basic composition: ``sum(steps / noise_multiplier)``, at delta 0.

    ``0.0`` for a history without releases; ``inf`` if a release had no noise.
    """
    counted = _counted(history)
    if any(noise_multiplier == 0 for noise_multiplier, _ in counted):
        return math.inf
    return float(sum(steps / noise_multiplier for noise_multiplier, steps in counted))


def laplace_epsilon(history: Sequence[HistoryEntry], *, delta: float) -> float:
    """Epsilon of the releases at ``delta`` by PLD accounting (``dp_accounting``).

    Never above :func:`laplace_basic_epsilon`: the smaller of the two is returned,
    and basic composition alone when a release's epsilon exceeds
    :data:`PLD_MAX_RELEASE_EPSILON`.

    Parameters
    ----------
    history : sequence of (float, float, int)
        ``(noise_multiplier, 1.0, steps)`` runs of Laplace releases.
    delta : float
        Target delta.

    Returns
    -------
    float
        ``0.0`` without releases; ``inf`` if a release had no noise.
    """
    delta = check_delta("delta", delta)
    counted = _counted(history)
    if not counted:
        return 0.0
    basic = laplace_basic_epsilon(history)
    if not math.isfinite(basic):
        return math.inf
    largest = max(1.0 / noise_multiplier for noise_multiplier, _ in counted)
    if largest > PLD_MAX_RELEASE_EPSILON:
        return basic
    accountant = PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=_VALUE_DISCRETIZATION * max(1.0, largest),
    )
    for noise_multiplier, steps in counted:
        accountant.compose(dp_accounting.LaplaceDpEvent(noise_multiplier), steps)
    return min(basic, float(accountant.get_epsilon(delta)))
