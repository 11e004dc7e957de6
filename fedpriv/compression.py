"""The ``compression`` config group: what a client sends instead of its whole model.

A client compresses its update (its trained model minus the model it
received) as one flat vector, in the model's array order, into two arrays
(one payload of few arrays: Flower adds a header to every array); the server
decodes it back into a dense update before it validates and aggregates, so
everything downstream (clipping, weighting, DP) sees an ordinary update. The
encode and decode functions are pure and tested on their own:

* :class:`Quantize` (Suresh et al. 2017, QSGD): each block of ``block_size``
  values is scaled by its largest magnitude and rounded stochastically to
  one of ``2**bits`` levels spanning ``[-scale, scale]``: unbiased, ``bits``
  bits per value plus one float32 scale per block.
* :class:`TopK` (Stich et al. 2018): the ``fraction`` largest-magnitude
  entries of the update, as int32 indices and float32 values; what was left
  out is kept in the client's state and added to its next update (error
  feedback).

A payload that does not decode into the global model's shapes is rejected
like any malformed reply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedpriv.checks import check_choice, check_int, check_real

QUANTIZE_BITS = (1, 2, 4, 8)
PAYLOAD = "update"
"""Prefix of the payload's array names: ``update#codes``, ``update#scale``, ``update#index``, ``update#value``."""
SCALE_SUFFIX = "#scale"
CODES_SUFFIX = "#codes"
INDEX_SUFFIX = "#index"
VALUE_SUFFIX = "#value"
RESIDUAL_RECORD = "fedpriv.compression.residual"
"""Name of the ``ArrayRecord`` in a client's state holding top-k's error feedback."""


class CompressionError(ValueError):
    """A compressed payload that does not decode; the message says what is wrong."""


@dataclass(frozen=True)
class NoCompression:
    """``compression=none``: the client sends its whole model (float32)."""

    name = "none"
    enabled = False


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integers below ``2**bits`` into bytes, ``8 // bits`` per byte (little end first)."""
    per_byte = 8 // bits
    padded = np.zeros(-(-codes.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: codes.size] = codes
    groups = padded.reshape(-1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(groups << shifts, axis=1).astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int, size: int) -> np.ndarray:
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    codes = (packed[:, None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(-1)[:size]


@dataclass(frozen=True)
class Quantize:
    """``compression=quantize``: unbiased stochastic quantization of the update.

    Parameters
    ----------
    bits : int
        Bits per value: 1, 2, 4 or 8.
    block_size : int
        Values sharing one scale (their largest magnitude).
    """

    bits: int = 8
    block_size: int = 256

    name = "quantize"
    enabled = True

    def __post_init__(self) -> None:
        """Validate the settings."""
        check_choice("compression.bits", self.bits, QUANTIZE_BITS)
        check_int("compression.block_size", self.block_size, minimum=8, maximum=2**20)

    @property
    def levels(self) -> int:
        """Intervals between the ``2**bits`` levels."""
        return (1 << self.bits) - 1

    def encode(self, name: str, update: np.ndarray, *, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """``{name: packed codes (uint8), name#scale: block scales (float32)}`` of one array."""
        flat = np.asarray(update, dtype=np.float64).ravel()
        blocks = -(-flat.size // self.block_size)
        padded = np.zeros(blocks * self.block_size)
        padded[: flat.size] = flat
        padded = padded.reshape(blocks, self.block_size)
        largest = np.max(np.abs(padded), axis=1)
        scales = largest.astype(np.float32)
        # Rounded up to float32, so every value lies inside [-scale, scale]: no clipping, no bias.
        scales = np.where(scales < largest, np.nextafter(scales, np.float32(np.inf)), scales).astype(np.float32)
        safe = np.where(scales > 0, scales, 1.0)[:, None]
        position = (padded / safe + 1.0) / 2.0 * self.levels
        floor = np.floor(position)
        codes = np.clip(floor + (rng.random(position.shape) < position - floor), 0, self.levels)
        return {
            f"{name}{CODES_SUFFIX}": _pack(codes.astype(np.uint8).ravel()[: flat.size], self.bits),
            f"{name}{SCALE_SUFFIX}": scales,
        }

    def decode(self, name: str, payload: Mapping[str, np.ndarray], *, shape: tuple[int, ...]) -> np.ndarray:
        """The dense update of one array.

        Raises
        ------
        CompressionError
            If an array is missing or of the wrong dtype or size, or a scale is
            negative or not finite.
        """
        size = math.prod(shape)
        blocks = -(-size // self.block_size)
        codes = _payload(payload, f"{name}{CODES_SUFFIX}", np.uint8, -(-size * self.bits // 8))
        scales = _payload(payload, f"{name}{SCALE_SUFFIX}", np.float32, blocks)
        if not np.all(np.isfinite(scales)) or np.any(scales < 0):
            raise CompressionError(f"array '{name}': scales must be finite and >= 0")
        values = _unpack(codes, self.bits, size).astype(np.float64) / self.levels * 2.0 - 1.0
        per_value = np.repeat(scales.astype(np.float64), self.block_size)[:size]
        return (values * per_value).reshape(shape)

    def expected_names(self, name: str) -> tuple[str, ...]:
        """The arrays an update becomes."""
        return (f"{name}{CODES_SUFFIX}", f"{name}{SCALE_SUFFIX}")


@dataclass(frozen=True)
class TopK:
    """``compression=topk``: the largest-magnitude entries of the update, with error feedback.

    Parameters
    ----------
    fraction : float
        Share of the update's entries sent (at least one).
    """

    fraction: float = 0.1

    name = "topk"
    enabled = True

    def __post_init__(self) -> None:
        """Validate the setting."""
        check_real("compression.fraction", self.fraction, above=0.0, maximum=1.0)

    def k(self, size: int) -> int:
        """Entries kept of an array of ``size``."""
        return min(size, max(1, round(self.fraction * size)))

    def encode(self, name: str, update: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``({name#index, name#value}, residual)``: the kept entries and what was left out (dense)."""
        flat = np.asarray(update, dtype=np.float64).ravel()
        keep = np.sort(np.argpartition(np.abs(flat), flat.size - self.k(flat.size))[flat.size - self.k(flat.size) :])
        values = flat[keep].astype(np.float32)
        residual = flat.copy()
        residual[keep] -= values
        payload = {f"{name}{INDEX_SUFFIX}": keep.astype(np.int32), f"{name}{VALUE_SUFFIX}": values}
        return payload, residual.reshape(np.shape(update))

    def decode(self, name: str, payload: Mapping[str, np.ndarray], *, shape: tuple[int, ...]) -> np.ndarray:
        """The dense update of one array.

        Raises
        ------
        CompressionError
            If an array is missing or of the wrong dtype or size, an index is
            out of range or repeated, or a value is not finite.
        """
        size = math.prod(shape)
        k = self.k(size)
        index = _payload(payload, f"{name}{INDEX_SUFFIX}", np.int32, k)
        values = _payload(payload, f"{name}{VALUE_SUFFIX}", np.float32, k)
        if np.any(index < 0) or np.any(index >= size) or np.unique(index).size != k:
            raise CompressionError(f"array '{name}': indices must be {k} distinct values in [0, {size})")
        if not np.all(np.isfinite(values)):
            raise CompressionError(f"array '{name}': values must be finite")
        dense = np.zeros(size)
        dense[index] = values
        return dense.reshape(shape)

    def expected_names(self, name: str) -> tuple[str, ...]:
        """The arrays an update becomes."""
        return (f"{name}{INDEX_SUFFIX}", f"{name}{VALUE_SUFFIX}")


def _payload(payload: Mapping[str, np.ndarray], key: str, dtype: type, size: int) -> np.ndarray:
    if key not in payload:
        raise CompressionError(f"array '{key}' missing")
    value = payload[key]
    if value.dtype != np.dtype(dtype) or value.ndim != 1 or value.size != size:
        raise CompressionError(
            f"array '{key}': expected {size} {np.dtype(dtype)} values, got {value.size} {value.dtype} of shape {value.shape}"
        )
    return value


def check_names(compression: Quantize | TopK, payload_names: set[str]) -> None:
    """Refuse a payload with other arrays than the compression's two.

    Raises
    ------
    CompressionError
        Naming the unexpected or missing arrays.
    """
    expected = set(compression.expected_names(PAYLOAD))
    extra, missing = sorted(payload_names - expected), sorted(expected - payload_names)
    if extra or missing:
        raise CompressionError(f"compressed payload: missing arrays {missing[:3]}, unexpected arrays {extra[:3]}")
