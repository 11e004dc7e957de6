"""Robust aggregation: combining clients' models so that a few harmful ones cannot steer the result.

Against clients that send well-formed but harmful models (scaled, flipped or
random updates), the mean has no defence: one client moves it arbitrarily far.
These rules bound what a minority can do:

- ``median``: the coordinate-wise median (Yin et al. 2018);
- ``trimmed_mean``: per coordinate, the mean after dropping the
  ``floor(trim_fraction * n)`` largest and as many smallest values (Yin et
  al. 2018);
- ``krum``: the one model whose ``n - f - 2`` nearest neighbours (squared L2
  distance) are closest, for ``f`` assumed attackers (Blanchard et al. 2017);
  its guarantee needs ``n >= 2 f + 3``.

Each rule treats every client alike: ``num-examples`` weights are not used (a
client could claim any count; Flower's ``FedMedian``, ``FedTrimmedAvg`` and
``Krum`` ignore them too). They compute what Flower's do, over lists of
per-client arrays (one array per layer), and write into nothing they are given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedpriv.checks import check_choice, check_int, check_real
from fedpriv.flat import flat_vector

AGGREGATORS = ("mean", "median", "trimmed_mean", "krum")
MAX_BYZANTINE = 10**7

ClientArrays = Sequence[Sequence[np.ndarray]]
"""One entry per client: its model (or update), one array per layer, in the same order."""


def coordinate_median(client_arrays: ClientArrays) -> list[np.ndarray]:
    """The coordinate-wise median of the clients' arrays, layer by layer."""
    return [np.median(np.stack(layers), axis=0) for layers in zip(*client_arrays, strict=True)]


def trimmed_count(num_clients: int, *, trim_fraction: float) -> int:
    """Values cut from each end of a coordinate: ``floor(trim_fraction * num_clients)``."""
    return int(trim_fraction * num_clients)


def trimmed_mean(client_arrays: ClientArrays, *, trim_fraction: float) -> list[np.ndarray]:
    """Per coordinate, the mean of the clients' values without the ``k`` largest and ``k`` smallest.

    ``k = floor(trim_fraction * n)`` for ``n`` clients (:func:`trimmed_count`),
    so ``trim_fraction`` in ``[0, 0.5)`` always leaves a value.
    """
    cut = trimmed_count(len(client_arrays), trim_fraction=trim_fraction)
    kept = slice(cut, len(client_arrays) - cut)
    return [np.sort(np.stack(layers), axis=0)[kept].mean(axis=0) for layers in zip(*client_arrays, strict=True)]


def krum_scores(client_arrays: ClientArrays, *, num_byzantine: int) -> np.ndarray:
    """Each client's Krum score: the summed squared distances to its ``n - f - 2`` nearest others (at least 1)."""
    flat = np.stack([flat_vector(arrays) for arrays in client_arrays])
    # Differences, not |x|^2 + |y|^2 - 2 x.y: models far from the origin and
    # close to each other would lose their distances to cancellation.
    distances = np.stack([np.sum((flat - row) ** 2, axis=1) for row in flat])
    count = len(client_arrays)
    nearest = max(1, count - num_byzantine - 2)
    return np.array(
        [np.sort(np.delete(distances[i], i))[:nearest].sum() for i in range(count)], dtype=np.float64
    )


def krum_choice(client_arrays: ClientArrays, *, num_byzantine: int) -> int:
    """The index of the client Krum keeps: the lowest score of :func:`krum_scores`."""
    return int(np.argmin(krum_scores(client_arrays, num_byzantine=num_byzantine)))


@dataclass(frozen=True)
class RobustAggregation:
    """Which rule combines a round's valid models (``strategy.aggregator`` and its settings).

    Parameters
    ----------
    name : str
        ``mean`` (the example-weighted mean: the strategy's own), ``median``,
        ``trimmed_mean`` or ``krum``.
    trim_fraction : float
        ``trimmed_mean``: the fraction cut from each end, in ``[0, 0.5)``.
    num_byzantine : int
        ``krum``: the number of attackers ``f`` assumed, ``>= 0``.
    """

    name: str = "mean"
    trim_fraction: float = 0.2
    num_byzantine: int = 0

    def __post_init__(self) -> None:
        """Validate the settings.

        Raises
        ------
        ValueError
            ``strategy.<key>=<value>: <rule>`` for the first bad setting.
        """
        check_choice("strategy.aggregator", self.name, AGGREGATORS)
        check_real("strategy.trim_fraction", self.trim_fraction, minimum=0.0, below=0.5)
        check_int("strategy.num_byzantine", self.num_byzantine, minimum=0, maximum=MAX_BYZANTINE)

    @property
    def enabled(self) -> bool:
        """Whether a robust rule replaces the weighted mean."""
        return self.name != "mean"

    def combine(self, client_arrays: ClientArrays, *, node_ids: Sequence[int]) -> tuple[list[np.ndarray], dict[str, int]]:
        """The robust aggregate of ``client_arrays`` (one entry per node of ``node_ids``) and what it measured.

        Returns
        -------
        arrays : list of numpy.ndarray
            The aggregate, one array per layer.
        stats : dict
            ``trimmed_per_coordinate`` (values dropped per coordinate, both
            ends together) for ``trimmed_mean``; ``krum_node_id`` (the node
            whose model was kept) for ``krum``; empty for ``median``.
        """
        if self.name == "median":
            return coordinate_median(client_arrays), {}
        if self.name == "trimmed_mean":
            cut = trimmed_count(len(client_arrays), trim_fraction=self.trim_fraction)
            return trimmed_mean(client_arrays, trim_fraction=self.trim_fraction), {"trimmed_per_coordinate": 2 * cut}
        if self.name == "krum":
            chosen = krum_choice(client_arrays, num_byzantine=self.num_byzantine)
            return [np.array(layer) for layer in client_arrays[chosen]], {"krum_node_id": int(node_ids[chosen])}
        raise ValueError(f"strategy.aggregator={self.name!r}: the weighted mean is the strategy's own")
