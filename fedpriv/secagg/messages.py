"""Keys of the SecAgg+ messages, and the encoding as it travels in a ``ConfigRecord``.

Every stage is a ``train`` message whose ``ConfigRecord`` named
:data:`RECORD` holds the stage and its data. The setup message also carries
the global model and the round's training config, so clients train while
the protocol starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

from fedpriv.checks import check_choice

RECORD = "fedpriv.secagg"
"""Name of the ``ConfigRecord`` of every SecAgg+ message (and of a client's protocol state)."""
INPUT_RECORD = "fedpriv.secagg.input"
"""Name of the ``ArrayRecord`` in a client's state that holds its encoded input until it is masked."""

SETUP, SHARE_KEYS, COLLECT_MASKED, UNMASK = "setup", "share-keys", "collect-masked", "unmask"
STAGES = (SETUP, SHARE_KEYS, COLLECT_MASKED, UNMASK)

STAGE = "stage"
ROUND = "round"
NUM_SHARES = "num-shares"
THRESHOLD = "threshold"
MODULUS = "modulus"
LENGTH = "length"
ENCODING = "encoding"
PUBLIC_KEY_1, PUBLIC_KEY_2 = "pk1", "pk2"
NODE_IDS = "node-ids"
PUBLIC_KEYS_1, PUBLIC_KEYS_2 = "pk1s", "pk2s"
DESTINATIONS = "destinations"
CIPHERTEXTS = "ciphertexts"
SOURCES = "sources"
ACTIVE = "active"
DEAD = "dead"
SHARES = "shares"
MASKED = "masked"

_PREFIX = "encoding."


def _encodings() -> dict[str, type]:
    # Imported when a secure round runs: the encodings pull in the privacy
    # package (and Opacus), which a client of another run never needs.
    from .encoding import DistributedDPEncoding, WeightedEncoding

    return {"weighted": WeightedEncoding, "distributed-dp": DistributedDPEncoding}


def encoding_to_record(encoding: Any) -> dict[str, Any]:
    """The encoding's kind and parameters as ``ConfigRecord`` entries."""
    kind = next(name for name, cls in _encodings().items() if isinstance(encoding, cls))
    return {ENCODING: kind, **{f"{_PREFIX}{key}": value for key, value in asdict(encoding).items()}}


def encoding_from_record(record: Mapping[str, Any]) -> Any:
    """Rebuild the encoding (a ``WeightedEncoding`` or ``DistributedDPEncoding``) that :func:`encoding_to_record` wrote.

    Raises
    ------
    ValueError
        If the kind is unknown or a parameter is missing.
    """
    encodings = _encodings()
    cls = encodings[check_choice(ENCODING, record.get(ENCODING), tuple(encodings))]
    missing = [f.name for f in fields(cls) if f"{_PREFIX}{f.name}" not in record]
    if missing:
        raise ValueError(f"{ENCODING}: parameter {_PREFIX}{missing[0]} missing")
    return cls(**{f.name: record[f"{_PREFIX}{f.name}"] for f in fields(cls)})
