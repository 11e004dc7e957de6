"""Privacy accounting for Poisson-sampled Gaussian releases.

A *history* is Opacus' own format: a list of ``(noise_multiplier, sample_rate,
steps)`` tuples, one per run of identical releases, in the order they happened
(see ``opacus.accountants.accountant.IAccountant.history``). All functions here
are pure: they take plain values, never mutate their inputs, and hand the
arithmetic to Opacus' accountants (``"prv"``: Gopi et al. 2021, numerical
composition of privacy loss random variables, a tight upper bound; ``"rdp"``:
Mironov et al. 2019, Renyi DP, a looser upper bound).

Opacus is imported on the first epsilon asked for, not with this module: the
strategies import it, and a run without DP then never pays Opacus' import
(about 1.5 s of CPU, its optimizers and SciPy's statistics included).
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedpriv.checks import check_int, check_real, fail
from fedpriv.opacus_logging import opacus_logging_contained

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

HistoryEntry = tuple[float, float, int]
"""One run of identical releases: ``(noise_multiplier, sample_rate, steps)``."""

ACCOUNTANTS = ("prv", "rdp")

_LIST_KEYS = ("noise_multipliers", "sample_rates", "steps")
# Beyond this the added noise dominates any useful signal; Opacus uses the same
# cap in ``opacus.accountants.utils.get_noise_multiplier``.
_MAX_NOISE_MULTIPLIER = 1e6
# Relative width of the final bracket of the noise-multiplier search.
_SOLVE_RTOL = 1e-3
PRV_MAX_EPSILON = 200.0
"""Above this RDP bound, ``compute_epsilon`` reports the RDP bound instead of PRV.

The PRV accountant sizes its grid by the RDP bound: an epsilon in the
thousands (a noise multiplier of 0.001, say) would need gigabytes. Such an
epsilon protects nothing, and the RDP value is still a valid upper bound."""


def _check_real(key: str, value: object) -> float:
    return check_real(key, value)


def _check_count(key: str, value: object, *, minimum: int) -> int:
    return check_int(key, value, minimum=minimum)


def _check_noise_multiplier(key: str, value: object) -> float:
    noise_multiplier = _check_real(key, value)
    if noise_multiplier < 0:
        raise fail(key, value, "must be >= 0")
    return noise_multiplier


def _check_sample_rate(key: str, value: object) -> float:
    sample_rate = _check_real(key, value)
    if not 0 <= sample_rate <= 1:
        raise fail(key, value, "must be in [0, 1]")
    return sample_rate


def _check_delta(delta: object) -> float:
    value = _check_real("delta", delta)
    if not 0 < value < 1:
        raise fail("delta", delta, "must be in (0, 1)")
    return value


def _check_accountant(name: object) -> str:
    if name not in ACCOUNTANTS:
        raise fail("accountant", name, f"must be one of {ACCOUNTANTS}")
    return str(name)


def _check_history(history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    checked = []
    for index, entry in enumerate(history):
        if len(entry) != 3:
            raise fail(
                f"history[{index}]",
                entry,
                "must be a (noise_multiplier, sample_rate, steps) triple",
            )
        noise_multiplier, sample_rate, steps = entry
        checked.append(
            (
                _check_noise_multiplier(
                    f"history[{index}].noise_multiplier", noise_multiplier
                ),
                _check_sample_rate(f"history[{index}].sample_rate", sample_rate),
                _check_count(f"history[{index}].steps", steps, minimum=0),
            )
        )
    return checked


@functools.cache
def _opacus() -> types.SimpleNamespace:
    """The Opacus pieces this module uses, imported on first call."""
    with opacus_logging_contained():
        from opacus.accountants import PRVAccountant, RDPAccountant, create_accountant
        from opacus.accountants.analysis import rdp as rdp_analysis
        from opacus.accountants.analysis.prv import Domain

    class CachedPRVAccountant(PRVAccountant):
        """Opacus' PRV accountant whose domain bound uses :func:`_rdp_of_one_release`.

        ``_get_domain`` repeats Opacus 1.6's ``PRVAccountant._get_domain`` and
        ``compute_safe_domain_size`` operation for operation, so epsilons are
        identical to Opacus' (a test checks equality); only the RDP vectors are
        cached instead of recomputed.
        """

        def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error) -> Domain:
            total = sum(num_self_compositions)
            history = [
                (prv.noise_multiplier, prv.sample_rate, steps)
                for prv, steps in zip(prvs, num_self_compositions, strict=True)
            ]
            bound = _rdp_epsilon(history, delta=delta_error / 4)
            for noise_multiplier, sample_rate, _ in history:
                single = [(noise_multiplier, sample_rate, 1)]
                bound = max(bound, _rdp_epsilon(single, delta=delta_error / (8 * total)))
            size = max(bound, eps_error) + 3
            mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
            return Domain.create_aligned(-size, size, mesh_size)

    return types.SimpleNamespace(
        rdp_analysis=rdp_analysis,
        orders=RDPAccountant.DEFAULT_ALPHAS,
        create_accountant=create_accountant,
        CachedPRVAccountant=CachedPRVAccountant,
    )


@functools.lru_cache(maxsize=256)
def _rdp_of_one_release(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one Poisson-sampled Gaussian release at Opacus' default orders.

    It depends on neither the number of steps nor delta, yet Opacus recomputes
    it in pure Python (151 orders) twice per history entry for every PRV
    epsilon: that was 85% of a PRV ``get_epsilon``. Cached per process, so a
    client pays it once per run and a Ray actor once for all its clients.
    """
    opacus = _opacus()
    rdp = opacus.rdp_analysis.compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=opacus.orders,
    )
    rdp.setflags(write=False)  # shared by every caller
    return rdp


def _rdp_epsilon(history: Sequence[HistoryEntry], *, delta: float) -> float:
    """``RDPAccountant(history).get_epsilon(delta)``, bit for bit, with cached RDP."""
    # The same operations in the same order as RDPAccountant.get_privacy_spent.
    rdp = sum([_rdp_of_one_release(z, q) * steps for z, q, steps in history])
    with warnings.catch_warnings():
        # A lone, lightly used release (a client's noisy count) is best at the
        # largest order: the bound is then looser, never wrong, and the PRV
        # accountant only uses it to size its domain.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        opacus = _opacus()
        epsilon, _ = opacus.rdp_analysis.get_privacy_spent(orders=opacus.orders, rdp=rdp, delta=delta)
    return float(epsilon)


def make_accountant(name: str) -> IAccountant:
    """Create a fresh, empty Opacus accountant.

    Parameters
    ----------
    name : str
        One of :data:`ACCOUNTANTS`.

    Returns
    -------
    opacus.accountants.IAccountant
        A new accountant with an empty history.

    Raises
    ------
    ValueError
        If ``name`` is not one of :data:`ACCOUNTANTS`.
    """
    return _opacus().create_accountant(mechanism=_check_accountant(name))


def record_steps(
    history: Sequence[HistoryEntry],
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int = 1,
) -> list[HistoryEntry]:
    """Return a new history with ``steps`` more releases appended.

    Like Opacus' accountants, the event is merged into the last entry when its
    noise multiplier and sample rate are equal to the last entry's.

    Parameters
    ----------
    history : sequence of (float, float, int)
        Releases so far; left untouched.
    noise_multiplier : float
        Noise standard deviation divided by the sensitivity, ``>= 0``.
    sample_rate : float
        Poisson sampling probability of each record (or client), in ``[0, 1]``.
    steps : int, default 1
        Number of identical releases, ``>= 1``.

    Returns
    -------
    list of (float, float, int)
        A new list; ``history`` is not modified.
    """
    entries = _check_history(history)
    noise_multiplier = _check_noise_multiplier("noise_multiplier", noise_multiplier)
    sample_rate = _check_sample_rate("sample_rate", sample_rate)
    steps = _check_count("steps", steps, minimum=1)
    if entries and entries[-1][:2] == (noise_multiplier, sample_rate):
        entries[-1] = (noise_multiplier, sample_rate, entries[-1][2] + steps)
    else:
        entries.append((noise_multiplier, sample_rate, steps))
    return entries


def compute_epsilon(
    history: Sequence[HistoryEntry],
    *,
    delta: float,
    accountant: str = "prv",
) -> float:
    """Epsilon of the composition of all releases in ``history``.

    Parameters
    ----------
    history : sequence of (float, float, int)
        ``(noise_multiplier, sample_rate, steps)`` runs of Poisson-sampled
        Gaussian releases under add/remove-one adjacency.
    delta : float
        Target delta, in ``(0, 1)``.
    accountant : {"prv", "rdp"}, default "prv"
        ``"prv"`` is tight (an upper bound with an additive slack of about
        0.01); ``"rdp"`` is a looser upper bound. ``"prv"`` falls back to the
        RDP bound when that exceeds :data:`PRV_MAX_EPSILON`.

    Returns
    -------
    float
        Epsilon such that the composed mechanism is (epsilon, delta)-DP;
        ``0.0`` for a history without releases and ``math.inf`` if any release
        was made without noise.
    """
    delta = _check_delta(delta)
    accountant = _check_accountant(accountant)
    counted = [
        (noise_multiplier, sample_rate, steps)
        for noise_multiplier, sample_rate, steps in _check_history(history)
        if steps > 0 and sample_rate > 0
    ]
    if not counted:
        return 0.0
    if any(noise_multiplier == 0 for noise_multiplier, _, _ in counted):
        return math.inf
    if accountant == "rdp":
        return _rdp_epsilon(counted, delta=delta)
    bound = _rdp_epsilon(counted, delta=delta)
    if bound > PRV_MAX_EPSILON:
        return bound
    prv = _opacus().CachedPRVAccountant()
    prv.history = counted
    # Opacus' PRV takes log(1 - q), which is -inf when q == 1; that limit is
    # the intended one and the warning would only be noise.
    with np.errstate(divide="ignore"):
        return float(prv.get_epsilon(delta=delta))


def solve_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    history: Sequence[HistoryEntry] = (),
) -> float:
    """Smallest noise multiplier that keeps ``history`` + ``steps`` within budget.

    Bisects over :func:`compute_epsilon` keeping the invariant that the upper
    end of the bracket satisfies the budget, so the returned value always gives
    ``epsilon <= target_epsilon``; it is within a relative ``1e-3`` of the
    smallest such noise multiplier.

    Parameters
    ----------
    target_epsilon : float
        Total budget, ``> 0``.
    delta : float
        Target delta, in ``(0, 1)``.
    sample_rate : float
        Poisson sampling rate of the new releases, in ``(0, 1]``.
    steps : int
        Number of new releases, ``>= 1``.
    accountant : {"prv", "rdp"}, default "prv"
        Accountant used for :func:`compute_epsilon`.
    history : sequence of (float, float, int), default ()
        Releases already made, composed with the new ones.

    Returns
    -------
    float
        The noise multiplier to use for the ``steps`` new releases.

    Raises
    ------
    ValueError
        If the budget cannot be met: ``history`` alone already spends it, or
        even a noise multiplier of ``1e6`` exceeds it.
    """
    target_epsilon = _check_real("target_epsilon", target_epsilon)
    if target_epsilon <= 0:
        raise fail("target_epsilon", target_epsilon, "must be > 0")
    sample_rate = _check_sample_rate("sample_rate", sample_rate)
    if sample_rate == 0:
        raise fail("sample_rate", sample_rate, "must be > 0")
    steps = _check_count("steps", steps, minimum=1)
    past = _check_history(history)

    def epsilon(noise_multiplier: float) -> float:
        return compute_epsilon(
            record_steps(
                past,
                noise_multiplier=noise_multiplier,
                sample_rate=sample_rate,
                steps=steps,
            ),
            delta=delta,
            accountant=accountant,
        )

    spent = compute_epsilon(past, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise fail(
            "target_epsilon",
            target_epsilon,
            f"unreachable, history already spends epsilon={spent:.6g}",
        )
    # Grow or shrink from 1.0 so that the expensive evaluations at tiny noise
    # multipliers only happen when the answer lies there.
    high = 1.0
    if epsilon(high) <= target_epsilon:
        low = high / 2
        while epsilon(low) <= target_epsilon:
            high, low = low, low / 2
    else:
        low, high = high, 2 * high
        while epsilon(high) > target_epsilon:
            if high >= _MAX_NOISE_MULTIPLIER:
                raise fail(
                    "target_epsilon",
                    target_epsilon,
                    f"unreachable with noise_multiplier <= {high:g}",
                )
            low, high = high, 2 * high
    while high - low > _SOLVE_RTOL * high:
        middle = (low + high) / 2
        if epsilon(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high


def history_to_lists(history: Sequence[HistoryEntry]) -> dict[str, list]:
    """Split a history into parallel lists of scalars.

    Flower's ``ConfigRecord`` stores lists of scalars but not lists of tuples;
    this is the form in which the history travels between rounds.

    Parameters
    ----------
    history : sequence of (float, float, int)
        Releases so far.

    Returns
    -------
    dict
        ``{"noise_multipliers": list[float], "sample_rates": list[float],
        "steps": list[int]}``, all of the same length.
    """
    entries = _check_history(history)
    return {
        "noise_multipliers": [entry[0] for entry in entries],
        "sample_rates": [entry[1] for entry in entries],
        "steps": [entry[2] for entry in entries],
    }


def history_from_lists(lists: Mapping[str, Sequence]) -> list[HistoryEntry]:
    """Inverse of :func:`history_to_lists`.

    Parameters
    ----------
    lists : mapping
        Must hold ``"noise_multipliers"``, ``"sample_rates"`` and ``"steps"``,
        sequences of equal length.

    Returns
    -------
    list of (float, float, int)
        The history.

    Raises
    ------
    ValueError
        If a key is missing, the lengths differ or an entry is invalid.
    """
    for key in _LIST_KEYS:
        if key not in lists:
            raise ValueError(f"{key}: missing from the stored history")
    lengths = {key: len(lists[key]) for key in _LIST_KEYS}
    if len(set(lengths.values())) != 1:
        raise fail("lengths", lengths, "must all be equal")
    return _check_history(list(zip(*(lists[key] for key in _LIST_KEYS))))


def adaptive_clipping_noise(
    *,
    noise_multiplier: float,
    clipped_count_stddev: float,
) -> float:
    r"""Noise multiplier of the update sum under adaptive clipping.

    With adaptive clipping (Andrew et al. 2021, "Differentially Private
    Learning with Adaptive Clipping", Sec. 3) the server releases two Gaussian
    sums per round over the same sampled clients:

    * the clipped-update sum :math:`S = \sum_i w_i \operatorname{clip}_C(\Delta_i)
      + \mathcal N(0, (z_\Delta C)^2 I)`, whose add/remove-one sensitivity is
      :math:`C` (every weight :math:`w_i \le 1`);
    * the centred count of unclipped clients :math:`B = \sum_i (b_i - 1/2)
      + \mathcal N(0, \sigma_b^2)` with :math:`b_i = 1[\lVert\Delta_i\rVert \le C]`.
      Adding or removing one client changes :math:`B` by :math:`\pm 1/2`.

    :math:`\sigma_b` is ``clipped_count_stddev``: the standard deviation of the
    noise on the count, in units of clients (not a fraction of clients and not
    a multiplier), as in Andrew et al., TFF and Flower.

    Divide each release by its noise scale: adjacent datasets then move the
    pair by at most :math:`1/z_\Delta` and :math:`(1/2)/\sigma_b`, and the noise
    is standard normal in every coordinate. The pair is therefore one Gaussian
    mechanism with unit noise and L2 sensitivity
    :math:`\sqrt{z_\Delta^{-2} + (2\sigma_b)^{-2}}`, that is, with noise
    multiplier :math:`z` where

    .. math:: z^{-2} = z_\Delta^{-2} + (2\sigma_b)^{-2}.

    Solving for the update's share gives
    :math:`z_\Delta = (z^{-2} - (2\sigma_b)^{-2})^{-1/2}`, defined when
    :math:`\sigma_b > z/2`. The round is accounted as one Poisson-sampled
    Gaussian event with the total ``noise_multiplier`` :math:`z`, and the
    count must be released in centred form, as
    :func:`fedpriv.privacy.mechanisms.noisy_unclipped_fraction` does.

    Parameters
    ----------
    noise_multiplier : float
        Total noise multiplier :math:`z` of the round, the one to account,
        ``>= 0``.
    clipped_count_stddev : float
        :math:`\sigma_b`, standard deviation of the noise on the count of
        unclipped clients; must be ``> noise_multiplier / 2``.

    Returns
    -------
    float
        :math:`z_\Delta`, the noise multiplier to apply to the clipped-update
        sum (the one to pass to :func:`fedpriv.privacy.mechanisms.noise_std`);
        ``0.0`` when ``noise_multiplier`` is 0 (no privacy).

    Raises
    ------
    ValueError
        If ``clipped_count_stddev <= noise_multiplier / 2``: the count alone
        would then spend the whole budget.
    """
    total = _check_noise_multiplier("strategy.noise_multiplier", noise_multiplier)
    count_stddev = _check_real("strategy.clipped_count_stddev", clipped_count_stddev)
    if total == 0:
        return 0.0
    minimum = total / 2
    if count_stddev <= minimum:
        raise fail(
            "strategy.clipped_count_stddev",
            clipped_count_stddev,
            f"must be > strategy.noise_multiplier / 2 = {minimum:g}",
        )
    return (total**-2 - (2 * count_stddev) ** -2) ** -0.5
