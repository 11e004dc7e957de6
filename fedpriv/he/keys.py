"""CKKS key material: made once, the secret context for the clients, the public one for the server.

``make_keys`` writes both files into a folder. The server loads only the public
context, and refuses one that holds a secret key; a client loads the secret
context and checks, by fingerprint, that it belongs to the public key the
server uses.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import CKKS, import_tenseal

SECRET_FILE = "secret-context.tenseal"
PUBLIC_FILE = "public-context.tenseal"
NODE_KEY_DIR_KEY = "he-key-dir"
"""A SuperNode's node config key: the folder holding its clients' secret context."""
RUN_KEY_SUBDIR = "he-keys"


class KeyMaterialError(ValueError):
    """A key file is missing, unreadable or of the wrong kind; the message says which and how to make it."""


def make_keys(folder: str | os.PathLike[str], config: CKKS) -> Path:
    """Write a fresh secret context (owner-only) and its public context into ``folder``.

    Returns
    -------
    Path
        ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    context = config.make_context()
    secret = folder / SECRET_FILE
    secret.write_bytes(b"")
    secret.chmod(0o600)
    secret.write_bytes(context.serialize(save_secret_key=True))
    context.make_context_public()
    (folder / PUBLIC_FILE).write_bytes(context.serialize())
    return folder


def _read(path: Path, *, what: str) -> Any:
    ts = import_tenseal()
    if not path.is_file():
        raise KeyMaterialError(f"{what} {path} not found: make the keys with `python scripts/he_keys.py --out {path.parent}`")
    try:
        return ts.context_from(path.read_bytes())
    except (ValueError, RuntimeError, TypeError) as exc:
        raise KeyMaterialError(f"{what} {path} is not a TenSEAL context: {exc}") from exc


def load_public_context(folder: str | os.PathLike[str]) -> Any:
    """The server's context: public key only.

    Raises
    ------
    KeyMaterialError
        If the file is missing, unreadable, or holds a secret key.
    """
    context = _read(Path(folder) / PUBLIC_FILE, what="public CKKS context")
    if context.is_private():
        raise KeyMaterialError(f"{Path(folder) / PUBLIC_FILE} holds a secret key: the server must never load one")
    return context


def load_secret_context(folder: str | os.PathLike[str]) -> Any:
    """A client's context, with the shared secret key.

    Raises
    ------
    KeyMaterialError
        If the file is missing, unreadable, or holds no secret key.
    """
    context = _read(Path(folder) / SECRET_FILE, what="secret CKKS context")
    if not context.is_private():
        raise KeyMaterialError(f"{Path(folder) / SECRET_FILE} holds no secret key")
    return context


def fingerprint(context: Any) -> str:
    """SHA-256 of a context's public key (hex): the same for the secret and the public context."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "public-key"
        # TenSEAL saves a public key to a file only.
        context.public_key().data.save(str(path))
        return hashlib.sha256(path.read_bytes()).hexdigest()


def key_folder(*, secure: CKKS, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Path | None:
    """Where a client finds the secret context: node config, then ``secure.key_dir``, then the run folder."""
    if node_config.get(NODE_KEY_DIR_KEY):
        return Path(str(node_config[NODE_KEY_DIR_KEY]))
    if secure.key_dir:
        return Path(secure.key_dir)
    if run_config.get("output-dir"):
        return Path(str(run_config["output-dir"])) / RUN_KEY_SUBDIR
    return None
