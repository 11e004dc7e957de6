"""Server-side client-level DP-FedAvg (McMahan et al. 2018, arXiv:1710.06963).

Each sampled client sends a model update (its model after local training minus
the global model, one array per layer). The server clips each update to L2 norm
``C``, sums them with weights ``w_i <= 1``, divides by a *fixed* denominator
``D`` that does not depend on who was sampled, and adds Gaussian noise of
standard deviation ``z * C / D``. Adding or removing one client moves the
weighted sum by at most ``w_i * C <= C``, so the average moves by at most
``C / D``: the release is a Gaussian mechanism with noise multiplier ``z``,
accounted with :mod:`fedpriv.privacy.accounting`.

The clipping norm may follow a quantile of the update norms (Andrew et al.
2021): :func:`noisy_unclipped_fraction` and :func:`next_clipping_norm`; see
:func:`fedpriv.privacy.accounting.adaptive_clipping_noise` for how the extra
release is paid for.

All functions are pure: they return new arrays and never modify their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedpriv.checks import check_int, check_real, fail


def _positive(key: str, value: object) -> float:
    return check_real(key, value, above=0.0)


def _non_negative(key: str, value: object) -> float:
    return check_real(key, value, minimum=0.0)


def _unit_interval(key: str, value: object) -> float:
    return check_real(key, value, above=0.0, maximum=1.0)


@dataclass(frozen=True)
class ClipStats:
    """What clipping did to one round's updates.

    Attributes
    ----------
    norms : tuple of float
        L2 norm of each update before clipping, in input order.
    num_clipped : int
        Number of updates whose norm exceeded the clipping norm.
    clip_fraction : float
        ``num_clipped / len(norms)``; ``0.0`` for a round without updates.
    """

    norms: tuple[float, ...]
    num_clipped: int
    clip_fraction: float


def l2_norm(arrays: Sequence[np.ndarray]) -> float:
    """Global L2 norm of a list of arrays, as if they were one flat vector.

    Parameters
    ----------
    arrays : sequence of numpy.ndarray
        One array per layer.

    Returns
    -------
    float
        The norm, accumulated in float64; ``inf`` or ``nan`` if an entry is.
    """
    peak = max(
        (float(np.max(np.abs(array))) for array in arrays if np.size(array)),
        default=0.0,
    )
    if peak == 0 or not math.isfinite(peak):
        return peak
    # Dividing by the largest magnitude first keeps the sum of squares from
    # overflowing for finite updates beyond 1e154, which must still be clipped.
    squares = sum(
        float(np.sum(np.square(np.asarray(array, dtype=np.float64) / peak)))
        for array in arrays
    )
    return peak * math.sqrt(squares)


def clip_to_norm(
    arrays: Sequence[np.ndarray],
    *,
    clipping_norm: float,
) -> tuple[list[np.ndarray], float]:
    """Scale an update so that its global L2 norm is at most ``clipping_norm``.

    Parameters
    ----------
    arrays : sequence of numpy.ndarray
        The update, one array per layer; left untouched.
    clipping_norm : float
        ``C > 0``.

    Returns
    -------
    clipped : list of numpy.ndarray
        New arrays, the update times ``min(1, C / norm)``, with the input dtypes.
    norm : float
        The norm of the update before clipping.

    Raises
    ------
    ValueError
        If the update holds ``inf`` or ``nan``: it could not be bounded.
    """
    clipping_norm = _positive("strategy.clipping_norm", clipping_norm)
    norm = l2_norm(arrays)
    if not math.isfinite(norm):
        raise fail("update norm", norm, "must be finite; the update holds inf or nan")
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return [np.asarray(array) * scale for array in arrays], norm


def bounded_weight(num_examples: float, *, weight_cap: float, weighted: bool) -> float:
    """Client weight in ``(0, 1]`` (McMahan et al. 2018, ``w_k = min(n_k / w_hat, 1)``).

    Capping at 1 bounds each client's influence on the weighted sum by ``C``.

    Parameters
    ----------
    num_examples : float
        Number of local training examples the client reported, ``> 0``.
    weight_cap : float
        Number of examples at which a client gets full weight, ``> 0``.
    weighted : bool
        If false every client gets weight 1.

    Returns
    -------
    float
        ``min(num_examples / weight_cap, 1.0)``, or ``1.0`` when not weighted.
    """
    num_examples = _positive("num_examples", num_examples)
    weight_cap = _positive("strategy.weight_cap", weight_cap)
    return min(num_examples / weight_cap, 1.0) if weighted else 1.0


def fixed_denominator(*, sample_rate: float, num_clients: int) -> float:
    """Fixed denominator ``q * N`` of the DP-FedAvg average.

    This is the expected number of sampled clients, and since every weight is
    at most 1 it is the expected total weight of a round only when all weights
    are 1; the estimator is then unbiased. When weights ``w_i`` vary the
    expected weighted sum is ``q * sum_i w_i x_i``, so dividing by ``q * N``
    yields the weighted mean times the mean weight ``sum_i w_i / N``: biased
    towards zero by that factor. The denominator must not depend on who was
    sampled, or the ``C / D`` sensitivity bound no longer holds.

    Parameters
    ----------
    sample_rate : float
        Poisson sampling probability ``q`` of each client, in ``(0, 1]``.
    num_clients : int
        Population size ``N``, ``>= 1``.

    Returns
    -------
    float
        ``q * N``.
    """
    sample_rate = _unit_interval("strategy.sample_rate", sample_rate)
    return sample_rate * check_int("num_clients", num_clients, minimum=1)


def noise_std(
    *,
    noise_multiplier: float,
    clipping_norm: float,
    denominator: float,
) -> float:
    """Standard deviation of the noise added to the clipped average.

    Parameters
    ----------
    noise_multiplier : float
        ``z >= 0``, the value to account.
    clipping_norm : float
        ``C > 0``.
    denominator : float
        ``D > 0``, the fixed denominator of the average.

    Returns
    -------
    float
        ``z * C / D``: ``z`` times the sensitivity ``C / D`` of the average.
    """
    noise_multiplier = _non_negative("strategy.noise_multiplier", noise_multiplier)
    clipping_norm = _positive("strategy.clipping_norm", clipping_norm)
    denominator = _positive("denominator", denominator)
    return noise_multiplier * clipping_norm / denominator


def aggregate_clipped(
    updates: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float],
    *,
    clipping_norm: float,
    denominator: float,
    like: Sequence[np.ndarray] | None = None,
) -> tuple[list[np.ndarray], ClipStats]:
    """Weighted sum of clipped updates divided by a fixed denominator.

    Parameters
    ----------
    updates : sequence of sequence of numpy.ndarray
        One update per client, each one array per layer; left untouched.
    weights : sequence of float
        One weight per update, each in ``(0, 1]``.
    clipping_norm : float
        ``C > 0``.
    denominator : float
        ``D > 0``, e.g. :func:`fixed_denominator`.
    like : sequence of numpy.ndarray, optional
        Arrays giving the output shapes and dtypes; required when ``updates``
        is empty, otherwise the first update plays this role.

    Returns
    -------
    aggregate : list of numpy.ndarray
        ``sum_i w_i clip(update_i) / D``, accumulated in float64 and returned
        in the dtypes of ``like``.
    stats : ClipStats
        Norms before clipping and how many updates were clipped.
    """
    clipping_norm = _positive("strategy.clipping_norm", clipping_norm)
    denominator = _positive("denominator", denominator)
    if len(weights) != len(updates):
        raise fail(
            "len(weights)", len(weights), f"must equal len(updates)={len(updates)}"
        )
    checked_weights = [
        _unit_interval(f"weights[{index}]", weight)
        for index, weight in enumerate(weights)
    ]
    template = like if like is not None else (updates[0] if updates else None)
    if template is None:
        raise fail("like", None, "required when updates is empty")
    shapes = [np.shape(array) for array in template]
    totals = [np.zeros(shape, dtype=np.float64) for shape in shapes]
    norms = []
    for index, (update, weight) in enumerate(zip(updates, checked_weights)):
        update_shapes = [np.shape(array) for array in update]
        if update_shapes != shapes:
            raise fail(
                f"updates[{index}] shapes", update_shapes, f"must equal {shapes}"
            )
        clipped, norm = clip_to_norm(update, clipping_norm=clipping_norm)
        norms.append(norm)
        for total, layer in zip(totals, clipped):
            total += weight * np.asarray(layer, dtype=np.float64)
    aggregate = [
        (total / denominator).astype(np.asarray(array).dtype, copy=False)
        for total, array in zip(totals, template)
    ]
    num_clipped = sum(norm > clipping_norm for norm in norms)
    stats = ClipStats(
        norms=tuple(norms),
        num_clipped=num_clipped,
        clip_fraction=num_clipped / len(norms) if norms else 0.0,
    )
    return aggregate, stats


def add_gaussian_noise(
    arrays: Sequence[np.ndarray],
    *,
    std: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Add iid ``N(0, std^2)`` noise to every coordinate.

    Parameters
    ----------
    arrays : sequence of numpy.ndarray
        Left untouched.
    std : float
        Standard deviation, ``>= 0``, e.g. :func:`noise_std`.
    rng : numpy.random.Generator
        Source of the noise.

    Returns
    -------
    list of numpy.ndarray
        New arrays in the input dtypes; plain copies when ``std == 0``.
    """
    std = _non_negative("std", std)
    return [
        (array + rng.normal(0.0, std, size=np.shape(array))).astype(
            np.asarray(array).dtype, copy=False
        )
        for array in arrays
    ]


def noisy_unclipped_fraction(
    norms: Sequence[float],
    *,
    clipping_norm: float,
    count_stddev: float,
    expected_num_clients: float,
    rng: np.random.Generator,
) -> float:
    """Private estimate of the fraction of updates with norm ``<= C``.

    Releases the centred count ``sum_i (b_i - 1/2) + N(0, count_stddev^2)``
    with ``b_i = 1[norm_i <= C]``, whose sensitivity is 1/2 as assumed by
    :func:`fedpriv.privacy.accounting.adaptive_clipping_noise`, and returns

    ``1/2 + (sum_i (b_i - 1/2) + noise) / expected_num_clients``

    (Andrew et al. 2021, as in TensorFlow Privacy's quantile estimator). When
    the number of updates equals ``expected_num_clients`` this is
    ``(#{norm_i <= C} + noise) / expected_num_clients``.

    Parameters
    ----------
    norms : sequence of float
        Update norms before clipping, e.g. ``ClipStats.norms``.
    clipping_norm : float
        ``C > 0`` used this round.
    count_stddev : float
        Standard deviation of the noise on the count, in clients, ``>= 0``.
    expected_num_clients : float
        Expected number of updates per round, e.g. :func:`fixed_denominator`, ``> 0``.
    rng : numpy.random.Generator
        Source of the noise.

    Returns
    -------
    float
        The noisy fraction; noise may push it outside ``[0, 1]``.
    """
    clipping_norm = _positive("strategy.clipping_norm", clipping_norm)
    count_stddev = _non_negative("strategy.clipped_count_stddev", count_stddev)
    expected_num_clients = _positive("expected_num_clients", expected_num_clients)
    centred_count = sum(norm <= clipping_norm for norm in norms) - len(norms) / 2
    return 0.5 + (centred_count + rng.normal(0.0, count_stddev)) / expected_num_clients


def next_clipping_norm(
    *,
    clipping_norm: float,
    unclipped_fraction: float,
    target_quantile: float,
    clip_lr: float,
) -> float:
    """Geometric update of the clipping norm towards a quantile of the norms.

    ``C * exp(-clip_lr * (unclipped_fraction - target_quantile))`` (Andrew et
    al. 2021, Sec. 2): ``C`` shrinks while more than ``target_quantile`` of
    the updates fit under it and grows otherwise.

    Parameters
    ----------
    clipping_norm : float
        Current ``C > 0``.
    unclipped_fraction : float
        Output of :func:`noisy_unclipped_fraction`.
    target_quantile : float
        Desired fraction of unclipped updates, in ``(0, 1)``.
    clip_lr : float
        Learning rate ``> 0``.

    Returns
    -------
    float
        The clipping norm for the next round.
    """
    clipping_norm = _positive("strategy.clipping_norm", clipping_norm)
    unclipped_fraction = check_real("unclipped_fraction", unclipped_fraction)
    target_quantile = check_real("strategy.target_quantile", target_quantile)
    if not 0 < target_quantile < 1:
        raise fail("strategy.target_quantile", target_quantile, "must be in (0, 1)")
    clip_lr = _positive("strategy.clip_lr", clip_lr)
    return clipping_norm * math.exp(-clip_lr * (unclipped_fraction - target_quantile))
