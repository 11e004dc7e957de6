"""Partitionings kept on disk, so a fresh ClientApp process does not recompute them.

A deployment starts one ``flwr-clientapp`` process per message; recomputing
the partitioning there imports flwr-datasets and Hugging Face ``datasets``
(about 0.7 s) for every message. The partitioning is a pure function of the
dataset, the partitioner, the number of clients, the seed and the labels, so
it is stored under a key of all of them: ``$FEDPRIV_CACHE`` (default
``$XDG_CACHE_HOME/fedpriv``, else ``~/.cache/fedpriv``), ``partitions/<key>.v2.npz``.
A file that cannot be read is recomputed and written again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv.logs import get_logger
from fedpriv.partition import Partitioning

logger = get_logger(__name__)

FORMAT = "v2"
"""Part of a cache file's name: files of the earlier layout (one archive member per client) are not read."""


def cache_folder() -> Path:
    """Where partitionings are kept."""
    root = os.environ.get("FEDPRIV_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedpriv"
    return Path(root) / "partitions"


def partition_key(*, dataset: Any, partition: Any, num_partitions: int, seed: int, labels: np.ndarray) -> str:
    """SHA-256 of everything a partitioning depends on (the labels by their bytes)."""
    digest = hashlib.sha256()
    for part in (repr(dataset), repr(partition), str(num_partitions), str(seed), str(labels.dtype), str(labels.shape)):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()


def cached_partitioning(key: str, compute: Callable[[], Partitioning]) -> Partitioning:
    """The partitioning stored under ``key``, or ``compute()`` stored there now.

    The clients' indices are stored end to end in one array with the offsets
    where each client's start: reading them back costs the same at 100 and at
    10,000 clients (one archive member per client cost 0.5 s per process at
    10,000).
    """
    path = cache_folder() / f"{key}.{FORMAT}.npz"
    try:
        with np.load(path) as stored:
            indices, offsets = stored["indices"], stored["offsets"]
            return Partitioning(indices=tuple(np.split(indices, offsets[1:-1])), dropped=stored["dropped"])
    except FileNotFoundError:
        pass
    except (OSError, KeyError, ValueError) as exc:
        logger.warning("partition cache %s unreadable (%s): recomputing", path, exc)
    partitioning = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sizes = [len(part) for part in partitioning.indices]
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as handle:
            np.savez(
                handle,
                indices=np.concatenate([np.asarray(part, dtype=np.int64) for part in partitioning.indices]),
                offsets=np.cumsum([0, *sizes], dtype=np.int64),
                dropped=partitioning.dropped,
            )
        os.replace(handle.name, path)
    except OSError as exc:
        # A read-only home only costs the recomputation next time.
        logger.warning("partition cache %s not written: %s", path, exc)
    return partitioning
