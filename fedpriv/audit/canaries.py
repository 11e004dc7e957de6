"""Canaries of the one-run audit: who is included, what each one contributes.

Everything is derived from the audit seed, so the server (which scores the
canaries) and the clients (which hold record canaries) rebuild the same
canaries without exchanging them, and a results folder whose config holds the
seed can be re-scored. The seed therefore has to stay with the auditor: the
audit measures what someone who does *not* know the coins can infer.

Two kinds, matching the two privacy levels (docs/design.md, section 4):

* **Client canaries** (client-level DP, ``strategy=dp_fixed/dp_adaptive``):
  canary client ``i`` holds a fixed random unit direction ``u_i`` over every
  floating-point coordinate of the model. If its coin says "include", it joins
  the federation: every round it is Poisson-sampled with the strategy's
  ``sample_rate`` like any client, and when sampled it submits the update
  ``clipping_norm * u_i`` (the largest the clipping allows), which the server
  clips, weights (1) and averages before adding noise. Its score is the
  alignment ``<theta_T - theta_0, u_i>`` of the whole released model change
  with its direction.
* **Record canaries** (record-level DP, ``client=opacus``): canary record
  ``i`` is a random input (standard normal, the scale of the normalised data)
  with a random label. If its coin says "include" it is appended to the
  training data of client ``i mod num_clients``. Its score is minus the
  final model's loss on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedpriv.checks import check_int

# Domain tags keep the random streams of coins, directions, sampling and
# records independent although they share the audit seed.
_COINS, _DIRECTIONS, _SAMPLING, _RECORDS = 0, 1, 2, 3


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([check_int("audit.seed", seed, minimum=0), *tags]))


def canary_coins(*, seed: int, num_canaries: int) -> np.ndarray:
    """Which canaries are included: independent fair coins.

    Parameters
    ----------
    seed : int
        The audit seed, ``>= 0``.
    num_canaries : int
        ``m >= 1``.

    Returns
    -------
    numpy.ndarray
        Boolean array of length ``m``; ``True`` means included.
    """
    count = check_int("audit.num_canaries", num_canaries, minimum=1)
    return _rng(seed, _COINS).random(count) < 0.5


def is_floating(array: np.ndarray) -> bool:
    """Whether canary directions have coordinates in ``array`` (floating dtypes only)."""
    return np.issubdtype(np.asarray(array).dtype, np.floating)


def canary_dimension(like: Sequence[np.ndarray]) -> int:
    """Number of floating-point coordinates of a model given as arrays."""
    return sum(int(np.size(array)) for array in like if is_floating(array))


def canary_direction(*, seed: int, index: int, dimension: int) -> np.ndarray:
    """Random unit vector of canary client ``index``, uniform on the sphere.

    Generated from ``(seed, index)`` alone, so a direction costs ``dimension``
    normal draws and nothing has to be stored between rounds.

    Returns
    -------
    numpy.ndarray
        float64 vector of length ``dimension`` and L2 norm 1.
    """
    size = check_int("dimension", dimension, minimum=1)
    vector = _rng(seed, _DIRECTIONS, check_int("index", index, minimum=0)).standard_normal(size)
    return vector / np.linalg.norm(vector)


def split_like(vector: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Cut a flat vector into arrays shaped and typed like ``like``.

    Floating arrays take the next coordinates of ``vector`` in order; other
    arrays (integer buffers) get zeros, because canaries only move weights.

    Raises
    ------
    ValueError
        If ``vector`` does not have :func:`canary_dimension` coordinates.
    """
    if vector.shape != (canary_dimension(like),):
        raise ValueError(f"vector of shape {vector.shape}: the model has {canary_dimension(like)} coordinates")
    pieces, start = [], 0
    for array in like:
        if is_floating(array):
            size = int(np.size(array))
            pieces.append(vector[start : start + size].reshape(np.shape(array)).astype(array.dtype))
            start += size
        else:
            pieces.append(np.zeros_like(array))
    return pieces


def flatten_floating(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The floating coordinates of ``arrays`` as one float64 vector (inverse of :func:`split_like`)."""
    return np.concatenate(
        [np.asarray(array, dtype=np.float64).ravel() for array in arrays if is_floating(array)]
    )


def sampled_canaries(*, seed: int, coins: np.ndarray, sample_rate: float, server_round: int) -> list[int]:
    """Included canary clients that take part in ``server_round``.

    Each included canary joins independently with probability ``sample_rate``,
    the Poisson sampling every real client goes through, so a canary is
    audited under exactly the mechanism that the accounting covers. The draw
    depends only on ``(seed, server_round)``: a resumed run samples the same.

    Returns
    -------
    list of int
        Sorted canary indices.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate!r}: must be in (0, 1]")
    joins = _rng(seed, _SAMPLING, check_int("server_round", server_round, minimum=0)).random(len(coins))
    return [int(i) for i in np.flatnonzero(np.asarray(coins, dtype=bool) & (joins < sample_rate))]


def alignment_scores(
    *, seed: int, num_canaries: int, initial: Sequence[np.ndarray], final: Sequence[np.ndarray]
) -> np.ndarray:
    """Score of each canary client: ``<final - initial, u_i>``.

    Parameters
    ----------
    seed : int
        The audit seed.
    num_canaries : int
        ``m``.
    initial, final : sequence of numpy.ndarray
        The global model before the first round and after the last, in the
        same layer order; left untouched.

    Returns
    -------
    numpy.ndarray
        float64 scores of length ``m``.
    """
    change = flatten_floating(final) - flatten_floating(initial)
    return np.array(
        [
            float(change @ canary_direction(seed=seed, index=i, dimension=change.size))
            for i in range(check_int("audit.num_canaries", num_canaries, minimum=1))
        ]
    )


class CanaryClients:
    """The server's source of canary-client updates (the strategy's ``extra_updates``).

    Called once per round by :class:`strategies.DPFedAvg` with the round's
    mechanism parameters; returns the updates of the included canaries that
    Poisson sampling picked for that round. Holds no state besides the coins,
    so calling it again for a round gives the same updates.

    Parameters
    ----------
    seed : int
        The audit seed.
    num_canaries : int
        ``m``, canary clients in the game (about half are included).
    """

    def __init__(self, *, seed: int, num_canaries: int) -> None:
        self.seed = seed
        self.coins = canary_coins(seed=seed, num_canaries=num_canaries)

    def __call__(
        self, *, server_round: int, clipping_norm: float, sample_rate: float, like: Sequence[np.ndarray]
    ) -> list[list[np.ndarray]]:
        """This round's canary updates, each about ``clipping_norm * u_i``, shaped like ``like``.

        Parameters
        ----------
        server_round : int
            The round being aggregated.
        clipping_norm : float
            The norm the server clips to in this round.
        sample_rate : float
            The strategy's Poisson sampling rate.
        like : sequence of numpy.ndarray
            The global model's arrays (shapes and dtypes of an update).

        Returns
        -------
        list of list of numpy.ndarray
            One update per sampled included canary.
        """
        dimension = canary_dimension(like)
        # Just under the clipping norm after rounding to the model's dtype, so
        # the server's clipping leaves a canary alone and adaptive clipping
        # always counts it as unclipped, instead of by rounding luck.
        norm = clipping_norm * (1 - 1e-5)
        return [
            split_like(norm * canary_direction(seed=self.seed, index=i, dimension=dimension), like)
            for i in sampled_canaries(
                seed=self.seed, coins=self.coins, sample_rate=sample_rate, server_round=server_round
            )
        ]


def canary_records(
    *, seed: int, num_canaries: int, input_shape: Sequence[int], num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``m`` record canaries: standard normal inputs with uniform random labels.

    Returns
    -------
    x : torch.Tensor
        float32, shape ``[m, *input_shape]``.
    y : torch.Tensor
        int64, shape ``[m]``.
    """
    count = check_int("audit.num_canaries", num_canaries, minimum=1)
    classes = check_int("num_classes", num_classes, minimum=2)
    rng = _rng(seed, _RECORDS)
    x = rng.standard_normal((count, *input_shape)).astype(np.float32)
    y = rng.integers(0, classes, size=count)
    return torch.from_numpy(x), torch.from_numpy(y).long()


def client_canary_indices(*, coins: np.ndarray, partition_id: int, num_partitions: int) -> np.ndarray:
    """Indices of the included record canaries held by one client (``i mod N == partition_id``)."""
    owners = np.arange(len(coins)) % check_int("num_partitions", num_partitions, minimum=1)
    return np.flatnonzero(np.asarray(coins, dtype=bool) & (owners == partition_id))
