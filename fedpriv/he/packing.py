"""A model as CKKS ciphertexts: one flat vector cut into ciphertexts of ``slots`` values.

What a client encrypts is ``[w, w, w * model]``, ``w`` its weight: the server
adds these vectors without reading them, and a key holder divides the sum of
the models by the sum of the weights. The weight is written twice so that a
decryption under the wrong key (which yields huge random values, not an
error) is caught: the two copies of the summed weight must agree.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from .config import import_tenseal

PREFIX = "ckks-"
"""Names of a ciphertext's arrays in an ``ArrayRecord``: ``ckks-00000``, ``ckks-00001``, ..."""
RECORD = "fedpriv.he"
"""Name of the ``ConfigRecord`` that tells clients which public key the server uses."""
FINGERPRINT = "fingerprint"
HEADER = 2
"""Values before the weighted model: the weight, twice."""
WEIGHT_AGREEMENT = 1e-4
"""Relative difference the two copies of the summed weight may show after decryption."""


def is_encrypted(record: ArrayRecord) -> bool:
    """Whether ``record`` holds ciphertexts (every name carries :data:`PREFIX`)."""
    return bool(record) and all(name.startswith(PREFIX) for name in record)


def encrypt_weighted(context: Any, model: np.ndarray, *, weight: float, slots: int) -> ArrayRecord:
    """``[w, w, w * model]`` encrypted, ``slots`` values per ciphertext, one uint8 array each."""
    ts = import_tenseal()
    values = np.concatenate([[weight, weight], weight * np.asarray(model, dtype=np.float64)])
    return ArrayRecord(
        {
            f"{PREFIX}{index:05d}": Array(
                np.frombuffer(ts.ckks_vector(context, values[start : start + slots].tolist()).serialize(), dtype=np.uint8)
            )
            for index, start in enumerate(range(0, values.size, slots))
        }
    )


def chunks(record: ArrayRecord) -> list[bytes]:
    """The serialized ciphertexts of ``record``, in order."""
    return [record[name].numpy().tobytes() for name in sorted(record)]


def decrypt_average(context: Any, record: ArrayRecord, *, length: int) -> np.ndarray:
    """The weighted mean model of an encrypted sum (``length`` values).

    Raises
    ------
    ValueError
        If it does not decrypt under this key (the weight copies disagree, or
        the summed weight is not positive) or holds the wrong number of values.
    """
    ts = import_tenseal()
    try:
        values = np.concatenate([np.asarray(ts.ckks_vector_from(context, data).decrypt()) for data in chunks(record)])
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(f"the model does not decrypt: {exc}") from exc
    if values.size != length + HEADER:
        raise ValueError(f"the encrypted model holds {values.size - HEADER} values, not {length}")
    weight, check = values[0], values[1]
    if not (weight > 0 and abs(weight - check) <= WEIGHT_AGREEMENT * max(1.0, abs(weight))):
        raise ValueError("the model does not decrypt under this client's CKKS key (wrong key?)")
    return values[HEADER:] / weight
