"""A client's side of SecAgg+, one function per stage.

Each function takes the client's protocol state (a plain mapping of
``ConfigRecord`` values, kept in ``context.state`` between messages) and the
stage's message config, and returns the new state and the reply's config;
nothing is modified in place. A request the client must not answer raises
``ValueError`` and the ClientApp replies with an error: the checks below are
what an honest client can verify of an honest-but-curious server's requests.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from . import messages as m
from .masking import KEY_SEED_BYTES, SEED_BYTES, mask_input, pairwise_seed, public_key_of_seed

State = dict[str, Any]


def _key_pair() -> tuple[bytes, bytes]:
    secret, public = generate_key_pairs()
    return private_key_to_bytes(secret), public_key_to_bytes(public)


def setup(*, node_id: int, config: Mapping[str, Any]) -> tuple[State, dict[str, Any]]:
    """Stage 0: fresh key pairs and self-mask seed for this round; reply the public keys.

    The masking key pair comes from a 48-byte seed, which is what gets shared.
    """
    sk1 = os.urandom(KEY_SEED_BYTES)
    pk1 = public_key_of_seed(sk1)
    sk2, pk2 = _key_pair()
    state = {
        "node-id": node_id,
        m.ROUND: int(config[m.ROUND]),
        m.NUM_SHARES: int(config[m.NUM_SHARES]),
        m.THRESHOLD: int(config[m.THRESHOLD]),
        m.MODULUS: int(config[m.MODULUS]),
        "sk1": sk1,
        "sk2": sk2,
        m.PUBLIC_KEY_1: pk1,
        m.PUBLIC_KEY_2: pk2,
        "self-seed": os.urandom(SEED_BYTES),
    }
    return state, {m.PUBLIC_KEY_1: pk1, m.PUBLIC_KEY_2: pk2}


def _check_round(state: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    if int(config.get(m.ROUND, -1)) != state[m.ROUND]:
        raise ValueError(f"{m.ROUND}={config.get(m.ROUND)!r}: this client's protocol state is for round {state[m.ROUND]}")


def share_keys(state: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[State, dict[str, Any]]:
    """Stage 1: Shamir-share the self-mask seed and the first secret key among the neighbours.

    Each share travels to its neighbour encrypted under the key agreed with
    that neighbour's second public key, so the server only forwards it.

    Raises
    ------
    ValueError
        If this client's own public keys are not among its neighbours' as it
        sent them, or fewer than ``threshold`` neighbours are left.
    """
    _check_round(state, config)
    node_ids = [int(n) for n in config[m.NODE_IDS]]
    pk1s, pk2s = list(config[m.PUBLIC_KEYS_1]), list(config[m.PUBLIC_KEYS_2])
    own = state["node-id"]
    if len(set(node_ids)) != len(node_ids) or not len(node_ids) == len(pk1s) == len(pk2s):
        raise ValueError(f"{m.NODE_IDS}: {len(node_ids)} ids for {len(pk1s)} and {len(pk2s)} keys, or repeated ids")
    if own not in node_ids or pk1s[node_ids.index(own)] != state[m.PUBLIC_KEY_1] or pk2s[
        node_ids.index(own)
    ] != state[m.PUBLIC_KEY_2]:
        raise ValueError(f"{m.NODE_IDS}: node {own}'s own public keys are missing or altered")
    if len(node_ids) < state[m.THRESHOLD] or len(node_ids) > state[m.NUM_SHARES]:
        raise ValueError(
            f"{m.NODE_IDS}: {len(node_ids)} neighbours; must be in [threshold={state[m.THRESHOLD]}, "
            f"num_shares={state[m.NUM_SHARES]}]"
        )
    seed_shares = create_shares(state["self-seed"], state[m.THRESHOLD], len(node_ids))
    key_shares = create_shares(state["sk1"], state[m.THRESHOLD], len(node_ids))
    sk2 = bytes_to_private_key(state["sk2"])
    destinations, ciphertexts = [], []
    for index, peer in enumerate(node_ids):
        if peer == own:
            continue
        key = generate_shared_key(sk2, bytes_to_public_key(pk2s[index]))
        plaintext = share_keys_plaintext_concat(own, peer, seed_shares[index], key_shares[index])
        destinations.append(peer)
        ciphertexts.append(encrypt(key, plaintext))
    mine = node_ids.index(own)
    new_state = {
        **state,
        "neighbours": node_ids,
        "neighbour-pk1s": pk1s,
        "neighbour-pk2s": pk2s,
        "share-owners": [own],
        "seed-shares": [seed_shares[mine]],
        "key-shares": [key_shares[mine]],
    }
    return new_state, {m.DESTINATIONS: destinations, m.CIPHERTEXTS: ciphertexts}


def collect_masked(
    state: Mapping[str, Any], config: Mapping[str, Any], *, encoded: np.ndarray
) -> tuple[State, np.ndarray]:
    """Stage 2: keep the neighbours' shares, then mask ``encoded`` and return it (uint32).

    ``encoded`` is masked with the self mask and one pairwise mask for every
    neighbour whose shares arrived: exactly the neighbours the server can
    still unmask for.

    Raises
    ------
    ValueError
        If a share is not from the neighbour the server says, not for this
        client, or fewer than ``threshold`` holders are left.
    """
    _check_round(state, config)
    sources = [int(n) for n in config[m.SOURCES]]
    ciphertexts = list(config[m.CIPHERTEXTS])
    own, neighbours = state["node-id"], state["neighbours"]
    if len(sources) != len(ciphertexts) or len(set(sources)) != len(sources):
        raise ValueError(f"{m.SOURCES}: {len(sources)} sources for {len(ciphertexts)} ciphertexts, or repeated ones")
    if len(sources) + 1 < state[m.THRESHOLD]:
        raise ValueError(f"{m.SOURCES}: {len(sources)} neighbours left, fewer than threshold={state[m.THRESHOLD]} - 1")
    sk2 = bytes_to_private_key(state["sk2"])
    owners, seed_shares, key_shares = list(state["share-owners"]), list(state["seed-shares"]), list(state["key-shares"])
    peer_seeds = {}
    for source, ciphertext in zip(sources, ciphertexts, strict=True):
        if source == own or source not in neighbours:
            raise ValueError(f"{m.SOURCES}: node {source} is not a neighbour of node {own}")
        index = neighbours.index(source)
        key = generate_shared_key(sk2, bytes_to_public_key(state["neighbour-pk2s"][index]))
        sender, receiver, seed_share, key_share = share_keys_plaintext_separate(decrypt(key, ciphertext))
        if (sender, receiver) != (source, own):
            raise ValueError(f"{m.CIPHERTEXTS}: a share from {sender} to {receiver} was forwarded as {source} to {own}")
        owners.append(source)
        seed_shares.append(seed_share)
        key_shares.append(key_share)
        peer_seeds[source] = pairwise_seed(state["sk1"], state["neighbour-pk1s"][index])
    expected = int(config[m.LENGTH])
    if encoded.size != expected:
        raise ValueError(f"{m.LENGTH}={expected}: this client's input has {encoded.size} values")
    masked = mask_input(
        encoded, own_id=own, self_seed=state["self-seed"], peer_seeds=peer_seeds, modulus=state[m.MODULUS]
    )
    new_state = {
        **state,
        "masked-with": sources,
        "share-owners": owners,
        "seed-shares": seed_shares,
        "key-shares": key_shares,
    }
    return new_state, masked.astype(np.uint32)


def unmask(state: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """Stage 3: the seed shares of surviving neighbours and the key shares of dropped ones.

    Never both for one node: with both, the server could strip every mask
    off that node's input.

    Raises
    ------
    ValueError
        If a node is both active and dead, an active node is not a
        neighbour, a dead node is not one this client masked with, or fewer
        than ``threshold`` neighbours are active.
    """
    _check_round(state, config)
    active = [int(n) for n in config[m.ACTIVE]]
    dead = [int(n) for n in config[m.DEAD]]
    if set(active) & set(dead):
        raise ValueError(f"{m.DEAD}: nodes {sorted(set(active) & set(dead))} are also listed as active")
    if not set(active) <= set(state["neighbours"]):
        raise ValueError(f"{m.ACTIVE}: nodes {sorted(set(active) - set(state['neighbours']))} are not neighbours")
    if not set(dead) <= set(state.get("masked-with", [])):
        raise ValueError(f"{m.DEAD}: nodes {sorted(set(dead) - set(state.get('masked-with', [])))} were not masked with")
    if len(active) < state[m.THRESHOLD]:
        raise ValueError(f"{m.ACTIVE}: {len(active)} active neighbours, fewer than threshold={state[m.THRESHOLD]}")
    owners = list(state["share-owners"])
    shares = [state["seed-shares"][owners.index(n)] for n in active if n in owners]
    shares += [state["key-shares"][owners.index(n)] for n in dead if n in owners]
    answered = [n for n in active if n in owners] + [n for n in dead if n in owners]
    return {m.NODE_IDS: answered, m.SHARES: shares}
