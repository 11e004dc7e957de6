"""The distributed Skellam mechanism: noise, its Renyi DP, and its accounting.

Agarwal, Kairouz and Liu, "The Skellam Mechanism for Differentially Private
Federated Learning", NeurIPS 2021. Each client adds integer noise
``Poisson(v/2) - Poisson(v/2)`` (variance ``v``) to its integer update before
secure aggregation masks it. A sum of independent Skellam variables is Skellam
with the summed variance, so whatever set of clients survives a round, the sum
the server unmasks carries exactly Skellam noise of the survivors' total
variance: the accountant is given that total, never the planned one.

Accounting (all pure functions):

* one release: the Skellam RDP bound (their Theorem 3.5, variance
  parametrisation), ``eps(a) <= a D2^2 / (2 v) + min(((2a - 1) D2^2 + 6 D1) /
  (4 v^2), 3 D1 / (2 v))`` for L1 / L2 sensitivities ``D1`` / ``D2``;
* it is folded into the noise multiplier ``z`` of a Gaussian whose RDP
  ``a / (2 z^2)`` is at least that bound at every order used
  (:func:`gaussian_dominating_noise_multiplier`), so a release is one
  ``(z, sample_rate, steps)`` entry of a ledger history;
* Poisson sampling: the general upper bound of Zhu and Wang (ICML 2019,
  Theorem 6) over that base curve; it holds for any mechanism with that RDP,
  and only grows with the base curve, so the fold above stays an upper bound.
  It is looser than the Gaussian-specific bound of Opacus' and dp-accounting's
  RDP accountants (the tests put the two side by side);
* composition adds RDP, and dp-accounting converts to ``(epsilon, delta)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedpriv.checks import check_real, fail

SKELLAM_ORDERS = tuple(range(2, 257))
"""Integer RDP orders: the subsampling bound needs every integer order up to the largest."""

HistoryEntry = tuple[float, float, int]


def sample_skellam(variance: float, *, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of symmetric Skellam noise with variance ``variance`` (int64).

    The difference of two independent ``Poisson(variance / 2)`` draws.
    """
    variance = check_real("variance", variance, minimum=0.0)
    if variance == 0:
        return np.zeros(size, dtype=np.int64)
    mean = variance / 2
    return rng.poisson(mean, size).astype(np.int64) - rng.poisson(mean, size).astype(np.int64)


def skellam_rdp(
    orders: Sequence[int], *, variance: float, l1_sensitivity: float, l2_sensitivity: float
) -> np.ndarray:
    """RDP of one Skellam release of variance ``variance`` per coordinate, at ``orders``."""
    variance = check_real("variance", variance, above=0.0)
    l1 = check_real("l1_sensitivity", l1_sensitivity, minimum=0.0)
    l2 = check_real("l2_sensitivity", l2_sensitivity, minimum=0.0)
    alpha = np.asarray(orders, dtype=float)
    correction = np.minimum(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance))
    return alpha * l2**2 / (2 * variance) + correction


def gaussian_dominating_noise_multiplier(
    *, variance: float, l1_sensitivity: float, l2_sensitivity: float, orders: Sequence[int] = SKELLAM_ORDERS
) -> float:
    """The largest ``z`` with ``a / (2 z^2) >= skellam_rdp(a)`` at every order ``a``.

    ``sqrt(variance) / l2_sensitivity`` minus the Skellam correction, which
    vanishes as the variance grows.
    """
    rdp = skellam_rdp(orders, variance=variance, l1_sensitivity=l1_sensitivity, l2_sensitivity=l2_sensitivity)
    worst = float(np.max(2 * rdp / np.asarray(orders, dtype=float)))
    return math.inf if worst == 0 else 1 / math.sqrt(worst)


def poisson_subsampled_rdp(orders: Sequence[int], base_rdp: Sequence[float], *, sample_rate: float) -> np.ndarray:
    """Zhu and Wang's upper bound on the RDP of a Poisson-subsampled mechanism.

    Parameters
    ----------
    orders : sequence of int
        ``2, 3, ..., A``: every integer order up to the largest.
    base_rdp : sequence of float
        RDP of the mechanism without sampling, at ``orders``.
    sample_rate : float
        Poisson sampling probability ``q`` in ``[0, 1]``.

    Returns
    -------
    numpy.ndarray
        For each order ``a``: ``min(base(a), log(T(a)) / (a - 1))`` with
        ``T(a) = (1 - q)^(a-1) (1 + (a - 1) q) + C(a, 2) q^2 (1 - q)^(a-2)
        e^{base(2)} + 3 sum_{l=3}^{a} C(a, l) q^l (1 - q)^(a-l) e^{(l-1) base(l)}``.
    """
    q = check_real("sample_rate", sample_rate, minimum=0.0, maximum=1.0)
    alphas = [int(a) for a in orders]
    if alphas != list(range(2, 2 + len(alphas))):
        raise fail("orders", orders, "must be the integers 2, 3, ..., A")
    base = np.asarray(base_rdp, dtype=float)
    if q == 0:
        return np.zeros_like(base)
    if q == 1:
        return base.copy()
    from scipy.special import logsumexp  # here: SciPy's special functions take 0.2 s to import

    log_q, log_1q = math.log(q), math.log1p(-q)
    result = np.empty_like(base)
    for index, alpha in enumerate(alphas):
        terms = [(alpha - 1) * log_1q + math.log1p((alpha - 1) * q)]
        terms.append(_log_binomial(alpha, 2) + 2 * log_q + (alpha - 2) * log_1q + base[0])
        for order in range(3, alpha + 1):
            terms.append(
                math.log(3)
                + _log_binomial(alpha, order)
                + order * log_q
                + (alpha - order) * log_1q
                + (order - 1) * base[order - 2]
            )
        result[index] = min(base[index], float(logsumexp(terms)) / (alpha - 1))
    return result


def _log_binomial(n: int, k: int) -> float:
    from scipy.special import gammaln

    return float(gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1))


def skellam_epsilon(history: Sequence[HistoryEntry], *, delta: float) -> float:
    """Epsilon at ``delta`` of Skellam releases folded into ``(z, sample_rate, steps)`` entries.

    Returns ``0.0`` without releases and ``math.inf`` when one had no noise.
    """
    counted = [(z, q, steps) for z, q, steps in history if steps > 0 and q > 0]
    if not counted:
        return 0.0
    if any(z == 0 for z, _, _ in counted):
        return math.inf
    orders = np.asarray(SKELLAM_ORDERS, dtype=float)
    total = np.zeros(len(orders))
    for z, q, steps in counted:
        total += steps * poisson_subsampled_rdp(SKELLAM_ORDERS, orders / (2 * z**2), sample_rate=q)
    # Imported here: dp_accounting takes about 0.7 s to import, and only a run
    # with secure aggregation asks for a Skellam epsilon.
    from dp_accounting.rdp import rdp_privacy_accountant

    epsilon, _ = rdp_privacy_accountant.compute_epsilon(orders, total, delta)
    return float(epsilon)


def skellam_tail(*, variance: float, threshold: float) -> float:
    """Chernoff bound on ``P(|X| >= threshold)`` for Skellam ``X`` of variance ``variance``.

    ``E exp(l X) = exp(variance (cosh l - 1))``; at ``l = asinh(t / variance)``
    this gives ``2 exp(variance (sqrt(1 + r^2) - 1) - t asinh(r))``, ``r = t / variance``.
    """
    variance = check_real("variance", variance, minimum=0.0)
    threshold = check_real("threshold", threshold, above=0.0)
    if variance == 0:
        return 0.0
    ratio = threshold / variance
    exponent = variance * (math.sqrt(1 + ratio**2) - 1) - threshold * math.asinh(ratio)
    return min(1.0, 2 * math.exp(exponent))
