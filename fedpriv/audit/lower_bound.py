"""Empirical epsilon lower bound of the one-run audit (Steinke, Nasr, Jagielski 2023).

"Privacy Auditing with One (1) Training Run" (NeurIPS 2023, arXiv:2305.08846):
``m`` canaries are each included in training independently with probability
1/2. After training, an auditor guesses "included" or "excluded" for ``r`` of
them and abstains on the rest. If the training run is ``(epsilon, 0)``-DP with
respect to each canary, the number of correct guesses ``W`` is stochastically
dominated by ``Binomial(r, p)`` with ``p = e^epsilon / (e^epsilon + 1)``
(their Theorem 3.1). Observing ``v`` correct guesses therefore rejects every
``epsilon`` with ``P[Binomial(r, p_epsilon) >= v] <= 1 - confidence``; the
largest such ``epsilon`` is a lower bound on the true epsilon that holds with
probability at least ``confidence`` (their Algorithm 1 with ``delta = 0``).

Only ``delta = 0`` is implemented. A mechanism with a claimed
``(epsilon, delta)`` and ``delta > 0`` may exceed the pure-DP bound by a term
of order ``m * delta`` in probability (their Theorem 5.2), so comparing this
bound with an ``(epsilon, delta)`` claim is exact only as ``delta -> 0``.

The functions are pure and take plain numbers.
"""

from __future__ import annotations

import math
from numbers import Real

from scipy.stats import beta as beta_distribution

from fedpriv.checks import check_int, check_real, fail


def _check_confidence(value: object) -> float:
    confidence = check_real("confidence", value, above=0.0)
    if confidence >= 1:
        raise fail("confidence", value, "must be in (0, 1)")
    return confidence


def guess_probability(epsilon: float) -> float:
    """Largest chance of a correct guess about one canary under ``(epsilon, 0)``-DP.

    Parameters
    ----------
    epsilon : float
        ``>= 0``.

    Returns
    -------
    float
        ``e^epsilon / (e^epsilon + 1)``, computed without overflow.
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, Real) or not epsilon >= 0:
        raise ValueError(f"epsilon={epsilon!r}: must be a number >= 0")
    return 1.0 / (1.0 + math.exp(-epsilon))


def epsilon_lower_bound(*, num_guesses: int, num_correct: int, confidence: float = 0.95) -> float:
    """Largest epsilon that ``num_correct`` of ``num_guesses`` rules out.

    Solves ``P[Binomial(num_guesses, p) >= num_correct] = 1 - confidence``
    for ``p`` and returns ``log(p / (1 - p))``, or 0 when that is negative
    (no better than chance) or when there were no guesses. The binomial tail
    is the regularised incomplete beta function, ``P[Bin(r, p) >= v] =
    I_p(v, r - v + 1)``, so ``p`` is the ``1 - confidence`` quantile of
    ``Beta(v, r - v + 1)``: no search needed.

    Parameters
    ----------
    num_guesses : int
        ``r >= 0``, canaries the auditor did not abstain on.
    num_correct : int
        ``v``, correct guesses, ``0 <= v <= r``.
    confidence : float, default 0.95
        Probability, over the canaries' coin flips and the run's randomness,
        that the bound holds; in ``(0, 1)``.

    Returns
    -------
    float
        The lower bound, ``>= 0`` and finite: even ``r`` correct guesses of
        ``r`` only prove ``epsilon >= log(p / (1 - p))`` with
        ``p = (1 - confidence)^(1 / r)``, about 3.49 for 100 of 100 at 95%.

    Raises
    ------
    ValueError
        If a count is negative, ``num_correct > num_guesses`` or
        ``confidence`` is not in ``(0, 1)``.
    """
    guesses = check_int("num_guesses", num_guesses, minimum=0)
    correct = check_int("num_correct", num_correct, minimum=0)
    level = _check_confidence(confidence)
    if correct > guesses:
        raise ValueError(f"num_correct={correct}: must be <= num_guesses={guesses}")
    if correct == 0:
        return 0.0
    p = float(beta_distribution.ppf(1 - level, correct, guesses - correct + 1))
    if p <= 0.5:
        return 0.0
    return math.log(p) - math.log1p(-p)
