"""The guessing game of the one-run audit: scores in, correct guesses and a bound out.

The auditor ranks the ``m`` canaries by a score (higher means "more likely
included"), guesses "included" for the ``k+`` highest, "excluded" for the
``k-`` lowest and abstains on the middle (Steinke, Nasr, Jagielski 2023,
Section 6). The number of guesses must be fixed before the scores are seen:
choosing it after looking at them would test many hypotheses at once and
void the confidence level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np

from .lower_bound import epsilon_lower_bound


@dataclass(frozen=True)
class OneRunResult:
    """Outcome of one audit.

    Attributes
    ----------
    epsilon_lower_bound : float
        Empirical lower bound on epsilon (``delta = 0``) at ``confidence``.
    num_canaries : int
        ``m``, canaries in the game.
    num_included : int
        Canaries whose coin said "include".
    num_guesses : int
        ``k+ + k-``, canaries the auditor guessed on.
    correct_guesses : int
        Guesses that matched the coin.
    confidence : float
        Probability with which the bound holds.
    """

    epsilon_lower_bound: float
    num_canaries: int
    num_included: int
    num_guesses: int
    correct_guesses: int
    confidence: float


def make_guesses(scores: Sequence[float], *, num_positive: int, num_negative: int) -> np.ndarray:
    """Guess +1 for the ``num_positive`` highest scores, -1 for the ``num_negative`` lowest.

    Ties are broken by position (a stable sort), which does not depend on the
    coins, so the guesses stay a function of the scores alone.

    Parameters
    ----------
    scores : sequence of float
        One finite score per canary; left untouched.
    num_positive, num_negative : int
        ``k+, k- >= 0`` with ``k+ + k- <= len(scores)``.

    Returns
    -------
    numpy.ndarray
        int8 array of +1 (included), -1 (excluded) and 0 (abstain).
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or not np.all(np.isfinite(values)):
        raise ValueError(f"scores: must be a flat sequence of finite numbers, got shape {values.shape}")
    for key, count in (("num_positive", num_positive), ("num_negative", num_negative)):
        if isinstance(count, bool) or not isinstance(count, Integral) or count < 0:
            raise ValueError(f"{key}={count!r}: must be an integer >= 0")
    if num_positive + num_negative > values.size:
        raise ValueError(
            f"num_positive + num_negative = {num_positive + num_negative}: must be <= {values.size} canaries"
        )
    order = np.argsort(values, kind="stable")
    guesses = np.zeros(values.size, dtype=np.int8)
    guesses[order[values.size - num_positive :]] = 1
    guesses[order[:num_negative]] = -1
    return guesses


def audit_scores(
    scores: Sequence[float], included: Sequence[bool], *, num_guesses: int, confidence: float
) -> OneRunResult:
    """Play the guessing game on ``scores`` and bound epsilon from the result.

    Parameters
    ----------
    scores : sequence of float
        One score per canary, higher meaning "more likely included".
    included : sequence of bool
        The canaries' coins (the ground truth); same length as ``scores``.
    num_guesses : int
        ``r``, split as ``k+ = ceil(r / 2)`` and ``k- = floor(r / 2)``; in
        ``[0, m]``.
    confidence : float
        Passed to :func:`~fedpriv.audit.lower_bound.epsilon_lower_bound`.

    Returns
    -------
    OneRunResult
    """
    truth = np.asarray(included, dtype=bool)
    if truth.shape != (len(scores),):
        raise ValueError(f"included: {truth.shape[0] if truth.ndim else 0} coins for {len(scores)} scores")
    if isinstance(num_guesses, bool) or not isinstance(num_guesses, Integral) or not 0 <= num_guesses <= truth.size:
        raise ValueError(f"num_guesses={num_guesses!r}: must be an integer in [0, {truth.size}]")
    guesses = make_guesses(scores, num_positive=(num_guesses + 1) // 2, num_negative=num_guesses // 2)
    correct = int(np.sum((guesses == 1) & truth) + np.sum((guesses == -1) & ~truth))
    return OneRunResult(
        epsilon_lower_bound=epsilon_lower_bound(
            num_guesses=int(num_guesses), num_correct=correct, confidence=confidence
        ),
        num_canaries=int(truth.size),
        num_included=int(truth.sum()),
        num_guesses=int(num_guesses),
        correct_guesses=correct,
        confidence=float(confidence),
    )
