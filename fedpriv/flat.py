"""A model's arrays as one flat vector and back: what secure aggregation, CKKS and compression carry.

(:mod:`fedpriv.audit.canaries` has the floating-point-only pair the audit needs.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def flat_vector(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """``arrays`` one after the other as one float64 vector (a new array)."""
    return np.concatenate([np.asarray(array, dtype=np.float64).ravel() for array in arrays])


def split_like(vector: np.ndarray, like: Sequence[np.ndarray], *, dtype: np.dtype | None = None) -> list[np.ndarray]:
    """``vector`` cut into arrays of ``like``'s shapes, in order, in ``like``'s dtypes (or ``dtype``).

    Raises
    ------
    ValueError
        If ``vector`` does not hold exactly as many values as ``like``.
    """
    sizes = [int(np.size(array)) for array in like]
    if np.shape(vector) != (sum(sizes),):
        raise ValueError(f"a flat vector of shape {np.shape(vector)} for a model of {sum(sizes)} values")
    pieces, start = [], 0
    for array, size in zip(like, sizes, strict=True):
        piece = vector[start : start + size].reshape(np.shape(array))
        pieces.append(piece.astype(dtype or np.asarray(array).dtype))
        start += size
    return pieces
