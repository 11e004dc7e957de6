"""The ``secure`` config group: ``secure=none`` (default) and ``secure=secagg``.

The parameters of :class:`SecAggPlus` mean what they mean in Flower's legacy
``SecAggPlusWorkflow`` and are validated by the same rules, each failure one
``ValueError`` naming ``secure.<key>`` and its value.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

from fedpriv.checks import check_int, check_real, fail

MAX_MODULUS_RANGE = 2**32
"""Masked values travel as ``uint32``: no larger than a float32 update."""


@dataclass(frozen=True)
class NoSecureAggregation:
    """``secure=none``: the server sees each client's update, as in plain FedAvg."""

    name = "none"
    enabled = False


@dataclass(frozen=True)
class RoundPlan:
    """The numbers of one round's protocol, from the number of sampled clients."""

    num_sampled: int
    num_shares: int
    threshold: int


@dataclass(frozen=True)
class SecAggPlus:
    """``secure=secagg``: every training round runs SecAgg+ (Bell et al., CCS 2020).

    The server learns only the sum of the survivors' integer vectors (modulo
    ``modulus_range``). Each client's secrets are Shamir-shared among its
    ``num_shares`` neighbours (itself included), ``reconstruction_threshold``
    of which rebuild a dropped client's masks or a survivor's self-mask.

    Parameters
    ----------
    num_shares : int or float
        Neighbours of each client (itself included), an integer > 2, or a
        fraction of the round's sampled clients (1.0: everyone, plain SecAgg).
    reconstruction_threshold : int or float
        Shares that rebuild a secret: an integer < ``num_shares`` (>= 2), or a
        fraction of ``num_shares`` in ``(0, 1]`` (at least 2 shares).
    clipping_range : float
        Without DP: each coordinate of a client's weighted update is clipped
        to ``[-clipping_range, clipping_range]`` before quantization.
    quantization_range : int
        Without DP: integer levels over ``[-clipping_range, clipping_range]``.
    modulus_range : int
        Masks and sums are taken modulo this power of 2, at most ``2**32``.
    timeout : float
        Seconds each of the three protocol stages after the training one waits
        for replies (training waits ``round_timeout``).
    max_weight : float
        Without DP: the example count at which a client's weight reaches its
        largest quantized value; a larger client is counted as ``max_weight``
        examples.
    dropout_tolerance : float
        With DP: the fraction of a round's sampled clients that may drop out
        while the sum still carries the accounted noise (each client adds a
        correspondingly larger share); a round with more dropouts is refused
        before anything is unmasked. In ``[0, 0.9]``.
    """

    num_shares: float = 1.0
    reconstruction_threshold: float = 0.6
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    timeout: float = 60.0
    max_weight: float = 1000.0
    dropout_tolerance: float = 0.2

    name = "secagg"
    enabled = True

    def __post_init__(self) -> None:
        """Validate as Flower's ``SecAggPlusWorkflow`` does, with one-line messages."""
        _check_count_or_fraction("secure.num_shares", self.num_shares, integer_minimum=3)
        _check_count_or_fraction("secure.reconstruction_threshold", self.reconstruction_threshold, integer_minimum=2)
        if _is_count(self.num_shares) and _is_count(self.reconstruction_threshold):
            if self.reconstruction_threshold >= self.num_shares:
                raise fail(
                    "secure.reconstruction_threshold",
                    self.reconstruction_threshold,
                    f"must be less than secure.num_shares={self.num_shares}",
                )
        check_real("secure.clipping_range", self.clipping_range, above=0.0, maximum=1e6)
        check_int("secure.quantization_range", self.quantization_range, minimum=2)
        check_int("secure.modulus_range", self.modulus_range, minimum=4, maximum=MAX_MODULUS_RANGE)
        if self.modulus_range & (self.modulus_range - 1):
            raise fail("secure.modulus_range", self.modulus_range, "must be a power of 2")
        if self.modulus_range <= 2 * self.quantization_range:
            raise fail(
                "secure.modulus_range",
                self.modulus_range,
                f"must exceed 2 * secure.quantization_range = {2 * self.quantization_range}",
            )
        check_real("secure.timeout", self.timeout, above=0.0, maximum=1e6)
        check_real("secure.max_weight", self.max_weight, above=0.0, maximum=1e12)
        check_real("secure.dropout_tolerance", self.dropout_tolerance, minimum=0.0, maximum=0.9)

    @property
    def max_weighted_clients(self) -> int:
        """Most clients whose quantized, weighted values sum without wrapping around the modulus."""
        return self.modulus_range // (2 * self.quantization_range) - 1

    def plan(self, num_sampled: int) -> RoundPlan:
        """Shares and threshold for a round with ``num_sampled`` clients (Flower's rules).

        A fractional ``num_shares`` is rounded and raised to every client when
        it would be 2 or less; an even count below ``num_sampled`` is made
        odd. A fractional threshold is rounded and at least 2. Both are capped
        at ``num_sampled``.
        """
        check_int("num_sampled", num_sampled, minimum=2)
        if _is_count(self.num_shares):
            shares = int(self.num_shares)
        else:
            shares = round(self.num_shares * num_sampled)
            if shares < num_sampled and shares % 2 == 0:
                shares += 1
            if shares <= 2:
                shares = num_sampled
        if shares < num_sampled and shares % 2 == 0:
            # A ring neighbourhood is symmetric only with an odd count.
            shares += 1
        shares = min(shares, num_sampled)
        if _is_count(self.reconstruction_threshold):
            threshold = int(self.reconstruction_threshold)
        else:
            threshold = max(round(self.reconstruction_threshold * shares), 2)
        return RoundPlan(num_sampled=num_sampled, num_shares=shares, threshold=min(threshold, shares))


def _is_count(value: float) -> bool:
    # Flower reads the integer 1 as the fraction 1.0.
    return isinstance(value, Integral) and value != 1


def _check_count_or_fraction(key: str, value: object, *, integer_minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise fail(key, value, f"must be an integer >= {integer_minimum} or a fraction in (0, 1]")
    if isinstance(value, Integral):
        if value != 1 and value < integer_minimum:
            raise fail(key, value, f"as an integer must be >= {integer_minimum} (or 1, meaning 1.0)")
        return
    if not 0 < value <= 1:
        raise fail(key, value, "as a fraction must be in (0, 1]")
