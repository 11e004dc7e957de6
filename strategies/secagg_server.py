"""The server's side of SecAgg+ on Flower's message API: one training round.

Flower's ``Strategy.start`` owns the round loop: ``configure_train`` sends the
setup message (global model, training config and this round's protocol
numbers), clients train and answer with two public keys each, and
``aggregate_train`` hands those answers to :meth:`SecAggPlusRound.finish`,
which runs the three further stages on the same ``Grid``:

1. share keys: each client gets its neighbours' public keys and returns its
   secrets' Shamir shares, encrypted for each neighbour;
2. collect masked inputs: each client gets the shares meant for it and
   returns its masked input; the server adds it to a running sum modulo
   ``modulus_range`` and keeps nothing else of it;
3. unmask: each survivor returns the self-mask seed shares of surviving
   neighbours and the secret-key shares of dropped ones; the server rebuilds
   those secrets and removes the masks from the sum.

The neighbour graph is SecAgg+'s: a ring over the sampled clients in an
order drawn from the operating system, each client linked to the
``num_shares - 1`` nearest. A stage waits at most ``timeout`` seconds;
clients that do not answer (or answer wrongly) drop out, and the round goes on
while every secret it needs still has ``threshold`` shares. Otherwise it ends
without a sum: the previous model is kept and the reason counted.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares

from fedpriv.logs import get_logger
from fedpriv.secagg import messages as m
from fedpriv.secagg.config import RoundPlan, SecAggPlus
from fedpriv.secagg.masking import (
    KEY_SEED_BYTES,
    SEED_BYTES,
    centered,
    pairwise_seed,
    public_key_of_seed,
    remove_pairwise_mask,
    remove_self_mask,
)
from strategies.aggregation import RejectedReply, check_error, reported_privacy
from strategies.client_privacy import REPLY_PRIVACY_KEYS

logger = get_logger(__name__)

Exchange = Callable[[list[Message], float], list[Message]]
"""Sends one stage's messages and returns the replies (``Grid.send_and_receive`` plus traffic counting)."""


def ring_neighbours(node_ids: Iterable[int], *, num_shares: int, rng: random.Random) -> dict[int, list[int]]:
    """Each node's neighbours (itself included): the ``num_shares`` nearest on a shuffled ring.

    ``num_shares`` is odd or the number of nodes (:meth:`SecAggPlus.plan`),
    so the relation is symmetric.
    """
    ring = sorted(node_ids)
    rng.shuffle(ring)
    half = num_shares // 2
    size = len(ring)
    return {
        node: sorted({ring[(index + offset) % size] for offset in range(-half, half + 1)})
        for index, node in enumerate(ring)
    }


def parse_setup_reply(msg: Message) -> tuple[int, tuple[bytes, bytes], dict[str, float]]:
    """A setup reply's node id, public keys and the privacy the client reports.

    Raises
    ------
    RejectedReply
        For an error reply, missing keys, or a reply that carries arrays (a
        client of a secure round never sends its model in the clear, and the
        server does not look at one that does).
    """
    node_id = check_error(msg)
    if msg.content.array_records:
        raise RejectedReply(f"node {node_id}: a secure round's setup reply carries arrays")
    record = msg.content.config_records.get(m.RECORD)
    keys = None if record is None else (record.get(m.PUBLIC_KEY_1), record.get(m.PUBLIC_KEY_2))
    if keys is None or not all(isinstance(key, bytes) and key for key in keys):
        raise RejectedReply(f"node {node_id}: a secure round's setup reply without two public keys")
    return node_id, keys, reported_privacy(msg, privacy_keys=REPLY_PRIVACY_KEYS)


@dataclass
class SecAggOutcome:
    """What one round of the protocol gave.

    Attributes
    ----------
    total : numpy.ndarray or None
        The survivors' summed inputs, centred in ``[-modulus/2, modulus/2)``;
        ``None`` when the round was refused.
    survivors : int
        Clients whose masked input is in the sum.
    dropped : dict[str, int]
        Clients lost at each stage (no reply, an error, a malformed reply).
    refused : str
        Why there is no sum; empty when there is one.
    """

    total: np.ndarray | None
    survivors: int
    dropped: dict[str, int] = field(default_factory=dict)
    refused: str = ""


class SecAggPlusRound:
    """One round of SecAgg+ for the sampled ``node_ids``.

    Parameters
    ----------
    config : SecAggPlus
        The ``secure`` group's parameters.
    node_ids : sequence of int
        The clients sampled for the round (at least 2).
    server_round : int
        The run's round number (a client's state is bound to it).
    length : int
        Integers in each client's input.
    min_survivors : int
        Masked inputs the round needs before it unmasks (DP: the survivors
        whose noise adds up to the accounted amount); never below the
        reconstruction threshold.
    rng : random.Random, optional
        Orders the ring; the operating system's randomness by default.
    """

    def __init__(
        self,
        *,
        config: SecAggPlus,
        node_ids: Iterable[int],
        server_round: int,
        length: int,
        min_survivors: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.node_ids = sorted(node_ids)
        self.plan: RoundPlan = config.plan(len(self.node_ids))
        self.server_round = server_round
        self.length = length
        self.min_survivors = max(min_survivors, self.plan.threshold)
        self.neighbours = ring_neighbours(
            self.node_ids, num_shares=self.plan.num_shares, rng=rng or random.SystemRandom()
        )

    def setup_record(self) -> dict[str, int]:
        """What the setup message tells every sampled client about the round."""
        return {
            m.STAGE: m.SETUP,
            m.ROUND: self.server_round,
            m.NUM_SHARES: self.plan.num_shares,
            m.THRESHOLD: self.plan.threshold,
            m.MODULUS: self.config.modulus_range,
            m.LENGTH: self.length,
        }

    def _message(self, node_id: int, values: Mapping[str, object]) -> Message:
        record = ConfigRecord({m.ROUND: self.server_round, **values})
        return Message(content=RecordDict({m.RECORD: record}), message_type=MessageType.TRAIN, dst_node_id=node_id)

    def finish(self, exchange: Exchange, *, public_keys: Mapping[int, tuple[bytes, bytes]]) -> SecAggOutcome:
        """Run stages 1 to 3 after the setup replies gave ``public_keys`` (node id: ``(pk1, pk2)``)."""
        dropped = {"setup": len(self.node_ids) - len(public_keys)}
        threshold = self.plan.threshold
        alive = sorted(public_keys)

        def refuse(reason: str, survivors: int = 0) -> SecAggOutcome:
            logger.warning("round %d: secure aggregation refused: %s", self.server_round, reason)
            return SecAggOutcome(total=None, survivors=survivors, dropped=dropped, refused=reason)

        if len(alive) < threshold:
            return refuse(f"{len(alive)} clients sent keys, fewer than threshold={threshold}")
        # Stage lines carry no client counts: under client-level DP they are not public.
        logger.info("round %d: SecAgg+ share-keys", self.server_round)

        # Stage 1: public keys out, encrypted shares back.
        requests = []
        for node in alive:
            near = [peer for peer in self.neighbours[node] if peer in public_keys]
            requests.append(
                self._message(
                    node,
                    {
                        m.STAGE: m.SHARE_KEYS,
                        m.NODE_IDS: near,
                        m.PUBLIC_KEYS_1: [public_keys[peer][0] for peer in near],
                        m.PUBLIC_KEYS_2: [public_keys[peer][1] for peer in near],
                    },
                )
            )
        forwarded: dict[int, list[tuple[int, bytes]]] = {node: [] for node in alive}
        sharing = []
        for node, record in self._answers(exchange(requests, self.config.timeout)):
            try:
                destinations = [int(d) for d in record[m.DESTINATIONS]]
                ciphertexts = [bytes(c) for c in record[m.CIPHERTEXTS]]
            except (KeyError, TypeError, ValueError):
                continue
            expected = {peer for peer in self.neighbours[node] if peer in public_keys} - {node}
            if set(destinations) != expected or len(destinations) != len(ciphertexts):
                logger.warning("round %d: node %d sent shares to %s, not its neighbours", self.server_round, node, destinations)
                continue
            sharing.append(node)
            for destination, ciphertext in zip(destinations, ciphertexts, strict=True):
                forwarded[destination].append((node, ciphertext))
        dropped["share_keys"] = len(alive) - len(sharing)
        if len(sharing) < threshold:
            return refuse(f"{len(sharing)} clients shared keys, fewer than threshold={threshold}")

        # Stage 2: shares forwarded, masked inputs summed.
        logger.info("round %d: SecAgg+ collect-masked", self.server_round)
        sources = {node: [(s, c) for s, c in forwarded[node] if s in sharing] for node in sharing}
        requests = [
            self._message(
                node,
                {
                    m.STAGE: m.COLLECT_MASKED,
                    m.SOURCES: [s for s, _ in sources[node]],
                    m.CIPHERTEXTS: [c for _, c in sources[node]],
                    m.LENGTH: self.length,
                },
            )
            for node in sharing
        ]
        modulus = self.config.modulus_range
        masked_sum = np.zeros(self.length, dtype=np.int64)
        masking = []
        for msg in exchange(requests, self.config.timeout):
            masked = self._masked_input(msg)
            if masked is None:
                continue
            masking.append(msg.metadata.src_node_id)
            # Only the running sum is kept: no client's masked vector outlives this line.
            masked_sum = (masked_sum + masked) % modulus
        dropped["collect_masked"] = len(sharing) - len(masking)
        if len(masking) < self.min_survivors:
            # Before anything is unmasked: with DP, fewer inputs hold less noise than is accounted.
            return refuse(f"{len(masking)} masked inputs arrived, fewer than the {self.min_survivors} needed")

        # Stage 3: shares of survivors' seeds and dropped clients' keys.
        logger.info("round %d: SecAgg+ unmask", self.server_round)
        masked_with = {node: [s for s, _ in sources[node]] for node in masking}
        requests = [
            self._message(
                node,
                {
                    m.STAGE: m.UNMASK,
                    m.ACTIVE: [peer for peer in self.neighbours[node] if peer in masking],
                    m.DEAD: [peer for peer in masked_with[node] if peer not in masking],
                },
            )
            for node in masking
        ]
        collected: dict[int, list[bytes]] = {}
        answering = 0
        for node, record in self._answers(exchange(requests, self.config.timeout)):
            try:
                owners = [int(n) for n in record[m.NODE_IDS]]
                shares = [bytes(s) for s in record[m.SHARES]]
            except (KeyError, TypeError, ValueError):
                continue
            if len(owners) != len(shares):
                continue
            answering += 1
            for owner, share in zip(owners, shares, strict=True):
                collected.setdefault(owner, []).append(share)
        dropped["unmask"] = len(masking) - answering
        dead = sorted({peer for node in masking for peer in masked_with[node]} - set(masking))
        total = masked_sum
        for owner in [*masking, *dead]:
            shares = collected.get(owner, [])
            if len(shares) < threshold:
                return refuse(f"node {owner}: {len(shares)} shares of its secret, fewer than threshold={threshold}", len(masking))
            try:
                secret = combine_shares(shares)
            except ValueError:
                return refuse(f"node {owner}: its shares do not combine", len(masking))
            if owner in masking:
                if len(secret) != SEED_BYTES:
                    return refuse(f"node {owner}: its rebuilt seed has {len(secret)} bytes", len(masking))
                total = remove_self_mask(total, self_seed=secret, modulus=modulus)
                continue
            if len(secret) != KEY_SEED_BYTES or public_key_of_seed(secret) != public_keys[owner][0]:
                return refuse(f"node {owner}: its rebuilt key does not match its public key", len(masking))
            for survivor in masking:
                if owner in masked_with[survivor]:
                    seed = pairwise_seed(secret, public_keys[survivor][0])
                    total = remove_pairwise_mask(total, survivor_id=survivor, dropped_id=owner, seed=seed, modulus=modulus)
        return SecAggOutcome(total=centered(total, modulus=modulus), survivors=len(masking), dropped=dropped)

    def _answers(self, replies: Iterable[Message]) -> Iterable[tuple[int, ConfigRecord]]:
        for msg in replies:
            if msg.has_error() or m.RECORD not in msg.content.config_records:
                continue
            yield msg.metadata.src_node_id, msg.content.config_records[m.RECORD]

    def _masked_input(self, msg: Message) -> np.ndarray | None:
        """A reply's masked vector as int64, or ``None`` if it is not one of the right shape."""
        if msg.has_error() or m.MASKED not in msg.content.array_records:
            return None
        record = msg.content.array_records[m.MASKED]
        if m.MASKED not in record:
            return None
        try:
            values = record[m.MASKED].numpy()
        except (ValueError, TypeError):
            return None
        if values.dtype != np.uint32 or values.shape != (self.length,):
            logger.warning("round %d: node %d sent a masked input of %s %s", self.server_round,
                           msg.metadata.src_node_id, values.dtype, values.shape)
            return None
        return values.astype(np.int64)
