"""A client's side of ``secure=ckks``: its key, the encrypted global model in, its encrypted model out."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from fedpriv.flat import flat_vector, split_like
from fedpriv.he.config import CKKS
from fedpriv.he.keys import SECRET_FILE, fingerprint, key_folder, load_secret_context
from fedpriv.he.packing import FINGERPRINT, RECORD, decrypt_average, encrypt_weighted, is_encrypted


@functools.lru_cache(maxsize=4)
def _cached_secret_context(folder: str, modified: float) -> tuple[Any, str]:
    context = load_secret_context(folder)
    return context, fingerprint(context)


def secret_context(secure: CKKS, *, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> tuple[Any, str]:
    """This node's secret context and its public key's fingerprint (cached per process).

    Raises
    ------
    fedpriv.he.keys.KeyMaterialError
        If the key folder or the secret context is missing or unreadable.
    """
    folder = key_folder(secure=secure, node_config=node_config, run_config=run_config)
    if folder is None:
        raise ValueError("secure.key_dir is empty and the node config names no he-key-dir")
    path = Path(folder)
    secret = path / SECRET_FILE
    modified = secret.stat().st_mtime if secret.is_file() else 0.0
    return _cached_secret_context(str(path), modified)


def check_server_key(msg: Message, own_fingerprint: str) -> None:
    """Refuse a message whose server uses another public key than this client's secret key belongs to.

    Raises
    ------
    ValueError
        If the fingerprints differ or the message names none.
    """
    record = msg.content.config_records.get(RECORD)
    theirs = record.get(FINGERPRINT) if record is not None else None
    if theirs != own_fingerprint:
        raise ValueError(
            f"the server's CKKS public key ({str(theirs)[:12]}...) is not this client's ({own_fingerprint[:12]}...): "
            "wrong or missing key"
        )


def load_global_model(model: torch.nn.Module, record: ArrayRecord, *, context: Any) -> None:
    """Put the received global model into ``model``: decrypted when it is a ciphertext sum.

    Raises
    ------
    ValueError
        If it does not decrypt under this key or has the wrong size.
    """
    if not is_encrypted(record):
        model.load_state_dict(record.to_torch_state_dict())
        return
    like = {name: value.detach().cpu().numpy() for name, value in model.state_dict().items()}
    flat = decrypt_average(context, record, length=sum(value.size for value in like.values()))
    model.load_state_dict(
        {name: torch.from_numpy(piece) for name, piece in zip(like, split_like(flat, list(like.values())), strict=True)}
    )


def encrypted_model(model: torch.nn.Module, *, context: Any, num_examples: float, secure: CKKS) -> ArrayRecord:
    """``[w, w, w * model]`` encrypted, ``w = num_examples``."""
    flat = flat_vector(value.detach().cpu().numpy() for value in model.state_dict().values())
    return encrypt_weighted(context, flat, weight=float(num_examples), slots=secure.slots)


def held_out_split(
    x: torch.Tensor, y: torch.Tensor, *, fraction: float, seed: int, partition_id: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(train, held_out)``: a fixed ``fraction`` of a client's examples kept for federated evaluation.

    At least one example each way when the client has two or more.
    """
    order = np.random.default_rng([seed, partition_id]).permutation(len(y))
    size = min(max(round(fraction * len(y)), 1), len(y) - 1) if len(y) > 1 else 0
    held, kept = torch.as_tensor(order[:size]), torch.as_tensor(order[size:])
    return (x[kept], y[kept]), (x[held], y[held])
