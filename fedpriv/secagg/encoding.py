"""What a client puts into secure aggregation, and how the server reads the sum.

Two encodings of a client's update (its model minus the global model, as one
flat float64 vector), both integer vectors taken modulo ``modulus_range``:

* :class:`WeightedEncoding` (no DP): the weight ``w = min(n / max_weight, 1)``
  (quantized to ``1 / quantization_range``) first, then the number of
  coordinates the clipping below changed, then ``w * update`` clipped per
  coordinate to ``clipping_range`` and stochastically rounded to
  ``quantization_range`` levels. The sum holds ``sum w``, the clipped count
  and ``sum w * update``: FedAvg's weighted mean, while no single count
  leaves a client in the clear.
* :class:`DistributedDPEncoding` (DP-FedAvg): the update clipped to L2 norm
  ``clipping_norm``, times its bounded weight, times ``scale``, stochastically
  rounded, plus this client's share of Skellam noise
  (:mod:`fedpriv.privacy.skellam`).

Bounds, stated once. Stochastic rounding moves every coordinate by less than
1, so an integer vector's L2 norm grows by at most ``sqrt(d)``: the
sensitivity accounted is ``clipping_norm * scale + sqrt(d)``. The scale is
chosen (:func:`plan_distributed_noise`) so that the sum of all ``n`` clients'
signals plus noise stays inside ``(-modulus/2, modulus/2)`` in every
coordinate except with probability at most ``WRAP_PROBABILITY`` per round
(Chernoff bound on the Skellam tail, union over coordinates): no modular
clipping is needed. Rounding errs by less than ``1 / scale`` per client and
coordinate, unbiased.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedpriv.checks import check_int, check_real, fail
from fedpriv.privacy.mechanisms import bounded_weight, clip_to_norm
from fedpriv.privacy.skellam import gaussian_dominating_noise_multiplier, sample_skellam, skellam_tail

WRAP_PROBABILITY = 1e-9
"""Bound on the chance that some coordinate of a round's DP sum wraps around the modulus."""
MAX_SCALE_UNITS = 2**24
"""Largest integer value of ``clipping_norm``: finer steps gain nothing but larger noise draws."""
MAX_POISSON_MEAN = 2**50
"""Largest Poisson mean of a client's noise: float64 draws stay exact to well below one unit."""
MIN_SCALE_UNITS = 2**8
"""Below this the rounding error would rival the clipped update."""


def stochastic_round(values: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """Round each value down or up to an integer, unbiased (int64); ``values`` is unchanged."""
    floor = np.floor(values)
    return (floor + (rng.random(values.shape) < values - floor)).astype(np.int64)


@dataclass(frozen=True)
class WeightedEncoding:
    """Secure aggregation without DP: the weighted mean of the clients' updates.

    Parameters mean what the ``secure`` group's do.
    """

    clipping_range: float
    quantization_range: int
    max_weight: float

    def encode(self, update: np.ndarray, *, num_examples: float, rng: np.random.Generator) -> np.ndarray:
        """``[weight, clipped count, weighted update]`` as integers (the weight in ``1 / quantization_range`` units)."""
        ratio = min(float(num_examples) / self.max_weight, 1.0)
        weight = max(round(ratio * self.quantization_range), 1)
        levels = self.quantization_range / (2 * self.clipping_range)
        weighted = update * (weight / self.quantization_range)
        clipped = int(np.count_nonzero(np.abs(weighted) > self.clipping_range))
        bounded = np.clip(weighted, -self.clipping_range, self.clipping_range)
        return np.concatenate([[weight, clipped], stochastic_round(bounded * levels, rng=rng)])

    def clipped_values(self, total: np.ndarray) -> int:
        """How many coordinates the clients' clipping to ``clipping_range`` changed, all clients together."""
        return int(total[1])

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The weighted mean update from the centred sum of every survivor's encoding.

        Raises
        ------
        ValueError
            If the weights sum to zero or less (no survivor, or a corrupt sum).
        """
        weight_sum = float(total[0]) / self.quantization_range
        if weight_sum <= 0:
            raise fail("sum of weights", weight_sum, "must be > 0")
        levels = self.quantization_range / (2 * self.clipping_range)
        return total[2:].astype(np.float64) / levels / weight_sum

    def length(self, dimension: int) -> int:
        """Integers per client for a model of ``dimension`` values."""
        return dimension + 2


@dataclass(frozen=True)
class NoisePlan:
    """The integer grid and the noise of a DP run with secure aggregation, fixed by the server.

    The grid depends only on public config (the population, not a round's
    sample), so every round is accounted the same way.

    Attributes
    ----------
    scale : float
        Integer units per unit of the update.
    l2_sensitivity, l1_sensitivity : float
        Of one client's integer vector (rounding included).
    variance : float
        The Skellam variance per coordinate that is accounted.
    dropout_tolerance : float
        Fraction of a round's sampled clients that may drop out with the sum
        still carrying at least ``variance``: each client adds
        ``variance / required_survivors``.
    noise_bound : float
        The noise of every sampled client together stays below this in every
        coordinate except with probability ``WRAP_PROBABILITY``.
    """

    scale: float
    l2_sensitivity: float
    l1_sensitivity: float
    variance: float
    dropout_tolerance: float
    noise_bound: float

    def required_survivors(self, num_sampled: int) -> int:
        """Survivors whose noise adds up to ``variance``: ``ceil((1 - tolerance) * num_sampled)``, at least 2."""
        return max(2, math.ceil((1 - self.dropout_tolerance) * num_sampled - 1e-9))

    def variance_per_client(self, num_sampled: int) -> float:
        """The Skellam variance each of ``num_sampled`` clients adds per coordinate."""
        return self.variance / self.required_survivors(num_sampled)

    @property
    def noise_multiplier(self) -> float:
        """Noise multiplier of a Gaussian whose RDP bounds the accounted Skellam release."""
        if self.variance == 0:
            return 0.0
        return gaussian_dominating_noise_multiplier(
            variance=self.variance, l1_sensitivity=self.l1_sensitivity, l2_sensitivity=self.l2_sensitivity
        )

    @property
    def noise_std(self) -> float:
        """Standard deviation per coordinate of the accounted noise, in update units."""
        return math.sqrt(self.variance) / self.scale


def _noise_bound(variance: float, *, dimension: int) -> float:
    """The smallest ``t`` (to 0.1%) with ``dimension * P(|noise| >= t) <= WRAP_PROBABILITY``."""
    if variance == 0:
        return 0.0
    low, high = 0.0, math.sqrt(variance)
    while dimension * skellam_tail(variance=variance, threshold=high) > WRAP_PROBABILITY:
        low, high = high, 2 * high
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        if dimension * skellam_tail(variance=variance, threshold=middle) > WRAP_PROBABILITY:
            low = middle
        else:
            high = middle
    return high


def plan_distributed_noise(
    *,
    clipping_norm: float,
    noise_multiplier: float,
    max_clients: int,
    dimension: int,
    modulus: int,
    dropout_tolerance: float,
) -> NoisePlan:
    """The finest integer grid on which up to ``max_clients`` noisy clients sum without wrapping.

    The accounted variance is ``(noise_multiplier * l2_sensitivity)^2``; with
    dropouts tolerated, every sampled client surviving adds up to
    ``variance / (1 - dropout_tolerance)``. Every coordinate of the sum must
    satisfy ``max_clients * (units + 1) + noise_bound < modulus / 2``.

    Raises
    ------
    ValueError
        If even ``MIN_SCALE_UNITS`` levels per ``clipping_norm`` do not fit:
        too many clients or too much noise for ``secure.modulus_range``.
    """
    clipping_norm = check_real("strategy.clipping_norm", clipping_norm, above=0.0)
    noise_multiplier = check_real("strategy.noise_multiplier", noise_multiplier, minimum=0.0)
    dropout_tolerance = check_real("secure.dropout_tolerance", dropout_tolerance, minimum=0.0, maximum=0.9)
    check_int("max_clients", max_clients, minimum=1)
    check_int("dimension", dimension, minimum=1)
    root_d = math.sqrt(dimension)

    def plan(units: int) -> NoisePlan:
        l2 = units + root_d
        variance = (noise_multiplier * l2) ** 2
        return NoisePlan(
            scale=units / clipping_norm,
            l2_sensitivity=l2,
            l1_sensitivity=root_d * l2,
            variance=variance,
            dropout_tolerance=dropout_tolerance,
            noise_bound=_noise_bound(variance / (1 - dropout_tolerance), dimension=dimension),
        )

    def fits(units: int) -> bool:
        candidate = plan(units)
        within = max_clients * (units + 1) + candidate.noise_bound < modulus / 2
        return within and candidate.variance / 2 <= MAX_POISSON_MEAN

    if not fits(MIN_SCALE_UNITS):
        raise ValueError(
            f"secure.modulus_range={modulus}: {max_clients} clients with noise_multiplier={noise_multiplier:g} "
            f"do not fit {MIN_SCALE_UNITS} levels per clipping_norm"
        )
    low, high = MIN_SCALE_UNITS, MAX_SCALE_UNITS
    if fits(high):
        return plan(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return plan(low)


@dataclass(frozen=True)
class DistributedDPEncoding:
    """A client's clipped, weighted, scaled update plus its share of Skellam noise.

    Parameters
    ----------
    clipping_norm : float
        L2 bound of the update (the strategy's).
    weighted, weight_cap : bool, float
        Bounded weights as in :class:`strategies.DPFedAvg`.
    scale : float
        From the run's :class:`NoisePlan`.
    variance_per_client : float
        This round's share of the noise (:meth:`NoisePlan.variance_per_client`).
    """

    clipping_norm: float
    weighted: bool
    weight_cap: float
    scale: float
    variance_per_client: float

    def encode(self, update: np.ndarray, *, num_examples: float, rng: np.random.Generator) -> np.ndarray:
        """The integer vector this client contributes (noise included)."""
        (clipped,), _ = clip_to_norm([update], clipping_norm=self.clipping_norm)
        weight = bounded_weight(num_examples, weight_cap=self.weight_cap, weighted=self.weighted)
        signal = stochastic_round(clipped * (weight * self.scale), rng=rng)
        return signal + sample_skellam(self.variance_per_client, size=signal.size, rng=rng)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The noisy sum of clipped, weighted updates (before the strategy's denominator)."""
        return total.astype(np.float64) / self.scale

    def length(self, dimension: int) -> int:
        """Integers per client for a model of ``dimension`` values."""
        return dimension
