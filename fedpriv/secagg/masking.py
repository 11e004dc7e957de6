"""Masks of SecAgg+: pure functions over integer vectors modulo a power of 2.

Key agreement (ECDH on SECP384R1 with HKDF-SHA256), authenticated encryption
(Fernet) and Shamir sharing are Flower's (``flwr.common.secure_aggregation``
and ``flwr.supercore.primitives.asymmetric``). The mask expansion is not:
Flower's ``pseudo_rand_gen`` folds a 32-byte seed into a 32-bit NumPy
``RandomState`` seed, so a mask could be found by trying 2**32 seeds. Here a
mask is the ChaCha20 key stream (``cryptography``) under the full 256-bit
seed, cut into 32-bit words and reduced modulo the power-of-2 modulus, which
keeps every residue exactly equally likely.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, public_key_to_bytes

from fedpriv.checks import fail

SEED_BYTES = 32
KEY_SEED_BYTES = 48
"""A masking key pair is derived from 48 random bytes: 4 Shamir chunks to share, not 20 for its DER form."""
_CURVE = ec.SECP384R1()
# The group order of SECP384R1: a seed is reduced into [1, order - 1].
_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
# Distinct nonces keep a self mask and a pairwise mask apart even under one seed.
SELF_MASK_NONCE = b"fedpriv-self-msk"
PAIRWISE_MASK_NONCE = b"fedpriv-pair-msk"


def expand_mask(seed: bytes, *, length: int, modulus: int, nonce: bytes) -> np.ndarray:
    """``length`` values uniform on ``[0, modulus)`` from a 32-byte ``seed`` (int64).

    ``modulus`` must be a power of 2 no larger than ``2**32``.
    """
    if len(seed) != SEED_BYTES:
        raise fail("seed", f"{len(seed)} bytes", f"must be {SEED_BYTES} bytes")
    if modulus & (modulus - 1) or not 2 <= modulus <= 2**32:
        raise fail("modulus", modulus, "must be a power of 2 in [2, 2**32]")
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor().update(bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.int64) & (modulus - 1)


def key_from_seed(key_seed: bytes) -> ec.EllipticCurvePrivateKey:
    """The SECP384R1 private key of a 48-byte seed (the seed read as an integer, reduced into [1, order - 1])."""
    if len(key_seed) != KEY_SEED_BYTES:
        raise fail("key seed", f"{len(key_seed)} bytes", f"must be {KEY_SEED_BYTES} bytes")
    return ec.derive_private_key(int.from_bytes(key_seed, "big") % (_ORDER - 1) + 1, _CURVE)


def public_key_of_seed(key_seed: bytes) -> bytes:
    """The public key (Flower's byte form) of :func:`key_from_seed`."""
    return public_key_to_bytes(key_from_seed(key_seed).public_key())


def pairwise_seed(key_seed: bytes, peer_public_key: bytes) -> bytes:
    """The 32-byte seed two clients share: ECDH of one's masking key with the other's public key."""
    shared = generate_shared_key(key_from_seed(key_seed), bytes_to_public_key(peer_public_key))
    return base64.urlsafe_b64decode(shared)


def pairwise_sign(own_id: int, peer_id: int) -> int:
    """+1 for the larger node id, -1 for the smaller: the two masks of a pair cancel in the sum."""
    if own_id == peer_id:
        raise fail("peer_id", peer_id, "a client has no pairwise mask with itself")
    return 1 if own_id > peer_id else -1


def mask_input(
    values: np.ndarray,
    *,
    own_id: int,
    self_seed: bytes,
    peer_seeds: Mapping[int, bytes],
    modulus: int,
) -> np.ndarray:
    """A client's masked input: ``values + self mask + sum of signed pairwise masks`` mod ``modulus``.

    ``values`` (integers, any sign) is not modified; ``peer_seeds`` maps each
    neighbour that took part in key sharing to the seed shared with it.
    """
    length = values.size
    masked = np.mod(values.astype(np.int64), modulus)
    masked += expand_mask(self_seed, length=length, modulus=modulus, nonce=SELF_MASK_NONCE)
    for peer_id, seed in peer_seeds.items():
        mask = expand_mask(seed, length=length, modulus=modulus, nonce=PAIRWISE_MASK_NONCE)
        masked += pairwise_sign(own_id, peer_id) * mask
        masked %= modulus
    return masked % modulus


def remove_self_mask(total: np.ndarray, *, self_seed: bytes, modulus: int) -> np.ndarray:
    """``total`` minus the self mask rebuilt from a survivor's seed, mod ``modulus`` (a new array)."""
    return (total - expand_mask(self_seed, length=total.size, modulus=modulus, nonce=SELF_MASK_NONCE)) % modulus


def remove_pairwise_mask(
    total: np.ndarray, *, survivor_id: int, dropped_id: int, seed: bytes, modulus: int
) -> np.ndarray:
    """``total`` without the mask a survivor added for a neighbour that dropped out (a new array)."""
    mask = expand_mask(seed, length=total.size, modulus=modulus, nonce=PAIRWISE_MASK_NONCE)
    return (total - pairwise_sign(survivor_id, dropped_id) * mask) % modulus


def centered(values: np.ndarray, *, modulus: int) -> np.ndarray:
    """Residues mod ``modulus`` read as integers in ``[-modulus/2, modulus/2)``."""
    residues = np.mod(values, modulus)
    return np.where(residues >= modulus // 2, residues - modulus, residues)
