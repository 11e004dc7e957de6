"""Local differential privacy: the mechanisms a client applies to its own update.

Under local DP no party is trusted: each client privatizes its model update
before it leaves, and everything downstream is post-processing. The adjacency
is the one of local DP, *any two updates* of the client (replace-one): after
clipping to norm ``C`` two updates differ by at most ``2 C``, so the
sensitivity is ``2 C`` in the clipping norm's geometry.

- Laplace: clip in L1 to ``C``, add ``Laplace(0, 2 C / epsilon)`` to every
  coordinate; each release is ``(epsilon, 0)``-DP.
- Gaussian: clip in L2 to ``C``, add ``N(0, (z * 2 C)^2)``; each release is a
  Gaussian mechanism with noise multiplier ``z``.

All functions are pure: they return new arrays and never modify their inputs.
Noise comes from the ``rng`` the caller passes (the operating system's entropy
in a private run); there is no global generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from fedpriv.checks import check_real, fail
from fedpriv.privacy.mechanisms import clip_to_norm


def l1_norm(arrays: Sequence[np.ndarray]) -> float:
    """Global L1 norm of a list of arrays, as if they were one flat vector (float64)."""
    return float(sum(np.sum(np.abs(np.asarray(array, dtype=np.float64))) for array in arrays))


def clip_l1(arrays: Sequence[np.ndarray], *, max_norm: float) -> tuple[list[np.ndarray], float]:
    """Scale ``arrays`` so that their global L1 norm is at most ``max_norm``.

    Parameters
    ----------
    arrays : sequence of numpy.ndarray
        The update, one array per layer; left untouched.
    max_norm : float
        ``C > 0``.

    Returns
    -------
    clipped : list of numpy.ndarray
        New arrays, the update times ``min(1, C / norm)``, in the input dtypes.
    norm : float
        The L1 norm before clipping.

    Raises
    ------
    ValueError
        If ``max_norm`` is not positive, or the update holds ``inf`` or ``nan``.
    """
    max_norm = check_real("max_norm", max_norm, above=0.0)
    norm = l1_norm(arrays)
    if not math.isfinite(norm):
        raise fail("update L1 norm", norm, "must be finite; the update holds inf or nan")
    # A float32 product can round up past C: shrink the factor by a few ulps.
    scale = min(1.0, max_norm / norm * (1 - 1e-6)) if norm > 0 else 1.0
    return [(np.asarray(array) * scale).astype(np.asarray(array).dtype, copy=False) for array in arrays], norm


def clip_l2(arrays: Sequence[np.ndarray], *, max_norm: float) -> tuple[list[np.ndarray], float]:
    """Scale ``arrays`` so that their global L2 norm is at most ``max_norm``.

    The same clipping as server-side DP-FedAvg
    (:func:`fedpriv.privacy.mechanisms.clip_to_norm`).

    Returns
    -------
    clipped : list of numpy.ndarray
        New arrays.
    norm : float
        The L2 norm before clipping.
    """
    max_norm = check_real("max_norm", max_norm, above=0.0)
    return clip_to_norm(arrays, clipping_norm=max_norm)


def laplace_mechanism(
    values: Sequence[np.ndarray], *, l1_sensitivity: float, epsilon: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Add ``Laplace(0, l1_sensitivity / epsilon)`` noise to every coordinate.

    Parameters
    ----------
    values : sequence of numpy.ndarray
        What is released, one array per layer; left untouched.
    l1_sensitivity : float
        The largest L1 distance between the values of two adjacent inputs, ``> 0``.
    epsilon : float
        Privacy of this one release, ``> 0``: it is ``(epsilon, 0)``-DP.
    rng : numpy.random.Generator
        Source of the noise.

    Returns
    -------
    list of numpy.ndarray
        New arrays in the input dtypes.

    Raises
    ------
    ValueError
        Naming ``l1_sensitivity`` or ``epsilon`` if it is not a finite positive number.
    """
    sensitivity = check_real("l1_sensitivity", l1_sensitivity, above=0.0)
    epsilon = check_real("epsilon", epsilon, above=0.0)
    scale = sensitivity / epsilon
    return _with_noise(values, lambda shape: rng.laplace(0.0, scale, size=shape))


def gaussian_mechanism(
    values: Sequence[np.ndarray], *, l2_sensitivity: float, noise_multiplier: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Add ``N(0, (noise_multiplier * l2_sensitivity)^2)`` noise to every coordinate.

    Parameters
    ----------
    values : sequence of numpy.ndarray
        What is released; left untouched.
    l2_sensitivity : float
        The largest L2 distance between the values of two adjacent inputs, ``> 0``.
    noise_multiplier : float
        Noise standard deviation in units of the sensitivity, ``> 0``.
    rng : numpy.random.Generator
        Source of the noise.

    Returns
    -------
    list of numpy.ndarray
        New arrays in the input dtypes.

    Raises
    ------
    ValueError
        Naming ``l2_sensitivity`` or ``noise_multiplier`` if it is not a finite positive number.
    """
    sensitivity = check_real("l2_sensitivity", l2_sensitivity, above=0.0)
    noise_multiplier = check_real("noise_multiplier", noise_multiplier, above=0.0)
    std = noise_multiplier * sensitivity
    return _with_noise(values, lambda shape: rng.normal(0.0, std, size=shape))


def _with_noise(values: Sequence[np.ndarray], draw: Callable[[tuple[int, ...]], np.ndarray]) -> list[np.ndarray]:
    # Added in float64, then back to each array's dtype.
    return [
        (np.asarray(array, dtype=np.float64) + draw(np.shape(array))).astype(np.asarray(array).dtype, copy=False)
        for array in values
    ]
