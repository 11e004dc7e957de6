"""The server's side of ``secure=ckks``: encrypted replies in, their encrypted sum out.

The server holds a public TenSEAL context and ciphertexts; nothing here can
decrypt, and nothing here keeps a reply beyond adding it to the sum.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedpriv.he.config import import_tenseal
from fedpriv.he.packing import PREFIX, chunks
from strategies.aggregation import RejectedReply, check_error, reported_privacy
from strategies.client_privacy import REPLY_PRIVACY_KEYS


def parse_encrypted_reply(msg: Message, *, num_chunks: int) -> tuple[int, ArrayRecord, dict[str, float]]:
    """A reply's node id, its ciphertexts and the privacy the client reports.

    Raises
    ------
    RejectedReply
        For an error reply, or one without exactly ``num_chunks`` ciphertexts.
    """
    node_id = check_error(msg)
    records = list(msg.content.array_records.values())
    if len(records) != 1 or not records[0] or not all(name.startswith(PREFIX) for name in records[0]):
        raise RejectedReply(f"node {node_id}: a secure=ckks reply carries exactly one record of ciphertexts")
    if len(records[0]) != num_chunks:
        raise RejectedReply(f"node {node_id}: {len(records[0])} ciphertexts, expected {num_chunks}")
    return node_id, records[0], reported_privacy(msg, privacy_keys=REPLY_PRIVACY_KEYS)


class EncryptedSum:
    """The running ciphertext-wise sum of encrypted models.

    Parameters
    ----------
    context : Any
        The public TenSEAL context.
    """

    def __init__(self, context: Any) -> None:
        self._context = context
        self._total: list[Any] | None = None
        self.count = 0

    def add(self, record: ArrayRecord) -> None:
        """Add one reply's ciphertexts.

        Raises
        ------
        ValueError
            If one does not deserialize under the context (the sum is unchanged).
        """
        ts = import_tenseal()
        try:
            vectors = [ts.ckks_vector_from(self._context, data) for data in chunks(record)]
        except (ValueError, RuntimeError, TypeError) as exc:
            raise ValueError(f"not a ciphertext of this run's CKKS context: {exc}") from exc
        self._total = vectors if self._total is None else [a + b for a, b in zip(self._total, vectors, strict=True)]
        self.count += 1

    def record(self) -> ArrayRecord:
        """The sum, serialized as uint8 arrays named like the replies'."""
        if self._total is None:
            raise ValueError("nothing was added")
        return ArrayRecord(
            {f"{PREFIX}{index:05d}": Array(np.frombuffer(v.serialize(), dtype=np.uint8)) for index, v in enumerate(self._total)}
        )
