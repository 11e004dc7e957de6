"""Aggregation math and reply validation as plain functions (no Grid needed).

A reply is validated against the spec of the global model that was sent: the
same array names, shapes and dtypes, finite values, and a finite
``num-examples`` of at least 1. Each array's bytes are checked against the spec
before they are decoded (size, then the ``.npy`` header), so a reply cannot make
the server allocate more than the model needs, and any failure while decoding
rejects the reply. Anything else raises :class:`RejectedReply` with the reason;
the strategy counts it and the round goes on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.common.constant import SType

from fedpriv.compression import PAYLOAD, CompressionError, check_names
from fedpriv.flat import split_like
from fedpriv.protocol import DECLINE_REASON_KEY, DECLINED_KEY, WEIGHT_KEY

ArraySpec = dict[str, tuple[tuple[int, ...], np.dtype]]

MIN_NUM_EXAMPLES = 1.0
"""Smallest ``num-examples`` a reply may claim (a count below one example is
meaningless, and a weight near 0 underflows when bounded or divided)."""

# An .npy header is padded to a multiple of 64 bytes; numpy warns past 10,000.
_MAX_NPY_HEADER_BYTES = 16_384


class RejectedReply(ValueError):
    """A client reply that cannot be aggregated; the message says why."""


@dataclass(frozen=True)
class TrainReply:
    """A validated training reply.

    Attributes
    ----------
    node_id : int
        The replying node.
    arrays : list[np.ndarray]
        The client's model, in the order of the global model's spec.
    num_examples : float
        The client's ``num-examples``.
    metrics : dict[str, float]
        Its other scalar metrics.
    """

    node_id: int
    arrays: list[np.ndarray]
    num_examples: float
    metrics: dict[str, float]


@dataclass(frozen=True)
class MetricsReply:
    """A validated metrics-only reply: ``num-examples`` and other scalar metrics.

    ``reason`` says why a client declined (empty for other replies).
    """

    node_id: int
    num_examples: float
    metrics: dict[str, float]
    reason: str = ""


def array_spec(record: ArrayRecord) -> ArraySpec:
    """Names, shapes and dtypes of the arrays in ``record``, in order."""
    spec: ArraySpec = {}
    for name, array in record.items():
        value = array.numpy()
        spec[name] = (tuple(value.shape), value.dtype)
    return spec


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _parse_metrics(msg: Message, *, node_id: int) -> tuple[float, dict[str, float]]:
    records = list(msg.content.metric_records.values())
    if len(records) != 1:
        raise RejectedReply(f"node {node_id}: expected one MetricRecord, got {len(records)}")
    metrics = dict(records[0])
    weight = metrics.pop(WEIGHT_KEY, None)
    if weight is None:
        raise RejectedReply(f"node {node_id}: missing '{WEIGHT_KEY}'")
    if not _is_number(weight):
        raise RejectedReply(f"node {node_id}: '{WEIGHT_KEY}'={weight!r} is not a number")
    if not (math.isfinite(weight) and weight >= MIN_NUM_EXAMPLES):
        raise RejectedReply(f"node {node_id}: '{WEIGHT_KEY}'={weight!r} must be a finite number >= {MIN_NUM_EXAMPLES:g}")
    scalars: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, list):
            continue
        if not _is_number(value) or not math.isfinite(value):
            raise RejectedReply(f"node {node_id}: metric '{key}'={value!r} is not a finite number")
        scalars[key] = float(value)
    return float(weight), scalars


def check_error(msg: Message) -> int:
    """The sender of ``msg``; ``RejectedReply`` if ``msg`` is an error reply."""
    node_id = msg.metadata.src_node_id
    if msg.has_error():
        raise RejectedReply(f"node {node_id}: error reply {msg.error.code}: {msg.error.reason}")
    return node_id


def parse_decline(msg: Message) -> MetricsReply | None:
    """The metrics of a decline reply, or ``None`` if ``msg`` is no decline."""
    if msg.has_error() or msg.content.array_records:
        return None
    records = list(msg.content.metric_records.values())
    if len(records) != 1 or records[0].get(DECLINED_KEY) != 1:
        return None
    reply = parse_metrics_reply(msg)
    reason = "record-level privacy budget spent"
    for record in msg.content.config_records.values():
        given = record.get(DECLINE_REASON_KEY)
        if isinstance(given, str) and given:
            reason = given[:500]
    return MetricsReply(
        node_id=reply.node_id,
        num_examples=reply.num_examples,
        metrics={k: v for k, v in reply.metrics.items() if k != DECLINED_KEY},
        reason=reason,
    )


def reported_privacy(msg: Message, *, privacy_keys: Sequence[str]) -> dict[str, float]:
    """The privacy a reply reports under ``privacy_keys`` (``epsilon``, ``delta``, ...), read leniently.

    For replies that are rejected for other reasons: whatever privacy they say
    was spent still counts. Values that are not finite positive numbers are
    ignored, as is everything in an error reply.
    """
    if msg.has_error():
        return {}
    found: dict[str, float] = {}
    for record in msg.content.metric_records.values():
        for key in privacy_keys:
            value = record.get(key)
            if _is_number(value) and math.isfinite(value) and value > 0:
                found[key] = max(found.get(key, 0.0), float(value))
    return found


def parse_train_reply(msg: Message, *, spec: ArraySpec) -> TrainReply:
    """Validate a training reply against the spec of the global model.

    Raises
    ------
    RejectedReply
        For an error reply, a missing/extra/misshapen/wrongly typed or
        non-finite array, or an unusable ``num-examples`` or metric.
    """
    node_id = check_error(msg)
    records = list(msg.content.array_records.values())
    if len(records) != 1:
        raise RejectedReply(f"node {node_id}: expected one ArrayRecord, got {len(records)}")
    record = records[0]
    missing = [name for name in spec if name not in record]
    extra = [name for name in record if name not in spec]
    if missing or extra:
        raise RejectedReply(f"node {node_id}: missing arrays {missing}, unexpected arrays {extra}")
    arrays = []
    for name, (shape, dtype) in spec.items():
        try:
            value = decode_array(record[name], shape=shape, dtype=dtype)
        except RejectedReply as exc:
            raise RejectedReply(f"node {node_id}: array '{name}' {exc}") from exc
        if not np.all(np.isfinite(value)):
            raise RejectedReply(f"node {node_id}: array '{name}' has non-finite values")
        arrays.append(value)
    weight, metrics = _parse_metrics(msg, node_id=node_id)
    return TrainReply(node_id=node_id, arrays=arrays, num_examples=weight, metrics=metrics)


def parse_compressed_reply(
    msg: Message, *, spec: ArraySpec, global_arrays: list[np.ndarray], compression: Any
) -> TrainReply:
    """Decode a compressed training reply into the client's model: the global model plus its update.

    Raises
    ------
    RejectedReply
        For an error reply, a payload that does not decode into the spec's
        arrays (:class:`fedpriv.compression.CompressionError`), a non-finite
        model, or an unusable ``num-examples`` or metric.
    """
    node_id = check_error(msg)
    records = list(msg.content.array_records.values())
    if len(records) != 1:
        raise RejectedReply(f"node {node_id}: expected one ArrayRecord, got {len(records)}")
    record = records[0]
    try:
        check_names(compression, set(record))
        payload = {name: record[name].numpy() for name in record}
        update = compression.decode(PAYLOAD, payload, shape=(sum(base.size for base in global_arrays),))
        arrays = add_flat(global_arrays, update)
    except (CompressionError, ValueError, TypeError) as exc:
        raise RejectedReply(f"node {node_id}: {exc}") from exc
    if not all(np.all(np.isfinite(value)) for value in arrays):
        raise RejectedReply(f"node {node_id}: the decoded model has non-finite values")
    weight, metrics = _parse_metrics(msg, node_id=node_id)
    return TrainReply(node_id=node_id, arrays=arrays, num_examples=weight, metrics=metrics)


def add_flat(arrays: Sequence[np.ndarray], flat_update: np.ndarray) -> list[np.ndarray]:
    """``arrays`` plus a flat update cut to their shapes, in their dtypes (new arrays)."""
    pieces = split_like(flat_update, arrays, dtype=np.float64)
    return [(base + piece).astype(base.dtype) for base, piece in zip(arrays, pieces, strict=True)]


def decode_array(array: Array, *, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Decode a reply's array only if it is what the spec says, without trusting it.

    The declared metadata, the byte count and the ``.npy`` header are checked
    against ``shape`` and ``dtype`` before any data is read, so a header that
    claims a huge shape is refused instead of allocated.

    Raises
    ------
    RejectedReply
        Naming what did not match, or why decoding failed.
    """
    if not isinstance(array, Array) or array.stype != SType.NUMPY:
        raise RejectedReply(f"is not a NumPy array ({getattr(array, 'stype', type(array).__name__)!r})")
    if tuple(array.shape) != shape or array.dtype != str(dtype):
        raise RejectedReply(f"is declared {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}")
    data = array.data
    needed = math.prod(shape) * dtype.itemsize
    if not needed < len(data) <= needed + _MAX_NPY_HEADER_BYTES:
        raise RejectedReply(f"carries {len(data)} bytes, expected {needed} plus a header")
    stream = BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise RejectedReply(f"has .npy format version {version}, expected 1.0 or 2.0")
        header_shape, _, header_dtype = read_header[version](stream)
        if tuple(header_shape) != shape or header_dtype != dtype:
            raise RejectedReply(f"has a header for {header_dtype}{list(header_shape)}, expected {dtype}{list(shape)}")
        value = np.lib.format.read_array(BytesIO(data), allow_pickle=False)
    except RejectedReply:
        raise
    except Exception as exc:  # a peer's bytes can fail in any way; the round must not
        raise RejectedReply(f"cannot be decoded: {type(exc).__name__}: {exc}") from exc
    if value.shape != shape or value.dtype != dtype:
        raise RejectedReply(f"decodes to {value.dtype}{list(value.shape)}, expected {dtype}{list(shape)}")
    return value


def parse_metrics_reply(msg: Message) -> MetricsReply:
    """Validate an evaluation reply (``num-examples`` plus finite scalar metrics)."""
    node_id = check_error(msg)
    weight, metrics = _parse_metrics(msg, node_id=node_id)
    return MetricsReply(node_id=node_id, num_examples=weight, metrics=metrics)


def weighted_average(
    client_arrays: Sequence[Sequence[np.ndarray]], weights: Sequence[float]
) -> list[np.ndarray]:
    """Average each layer over clients with the given (unnormalised) weights.

    Weights are first divided by the largest one, so their sum cannot
    overflow whatever their scale; accumulates in float64 and returns arrays
    in the clients' dtype.
    """
    if not client_arrays or len(client_arrays) != len(weights):
        raise ValueError("need one weight per client and at least one client")
    shares = _normalised(weights)
    averaged = []
    for layers in zip(*client_arrays, strict=True):
        acc = np.zeros(layers[0].shape, dtype=np.float64)
        for layer, share in zip(layers, shares, strict=True):
            acc += layer.astype(np.float64) * share
        averaged.append(acc.astype(layers[0].dtype))
    return averaged


def _normalised(weights: Sequence[float]) -> list[float]:
    """``weights`` as shares summing to 1, computed without overflow or underflow to zero."""
    largest = max(weights)
    scaled = [float(w) / largest for w in weights]
    total = math.fsum(scaled)
    return [w / total for w in scaled]


def weighted_metrics(
    metrics: Sequence[Mapping[str, float]], weights: Sequence[float]
) -> dict[str, float]:
    """Example-weighted mean of each metric that every client reported."""
    if not metrics:
        return {}
    shares = _normalised(weights)
    common = set(metrics[0]).intersection(*metrics[1:])
    return {
        key: math.fsum(m[key] * share for m, share in zip(metrics, shares, strict=True))
        for key in sorted(common)
    }


def sample_node_ids(
    node_ids: Iterable[int], *, fraction: float, min_nodes: int, seed: int, server_round: int
) -> list[int]:
    """Choose ``max(int(fraction * N), min_nodes)`` nodes, reproducibly.

    The choice depends only on the seed, the round and the set of node ids.
    """
    ordered = sorted(node_ids)
    size = min(len(ordered), max(int(fraction * len(ordered)), min_nodes))
    rng = np.random.default_rng([seed, server_round])
    chosen = rng.choice(len(ordered), size=size, replace=False)
    return [ordered[i] for i in sorted(chosen)]
