"""WeightedFedAvg: FedAvg that validates every reply and never crashes on one."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpriv.checks import check_fraction, check_int, check_real
from fedpriv.flat import flat_vector
from fedpriv.logs import get_logger
from fedpriv.protocol import ROUND_KEY
from fedpriv.publication import CLIENT_LEVEL_PUBLIC_ROUND, split_public
from strategies.aggregation import (
    ArraySpec,
    MetricsReply,
    RejectedReply,
    TrainReply,
    add_flat,
    array_spec,
    parse_compressed_reply,
    parse_decline,
    parse_metrics_reply,
    parse_train_reply,
    reported_privacy,
    sample_node_ids,
    weighted_average,
    weighted_metrics,
)
from fedpriv.he.keys import fingerprint
from fedpriv.he.packing import FINGERPRINT, HEADER
from fedpriv.he.packing import RECORD as HE_RECORD
from fedpriv.secagg.encoding import WeightedEncoding
from fedpriv.secagg.messages import RECORD as SECAGG_RECORD
from fedpriv.secagg.messages import encoding_to_record
from strategies.client_privacy import REPLY_PRIVACY_KEYS, ClientPrivacyTally
from strategies.communication import TrafficTally
from strategies.nodes import NodeTracker
from strategies.robust import RobustAggregation
from strategies.server_optimizers import AUTO_SERVER_LR, DEFAULT_SERVER_LR, OptimizerState, ServerOptimizer
from strategies.he_server import EncryptedSum, parse_encrypted_reply
from strategies.secagg_server import SecAggOutcome, SecAggPlusRound, parse_setup_reply

logger = get_logger(__name__)

ALL_DECLINED = "every client has declined: record-level budget spent or privacy ledger missing"
MAX_WAIT_SECONDS = 1e7


class StopRun(Exception):
    """Raised by a strategy to end the run cleanly before the next round.

    The ServerApp catches it, saves the current model and records ``reason``
    as the run's ``stopped_reason``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class WeightedFedAvg(Strategy):
    """Federated averaging weighted by ``num-examples``, with reply validation.

    On valid replies, with the default ``sgd`` server step at ``server_lr = 1``,
    the new global model equals Flower's ``FedAvg``. Every reply is checked
    against the global model that was sent (names, shapes, dtypes, finite
    values, a positive finite ``num-examples``);
    error replies and malformed ones are rejected with a logged reason and
    counted in the round's ``num_rejected``. With fewer than
    ``min_valid_replies`` valid replies the previous model is kept.

    Clients that train with record-level DP report their cumulative
    ``epsilon`` and ``delta``, local-DP clients ``epsilon_local`` and
    ``delta_local``; the strategy reports the largest and the mean over
    clients as ``epsilon_record_max`` / ``epsilon_record_mean`` and
    ``epsilon_local_max`` / ``epsilon_local_mean``, counting the epsilon that
    rejected and declined replies report too (their privacy was spent all the
    same). A client
    over its budget declines (counted in ``num_declined``) and is not sampled
    again; once every node has declined the run stops with
    ``privacy_budget_exhausted``.

    Nodes that leave. ``min_available_nodes`` is a start condition only: the
    first round waits (at most ``node_wait_seconds``) until that many nodes
    are connected. Every later round samples from the nodes connected at that
    moment, however few, and logs a WARNING when nodes have gone since the
    last look; it waits (again at most ``node_wait_seconds``) only when none
    is connected. A node that dies while it holds a round's message leaves
    no reply: Flower 1.42 answers for it with a "node unavailable" error once
    the SuperNode has missed its heartbeats (2 x 30 s after its last one), or
    the round ends at ``round_timeout`` without it. Each round's metrics make
    this visible: ``num_available`` (nodes connected when the round sampled),
    ``num_lost_nodes`` (nodes connected earlier in the run that are gone by
    then), ``num_sampled`` and ``num_unreachable`` (sampled nodes with no
    reply: a "node unavailable" error or nothing by ``round_timeout``), so
    ``num_sampled = num_clients + num_rejected + num_declined +
    num_unreachable``.

    Server step and aggregation. ``aggregator`` says how a round's valid
    models are combined: the example-weighted mean, or a robust rule that
    ignores weights (:mod:`strategies.robust`). The server optimizer
    (:mod:`strategies.server_optimizers`) then steps from the global model
    with the aggregate; its state (momentum, moments) is part of
    :meth:`resume_state`. Every round reports ``server_update_norm``, the L2
    norm of the new global model minus the old one.

    Divergence. A round whose aggregated model has a non-finite value, or
    whose model the ServerApp finds non-finite on evaluation
    (:meth:`reject_model`), is not applied: the next round starts from the
    previous model and the round's metrics carry ``diverged = 1``. After
    ``max_diverged_rounds`` such rounds the run stops with ``diverged``.

    Secure aggregation. After :meth:`enable_secure_aggregation` every training
    round runs SecAgg+ (:mod:`strategies.secagg_server`): clients send their
    encoded update masked (:meth:`secure_encoding` says how to encode it) and
    the server sees only the survivors' sum, from which
    :meth:`aggregate_secure` makes the new model. A round with too few
    survivors keeps the previous model (``secagg_refused = 1``).

    Resuming. :meth:`resume_state` is what a checkpoint keeps and
    :meth:`restore` puts it back. Flower's round loop then counts from 1
    again; :meth:`run_round` turns its numbers into the run's, and everything
    (sampling seeds, round keys, metrics, the ServerApp's rows and
    checkpoints) uses those.

    Parameters
    ----------
    fraction_train : float
        Fraction of connected nodes sampled for training each round.
    min_train_nodes : int
        Lower bound on the number of nodes sampled for training.
    min_available_nodes : int
        Nodes that must be connected before the first round starts; later
        rounds go on with the nodes that are left.
    fraction_evaluate : float
        Fraction of nodes asked for federated evaluation (0 turns it off; the
        server always evaluates the global model on its own test split).
    min_evaluate_nodes : int
        Lower bound on nodes sampled for federated evaluation when it is on.
    min_valid_replies : int
        Valid replies needed to update the model in a round.
    server_optimizer : str
        ``sgd`` (``global + server_lr * (aggregate - global)``, with
        ``server_momentum``: FedAvgM), ``adam``, ``yogi`` or ``adagrad``
        (Reddi et al. 2021; see :class:`strategies.server_optimizers.ServerOptimizer`).
    server_lr : float or str
        The server learning rate; ``"auto"`` takes the optimizer's default
        (:data:`strategies.server_optimizers.DEFAULT_SERVER_LR`: 1 for
        ``sgd``, Flower's for the others).
    server_momentum : float
        ``sgd`` only: momentum in ``[0, 1)``.
    beta1, beta2, tau : float
        ``adam``, ``yogi``, ``adagrad``: moment decays and adaptivity.
    aggregator : str
        ``mean`` (weighted by ``num-examples``), ``median``, ``trimmed_mean``
        or ``krum`` (unweighted; see :class:`strategies.robust.RobustAggregation`).
    trim_fraction : float
        ``trimmed_mean``: the fraction cut from each end, in ``[0, 0.5)``.
    num_byzantine : int
        ``krum``: the number of attackers assumed.
    seed : int
        Seed of the node sampling (per round, over the sorted node ids).
    node_wait_seconds : float
        How long to wait for ``min_available_nodes`` before the first round,
        and for at least one node in a later round, before failing.
    max_diverged_rounds : int
        Rounds with a non-finite model that are skipped before the run stops
        with ``stopped_reason: diverged``.
    """

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        min_available_nodes: int = 1,
        fraction_evaluate: float = 0.0,
        min_evaluate_nodes: int = 1,
        min_valid_replies: int = 1,
        server_optimizer: str = "sgd",
        server_lr: float | str = AUTO_SERVER_LR,
        server_momentum: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        aggregator: str = "mean",
        trim_fraction: float = 0.2,
        num_byzantine: int = 0,
        seed: int = 0,
        node_wait_seconds: float = 300.0,
        max_diverged_rounds: int = 3,
    ) -> None:
        check_fraction("strategy.fraction_train", fraction_train)
        check_fraction("strategy.fraction_evaluate", fraction_evaluate)
        check_int("strategy.min_train_nodes", min_train_nodes, minimum=0)
        check_int("strategy.min_available_nodes", min_available_nodes, minimum=0)
        check_int("strategy.min_evaluate_nodes", min_evaluate_nodes, minimum=0)
        check_int("strategy.min_valid_replies", min_valid_replies, minimum=1)
        check_int("strategy.max_diverged_rounds", max_diverged_rounds, minimum=1)
        check_int("strategy.seed", seed, minimum=0)
        check_real("strategy.node_wait_seconds", node_wait_seconds, minimum=0.0, maximum=MAX_WAIT_SECONDS)
        if fraction_train == 0.0 and min_train_nodes == 0:
            raise ValueError("strategy.fraction_train=0.0: with min_train_nodes=0 no client would train")
        self.fraction_train = float(fraction_train)
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.fraction_evaluate = float(fraction_evaluate)
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_valid_replies = min_valid_replies
        self.optimizer = ServerOptimizer(
            name=server_optimizer,
            lr=DEFAULT_SERVER_LR.get(server_optimizer, 1.0) if server_lr == AUTO_SERVER_LR else server_lr,
            momentum=server_momentum,
            beta1=beta1,
            beta2=beta2,
            tau=tau,
        )
        self.optimizer_state = OptimizerState()
        self._round_start_state = self.optimizer_state  # restored when the round's model is rejected
        self.robust = RobustAggregation(name=aggregator, trim_fraction=trim_fraction, num_byzantine=num_byzantine)
        self.seed = seed
        self.node_wait_seconds = node_wait_seconds
        self.max_diverged_rounds = max_diverged_rounds
        self.num_diverged = 0
        self._sent: ArrayRecord | None = None  # the global model of the current round
        self._revert_to: ArrayRecord | None = None  # set when that round's result is rejected
        self.train_metrics: dict[int, dict[str, float]] = {}
        self.stop: StopRun | None = None
        self.client_privacy = ClientPrivacyTally()
        self.traffic = TrafficTally()
        self.nodes = NodeTracker(min_available_nodes=min_available_nodes, wait_seconds=node_wait_seconds)
        self.completed_rounds = 0  # before this process: a resumed run goes on after them
        self._round_nodes: dict[int, dict[str, int]] = {}  # per round, from configure_train
        self._round_sampled: dict[int, list[int]] = {}  # the nodes sent each round's model
        self._round = 0
        self._global: list[np.ndarray] = []
        self._spec: ArraySpec = {}
        self.secure = None  # a fedpriv.secagg.SecAggPlus once secure aggregation is on
        self._secure_round: SecAggPlusRound | None = None
        self._encoding: Any = None  # how this round's clients encode their update
        self._grid: Grid | None = None
        self._round_stats: dict[str, float] = {}  # what aggregating this round measured, for round_metrics
        self.compression = None  # a fedpriv.compression.Quantize or TopK: replies carry a compressed update
        self.he = None  # a fedpriv.he.CKKS once the model is kept encrypted
        self.he_context: Any = None  # its public TenSEAL context (never a secret key)
        self._he_chunks = 0
        self._he_extra: dict[str, ConfigRecord] = {}  # the public key's fingerprint, sent to clients
        self.federated_scores: dict[int, dict[str, float]] = {}  # per round, under secure=ckks

    supports_secure_aggregation = True
    """Whether :meth:`enable_secure_aggregation` may be called."""

    def enable_secure_aggregation(self, secure, *, dimension: int | None = None) -> None:
        """Run every training round through SecAgg+ with ``secure`` (a :class:`fedpriv.secagg.SecAggPlus`).

        ``dimension`` (values in the model) lets a subclass check its noise
        fits the modulus now rather than in the first round.

        Raises
        ------
        ValueError
            If this strategy needs to see individual updates (adaptive
            clipping, a robust aggregator).
        """
        if not self.supports_secure_aggregation:
            raise ValueError(
                f"secure={secure.name}: {type(self).__name__} needs each client's update in the clear "
                "(adaptive clipping counts clipped updates); use strategy=dp_fixed"
            )
        self._refuse_robust_without_updates(secure)
        self.secure = secure

    def enable_compression(self, compression) -> None:
        """Decode every training reply with ``compression`` (a :class:`fedpriv.compression.Quantize` or ``TopK``).

        Raises
        ------
        ValueError
            With secure aggregation or homomorphic encryption on: they encode updates themselves.
        """
        if self.secure is not None or self.he is not None:
            raise ValueError(
                f"compression={compression.name}: secure aggregation and encryption encode updates themselves; "
                "use compression=none with them"
            )
        self.compression = compression

    supports_homomorphic_encryption = True
    """Whether :meth:`enable_homomorphic_encryption` may be called."""

    def enable_homomorphic_encryption(
        self, ckks, *, dimension: int, public_context: Any = None, evaluate: bool = True
    ) -> None:
        """Keep the model encrypted under CKKS (``ckks``, a :class:`fedpriv.he.CKKS`); add clients' ciphertexts.

        The server holds ``public_context`` (no secret key) and ciphertexts
        only. It cannot evaluate, so with ``evaluate`` federated evaluation is
        turned on (every client, unless ``fraction_evaluate`` says otherwise;
        private clients would refuse it). ``dimension``
        (values in the model) fixes how many ciphertexts a reply holds.
        Without a context only the settings are checked.

        Raises
        ------
        ValueError
            If this strategy must read updates (DP, a robust aggregator), the
            server step is not plain FedAvg (an optimizer reads the model it
            steps from; an encrypted one cannot even be divided on the
            server), or the context holds a secret key.
        """
        if not self.supports_homomorphic_encryption:
            raise ValueError(
                f"secure={ckks.name}: {type(self).__name__} clips and noises updates on the server, which "
                "cannot read encrypted ones; use client=opacus for DP with secure=ckks"
            )
        self._refuse_robust_without_updates(ckks)
        optimizer = self.optimizer
        if optimizer.name != "sgd":
            raise ValueError(
                f"strategy.server_optimizer={optimizer.name!r}: secure={ckks.name} keeps the model encrypted, "
                "so the server can only add ciphertexts; use sgd with server_lr 1.0"
            )
        if optimizer.momentum != 0.0:
            raise ValueError(
                f"strategy.server_momentum={optimizer.momentum:g}: secure={ckks.name} needs 0 (plain FedAvg)"
            )
        if optimizer.lr != 1.0:
            raise ValueError(f"strategy.server_lr={optimizer.lr:g}: secure={ckks.name} needs 1.0 (plain FedAvg)")
        if public_context is not None and public_context.is_private():
            raise ValueError("the server's CKKS context holds a secret key: it must hold the public key only")
        self.he = ckks
        self.he_context = public_context
        self._he_extra = {}
        if public_context is not None:
            self._he_extra = {HE_RECORD: ConfigRecord({FINGERPRINT: fingerprint(public_context)})}
        self._he_chunks = -(-(dimension + HEADER) // ckks.slots)
        if evaluate and self.fraction_evaluate == 0.0:
            self.fraction_evaluate = 1.0

    def _refuse_robust_without_updates(self, secure) -> None:
        """Robust aggregators read every client's model: refuse a protocol that hides them.

        Raises
        ------
        ValueError
            Naming ``strategy.aggregator`` and the protocol.
        """
        if self.robust.enabled:
            raise ValueError(
                f"strategy.aggregator={self.robust.name!r}: secure={secure.name} hides each client's update from "
                "the server, and a robust aggregator must read each one; use strategy.aggregator=mean with it"
            )

    @property
    def encrypted_model(self) -> bool:
        """Whether the global model is kept encrypted (``secure=ckks``)."""
        return self.he is not None

    def secure_encoding(self, *, num_sampled: int, dimension: int) -> WeightedEncoding:
        """How clients encode their update for secure aggregation: weighted, no noise."""
        return WeightedEncoding(
            clipping_range=self.secure.clipping_range,
            quantization_range=self.secure.quantization_range,
            max_weight=self.secure.max_weight,
        )

    def secure_min_survivors(self, num_sampled: int) -> int:
        """Masked inputs a round needs before unmasking (beyond the reconstruction threshold)."""
        return 0

    def aggregate_secure(self, server_round: int, outcome: SecAggOutcome) -> list[np.ndarray]:
        """The weighted mean model from the survivors' sum; warns when ``clipping_range`` clipped values."""
        clipped = self._encoding.clipped_values(outcome.total)
        self._round_stats = {"secagg_clipped_values": clipped}
        if clipped:
            logger.warning(
                "round %d: clients clipped %d weighted update values to secure.clipping_range=%g; "
                "the model is not FedAvg's (raise secure.clipping_range)",
                server_round,
                clipped,
                self.secure.clipping_range,
            )
        return add_flat(self._global, self._encoding.decode(outcome.total))

    @property
    def client_level_private(self) -> bool:
        """Whether the run is client-level DP, so exact client statistics stay unpublished."""
        return False

    def summary(self) -> None:
        """Log the strategy's configuration."""
        logger.info(
            "%s: fraction_train=%.2f (min %d), fraction_evaluate=%.2f, min_available_nodes=%d, "
            "min_valid_replies=%d, seed=%d; server step %s, aggregator %s",
            type(self).__name__,
            self.fraction_train,
            self.min_train_nodes,
            self.fraction_evaluate,
            self.min_available_nodes,
            self.min_valid_replies,
            self.seed,
            self.optimizer,
            self.robust,
        )

    def _trainable_nodes(self, grid: Grid) -> list[int]:
        """Connected nodes that have not declined for lack of privacy budget.

        Raises
        ------
        StopRun
            When every connected node has declined.
        """
        connected = self.nodes.connected(grid, server_round=self._round)
        candidates = [node for node in connected if node not in self.client_privacy.declined]
        if connected and not candidates:
            raise StopRun("privacy_budget_exhausted", ALL_DECLINED)
        return candidates

    def sample_train_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """Choose this round's training nodes (subclasses change the sampling)."""
        return sample_node_ids(
            self._trainable_nodes(grid),
            fraction=self.fraction_train,
            min_nodes=self.min_train_nodes,
            seed=self.seed,
            server_round=server_round,
        )

    @staticmethod
    def _messages(
        *,
        arrays: ArrayRecord | None,
        config: ConfigRecord,
        server_round: int,
        node_ids: list[int],
        kind: str,
        extra: Mapping[str, ConfigRecord] | None = None,
    ) -> list[Message]:
        # A copy: the caller's ConfigRecord is never written into.
        round_config = ConfigRecord({**dict(config), ROUND_KEY: server_round})
        content = {"config": round_config} if arrays is None else {"arrays": arrays, "config": round_config}
        content.update(extra or {})
        return [
            Message(content=RecordDict(content), message_type=kind, dst_node_id=node_id)
            for node_id in node_ids
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send them the global model.

        Raises
        ------
        StopRun
            When an earlier round decided that the run must end.
        """
        server_round = self.run_round(server_round)
        if self.stop is not None:
            raise self.stop
        if self._revert_to is not None:
            # The last round's model was rejected: Flower's loop still holds it.
            arrays, self._revert_to = self._revert_to, None
        self._sent = arrays
        self._round_start_state = self.optimizer_state
        self._spec = array_spec(arrays)
        self._global = [array.numpy() for array in arrays.values()]
        self._round = server_round
        node_ids = self.sample_train_nodes(server_round, grid)
        self._round_nodes[server_round] = {**self.nodes.counts, "num_sampled": len(node_ids)}
        self._round_sampled[server_round] = list(node_ids)
        logger.debug("round %d: training on %d nodes", server_round, len(node_ids))
        extra = self._he_extra
        if self.secure is not None:
            extra = self._secure_setup(server_round, node_ids, grid)
            if extra is None:
                node_ids = []
        messages = self._messages(
            arrays=arrays,
            config=config,
            server_round=server_round,
            node_ids=node_ids,
            kind=MessageType.TRAIN,
            extra=extra,
        )
        self.traffic.sent(server_round, messages)
        return messages

    def _secure_setup(self, server_round: int, node_ids: list[int], grid: Grid) -> dict[str, ConfigRecord] | None:
        """Plan this round's SecAgg+ and return the setup record; ``None`` with fewer than 2 clients."""
        self._grid = grid
        self._secure_round = None
        if len(node_ids) < 2:
            logger.warning("round %d: %d client(s) sampled; secure aggregation needs 2", server_round, len(node_ids))
            return None
        dimension = sum(base.size for base in self._global)
        self._encoding = self.secure_encoding(num_sampled=len(node_ids), dimension=dimension)
        self._secure_round = SecAggPlusRound(
            config=self.secure,
            node_ids=node_ids,
            server_round=server_round,
            length=self._encoding.length(dimension),
            min_survivors=self.secure_min_survivors(len(node_ids)),
        )
        record = {**self._secure_round.setup_record(), **encoding_to_record(self._encoding)}
        return {SECAGG_RECORD: ConfigRecord(record)}

    def validate_train_replies(
        self, replies: Iterable[Message]
    ) -> tuple[list[TrainReply], int, list[MetricsReply]]:
        """Parse replies into valid ones, a count of rejected ones, and declines.

        The privacy a rejected reply reports (``epsilon``, ``delta``) is kept in
        the client privacy tally: the client spent it even though its model is
        not used.
        """
        if self.compression is not None:
            return self._sort_replies(
                replies,
                lambda msg: parse_compressed_reply(
                    msg, spec=self._spec, global_arrays=self._global, compression=self.compression
                ),
            )
        return self._sort_replies(replies, lambda msg: parse_train_reply(msg, spec=self._spec))

    def _sort_replies(self, replies: Iterable[Message], parse: Callable[[Message], Any]) -> tuple[list[Any], int, list[MetricsReply]]:
        """What ``parse`` makes of the replies it accepts, a count of rejected ones, and declines.

        ``parse`` raises ``RejectedReply`` for a reply it refuses. The privacy
        a rejected reply reports (``epsilon``, ``delta``) is kept in the client
        privacy tally: the client spent it even though its reply is not used.
        """
        accepted, rejected, declined = [], 0, []
        for msg in replies:
            try:
                decline = parse_decline(msg)
                if decline is None:
                    accepted.append(parse(msg))
                else:
                    declined.append(decline)
                    logger.warning("node %d declined: %s", decline.node_id, decline.reason)
            except RejectedReply as exc:
                rejected += 1
                logger.warning("rejected reply: %s", exc)
                spent = reported_privacy(msg, privacy_keys=REPLY_PRIVACY_KEYS)
                if spent:
                    self.client_privacy.track(
                        [MetricsReply(node_id=msg.metadata.src_node_id, num_examples=1.0, metrics=spent)]
                    )
        return accepted, rejected, declined

    def releases_update(self, valid: list[TrainReply]) -> bool:
        """Whether this round updates the model (enough valid replies)."""
        return len(valid) >= self.min_valid_replies

    def aggregate_updates(self, server_round: int, valid: list[TrainReply]) -> list[np.ndarray]:
        """Example-weighted average of the clients' models, or the robust aggregator's (subclasses add privacy)."""
        models = [r.arrays for r in valid]
        if not self.robust.enabled:
            return weighted_average(models, [r.num_examples for r in valid])
        if self.robust.name == "krum" and len(valid) < 2 * self.robust.num_byzantine + 3:
            logger.warning(
                "round %d: krum with strategy.num_byzantine=%d needs at least %d valid replies for its "
                "guarantee, got %d",
                server_round,
                self.robust.num_byzantine,
                2 * self.robust.num_byzantine + 3,
                len(valid),
            )
        combined, self._round_stats = self.robust.combine(models, node_ids=[r.node_id for r in valid])
        return combined

    def _to_record(self, arrays: list[np.ndarray]) -> ArrayRecord:
        return ArrayRecord({name: Array(value) for name, value in zip(self._spec, arrays, strict=True)})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, average the valid ones and apply the server step.

        A "node unavailable" error (Flower's stand-in for the reply of a
        SuperNode that stopped sending heartbeats) and a sampled node without
        any reply by ``round_timeout`` count in ``num_unreachable``, not in
        ``num_rejected``.
        """
        server_round = self.run_round(server_round)
        replies = list(replies)
        # Flower's stand-in reply comes from the SuperLink (src_node_id 1), not
        # from the node: the unreachable nodes are the sampled ones without an
        # answer of their own.
        unavailable = sum(1 for msg in replies if _node_unavailable(msg))
        replies = [msg for msg in replies if not _node_unavailable(msg)]
        nodes = self._round_nodes.pop(server_round, {})
        sampled = self._round_sampled.pop(server_round, None)
        if sampled is not None:
            unreachable = sorted(set(sampled) - {msg.metadata.src_node_id for msg in replies})
            nodes["num_unreachable"] = len(unreachable)
            if unreachable:
                logger.warning(
                    "round %d: %d of %d sampled nodes unreachable (%s): %d by Flower's node-unavailable "
                    "error (missed heartbeats), %d without a reply by round_timeout",
                    server_round,
                    len(unreachable),
                    len(sampled),
                    ", ".join(map(str, unreachable)),
                    min(unavailable, len(unreachable)),
                    max(len(unreachable) - unavailable, 0),
                )
        elif unavailable:
            nodes["num_unreachable"] = unavailable
        # Flower's stand-in errors come from the SuperLink, not over a client's link.
        if self.he is not None:
            return self._aggregate_encrypted(server_round, replies, nodes)
        if self.secure is None:
            traffic = self.traffic.received(server_round, replies)
            metrics, target = self._plain_result(server_round, replies)
        else:
            self.traffic.arrived(server_round, replies)
            metrics, target = self._secure_result(server_round, replies)
            traffic = self.traffic.received(server_round, [])
        metrics.update({**nodes, **traffic})
        arrays = None
        if target is not None:
            updated, state = self.optimizer.step(global_arrays=self._global, aggregate=target, state=self.optimizer_state)
            if all(np.all(np.isfinite(layer)) for layer in updated):
                arrays = self._to_record(updated)
                # A rejected model leaves the optimizer's state as it was, too.
                self.optimizer_state = state
                metrics["server_update_norm"] = float(
                    np.linalg.norm(flat_vector(updated) - flat_vector(self._global))
                )
        metrics.update(self.round_metrics(server_round))
        self.train_metrics[server_round] = metrics
        if arrays is None and target is not None:
            self.reject_model(server_round, reason="the aggregated model has non-finite values")
        # Flower logs what this returns: under client-level DP only DP outputs.
        published, _ = split_public(
            metrics, public=CLIENT_LEVEL_PUBLIC_ROUND if self.client_level_private else None
        )
        return arrays, MetricRecord({k: v for k, v in published.items() if v is not None})

    def _aggregate_encrypted(
        self, server_round: int, replies: list[Message], nodes: dict[str, int]
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """Add the clients' encrypted, weighted models; the sum stays encrypted.

        A reply whose ciphertexts do not deserialize under the public context,
        or that holds another number of them than the model needs, is
        rejected and counted.
        """
        traffic = self.traffic.received(server_round, replies)
        total = EncryptedSum(self.he_context)

        def add(msg: Message) -> MetricsReply:
            node_id, record, spent = parse_encrypted_reply(msg, num_chunks=self._he_chunks)
            try:
                total.add(record)
            except ValueError as exc:
                raise RejectedReply(f"node {node_id}: {exc}") from exc
            return MetricsReply(node_id=node_id, num_examples=1.0, metrics=spent)

        reporting, rejected, declined = self._sort_replies(replies, add)
        self._note_declines(declined)
        metrics = {
            "num_clients": total.count,
            "num_rejected": rejected,
            "num_declined": len(declined),
            "train_loss": None,
            **self.client_privacy.track([*reporting, *declined]),
            **nodes,
            **traffic,
        }
        self.train_metrics[server_round] = metrics
        published = MetricRecord({k: v for k, v in metrics.items() if v is not None})
        if total.count < self.min_valid_replies:
            logger.warning(
                "round %d: %d valid replies < min_valid_replies=%d; keeping the previous model",
                server_round,
                total.count,
                self.min_valid_replies,
            )
            return None, published
        return total.record(), published

    def _note_declines(self, declined: list[MetricsReply]) -> None:
        self.client_privacy.decline(d.node_id for d in declined)
        if self.client_privacy.everyone_declined(self.nodes.known):
            self.stop = StopRun("privacy_budget_exhausted", ALL_DECLINED)

    def _plain_result(self, server_round: int, replies: list[Message]) -> tuple[dict[str, Any], list[np.ndarray] | None]:
        """The round's metrics and aggregated model (``None``: keep the previous one) from plain replies."""
        valid, rejected, declined = self.validate_train_replies(replies)
        self._note_declines(declined)
        weights = [r.num_examples for r in valid]
        client_metrics = weighted_metrics([r.metrics for r in valid], weights)
        metrics = {
            "num_clients": len(valid),
            "num_rejected": rejected,
            "num_declined": len(declined),
            "train_loss": client_metrics.pop("train_loss", None),
            **{f"client_{key}": value for key, value in client_metrics.items()},
            **self.client_privacy.track([*valid, *declined]),
        }
        if not self.releases_update(valid):
            logger.warning(
                "round %d: %d valid replies (%d rejected) < min_valid_replies=%d; keeping the previous model",
                server_round,
                len(valid),
                rejected,
                self.min_valid_replies,
            )
            return metrics, None
        return metrics, self.aggregate_updates(server_round, valid)

    def _secure_result(self, server_round: int, replies: list[Message]) -> tuple[dict[str, Any], list[np.ndarray] | None]:
        """Finish the round's SecAgg+ from its setup replies; the metrics and the model from the sum.

        No client's update reaches this method: setup replies hold public keys
        and the privacy a client reports, and the protocol returns only the sum.
        """
        accepted, rejected, declined = self._sort_replies(replies, parse_setup_reply)
        public_keys = {node_id: keys for node_id, keys, _ in accepted}
        reporting = [MetricsReply(node_id=node_id, num_examples=1.0, metrics=spent) for node_id, _, spent in accepted]
        self._note_declines(declined)
        if self._secure_round is None:
            outcome = SecAggOutcome(total=None, survivors=0, refused="fewer than 2 clients sampled")
        else:
            outcome = self._secure_round.finish(self._exchange(server_round), public_keys=public_keys)
        metrics = {
            "num_clients": outcome.survivors,
            "num_rejected": rejected,
            "num_declined": len(declined),
            "train_loss": None,
            "secagg_dropped": len(public_keys) - outcome.survivors,
            "secagg_refused": int(outcome.total is None),
            **self.client_privacy.track([*reporting, *declined]),
        }
        if outcome.total is None:
            return metrics, None
        if outcome.survivors < self.min_valid_replies:
            logger.warning(
                "round %d: %d survivors < min_valid_replies=%d; keeping the previous model",
                server_round,
                outcome.survivors,
                self.min_valid_replies,
            )
            return metrics, None
        return metrics, self.aggregate_secure(server_round, outcome)

    def _exchange(self, server_round: int):
        """One protocol stage on the round's Grid, its bytes counted with the round's."""

        def exchange(messages: list[Message], timeout: float) -> list[Message]:
            self.traffic.sent(server_round, messages)
            replies = list(self._grid.send_and_receive(messages, timeout=timeout)) if messages else []
            self.traffic.arrived(server_round, replies)
            return replies

        return exchange

    def round_metrics(self, server_round: int) -> dict[str, float]:
        """What aggregating this round measured (subclasses add privacy spent, noise, ...)."""
        stats, self._round_stats = self._round_stats, {}
        return stats

    def reject_model(self, server_round: int, *, reason: str) -> None:
        """Do not apply round ``server_round``'s model: the next round starts from the previous one.

        Counts the round as diverged (``diverged = 1`` in its metrics); after
        ``max_diverged_rounds`` of them the run is stopped with ``diverged``.
        ``server_round`` is the run's round number (after any resume).
        """
        self._revert_to = self._sent
        self.optimizer_state = self._round_start_state
        self.num_diverged += 1
        self.train_metrics.setdefault(server_round, {})["diverged"] = 1
        logger.warning(
            "round %d: %s; keeping the previous model (%d of at most %d such rounds)",
            server_round,
            reason,
            self.num_diverged,
            self.max_diverged_rounds,
        )
        if self.num_diverged >= self.max_diverged_rounds:
            self.stop = StopRun(
                "diverged",
                f"{self.num_diverged} rounds gave a non-finite model (strategy.max_diverged_rounds="
                f"{self.max_diverged_rounds}); the last finite model is saved",
            )

    def privacy_summary(self) -> dict[str, float | None]:
        """Privacy spent by the whole run; ``None`` where that kind of privacy is off."""
        return {"epsilon_user": None, "delta_user": None, **self.client_privacy.summary()}

    def resume_state(self) -> dict[str, Any]:
        """What a checkpoint keeps so that :meth:`restore` can go on after this round.

        The server optimizer's state travels as tensors (``torch.load`` with
        ``weights_only`` reads them back bit for bit).
        """
        return {
            **self.client_privacy.state(),
            **self.traffic.state(),
            "server_optimizer": self.optimizer_state.to_checkpoint(),
        }

    def run_round(self, flower_round: int) -> int:
        """The run's number of Flower's round ``flower_round`` (Flower counts from 1 in every process).

        The one place where resuming shifts round numbers: sampling seeds,
        round keys, metrics and checkpoints all use the run's numbers.
        """
        return flower_round + self.completed_rounds

    def restore(self, state: Mapping[str, Any], *, completed_rounds: int) -> None:
        """Go on from a checkpoint: ``state`` from :meth:`resume_state` after ``completed_rounds``."""
        if isinstance(completed_rounds, bool) or not isinstance(completed_rounds, int) or completed_rounds < 0:
            raise ValueError(f"completed_rounds={completed_rounds!r}: must be an integer >= 0")
        self.completed_rounds = completed_rounds
        self.client_privacy.restore(state)
        self.traffic.restore(state)
        self.optimizer_state = self._round_start_state = OptimizerState.from_checkpoint(
            state.get("server_optimizer", {})
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask a sample of nodes to evaluate the global model (off when fraction is 0)."""
        if self.fraction_evaluate == 0.0:
            return []
        server_round = self.run_round(server_round)
        self._round = server_round
        node_ids = sample_node_ids(
            self.nodes.connected(grid, server_round=server_round),
            fraction=self.fraction_evaluate,
            min_nodes=self.min_evaluate_nodes,
            seed=self.seed + 1,
            server_round=server_round,
        )
        return self._messages(
            arrays=arrays,
            config=config,
            server_round=server_round,
            node_ids=node_ids,
            kind=MessageType.EVALUATE,
            extra=self._he_extra,
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of valid evaluation replies."""
        valid = []
        for msg in replies:
            try:
                valid.append(parse_metrics_reply(msg))
            except RejectedReply as exc:
                logger.warning("rejected evaluation reply: %s", exc)
        if not valid:
            return None
        scores = weighted_metrics([r.metrics for r in valid], [r.num_examples for r in valid])
        self.federated_scores[self.run_round(server_round)] = scores
        return MetricRecord(scores)


def _node_unavailable(msg: Message) -> bool:
    """Whether ``msg`` is Flower's error reply for a node that went offline."""
    return msg.has_error() and msg.error.code == ErrorCode.NODE_UNAVAILABLE
