"""The fedpriv ClientApp (Flower message API).

Every message rebuilds nothing expensive: the experiment, the dataset and the
partition are cached per process (one Ray actor or one ``flwr-clientapp``
process), keyed by the run config.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import he_client
from clients.node_state import node_state_path, restore_node_state, save_node_state
from clients.privacy_state import STATE_KEY, PrivacyBudgetExhausted
from fedpriv.allocator import keep_freed_memory
from fedpriv.compression import PAYLOAD, RESIDUAL_RECORD
from fedpriv.devices import client_device
from fedpriv.experiment import client_examples, experiment_from_run_config
from fedpriv.flat import flat_vector
from fedpriv.logs import get_logger
from fedpriv.metrics import dataset_metrics
from fedpriv.protocol import (
    DECLINE_REASON_KEY,
    DECLINED_KEY,
    LEDGER_KEY,
    LOCAL_BASIC_EPSILON_KEY,
    PRIVACY_REPLY_KEYS,
    RESUMED_KEY,
    ROUND_KEY,
    WEIGHT_KEY,
)
from fedpriv.secagg import client as secagg_client
from fedpriv.secagg import messages as secagg
from fedpriv.secagg.messages import RECORD as SECAGG_RECORD

logger = get_logger(__name__)

# What is imported by now lives as long as the process: keep it out of the
# garbage collector's passes. The last pass, at exit, would cost 0.4 s of CPU
# after importing torch, in every fresh flwr-clientapp process of a deployment.
gc.freeze()
# Training steps reuse the memory the previous step freed instead of faulting it in again.
keep_freed_memory()

# Error codes of replies that carry no result (the server counts them as rejected).
DATA_ERROR = 101
TRAIN_ERROR = 102
EVALUATE_REFUSED = 103
SECURE_REFUSED = 104
KEY_ERROR = 105
DEVICE_ERROR = 106
PRIVACY_METRIC_KEYS = frozenset(
    {key for keys in PRIVACY_REPLY_KEYS.values() for key in keys} | {LOCAL_BASIC_EPSILON_KEY}
)
"""Reply metrics a secure round's setup reply may carry: the privacy a client has spent."""

app = ClientApp()


def _node_partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def _error_reply(msg: Message, *, code: int, reason: str) -> Message:
    logger.error("client reply error %d: %s", code, reason)
    return Message(error=Error(code=code, reason=reason), reply_to=msg)


def _decline_reply(msg: Message, *, reason: str, privacy: dict[str, float]) -> Message:
    """A reply without a model: the client is healthy but may not spend more privacy.

    Its weight is 1 (data-independent); ``privacy`` holds the ``epsilon`` and
    ``delta`` spent so far, when the client knows them.
    """
    metrics = {WEIGHT_KEY: 1, DECLINED_KEY: 1, **privacy}
    content = {"metrics": MetricRecord(metrics), "config": ConfigRecord({DECLINE_REASON_KEY: reason})}
    return Message(content=RecordDict(content), reply_to=msg)


def training_seed(*, experiment, server_round: int, partition_id: int) -> int | None:
    """The seed of this round's local training; ``None`` (OS entropy) for private training.

    Private training draws its noise and Poisson batches from the operating
    system unless the run asks for ``seeded_noise`` (tests only: anyone who
    knows ``seed`` could then replay the noise).
    """
    if experiment.client.privacy_level is not None and not experiment.settings.seeded_noise:
        return None
    # Distinct, reproducible streams per (run seed, round, client).
    return int(
        np.random.SeedSequence([experiment.settings.seed, server_round, partition_id]).generate_state(1)[0]
    )


class DataError(Exception):
    """This node's data could not be loaded; ``reason`` is what the reply may say."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeyProblem(Exception):
    """``secure=ckks``: this node has no usable key for the run; ``reason`` is what the reply says."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Prepared:
    """What a message needs: the experiment, this node's examples and the received global model."""

    experiment: Any
    partition_id: int
    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    he_context: Any = None  # secure=ckks: this node's secret TenSEAL context


def _prepare(msg: Message, context: Context, *, held_out: bool = False) -> Prepared:
    """Rebuild the experiment, this node's data and the global model from ``msg``.

    With ``secure=ckks`` the global model is decrypted with this node's key,
    and the examples are the training part of the partition, or with
    ``held_out`` the part kept for federated evaluation.

    Raises
    ------
    DataError
        With the config error's text, or, once the data is read, the loader's
        text for a non-private client only: a loader's message can quote the
        data (a CSV cell), which a private client must not send.
    KeyProblem
        ``secure=ckks``: the key is missing, unreadable, not the server's, or
        does not decrypt the model.
    """
    try:
        experiment = experiment_from_run_config(context.run_config)
    except (OSError, ValueError) as exc:
        raise DataError(str(exc)) from exc
    partition_id, num_partitions = _node_partition(context)
    try:
        x, y = client_examples(experiment, partition_id=partition_id, num_partitions=num_partitions)
        model = experiment.build_model()
    except (OSError, ValueError) as exc:
        if experiment.client.privacy_level is None:
            raise DataError(str(exc)) from exc
        logger.error("client data could not be loaded: %s", exc)
        raise DataError(f"{type(exc).__name__} (a private client keeps the details in its own log)") from exc
    if experiment.secure.name != "ckks":
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        return Prepared(experiment=experiment, partition_id=partition_id, model=model, x=x, y=y)
    try:
        he_context, own = he_client.secret_context(
            experiment.secure, node_config=context.node_config, run_config=context.run_config
        )
        he_client.check_server_key(msg, own)
        he_client.load_global_model(model, msg.content["arrays"], context=he_context)
    except ValueError as exc:
        raise KeyProblem(f"secure=ckks: {exc}") from exc
    train, evaluation = he_client.held_out_split(
        x, y, fraction=experiment.secure.eval_fraction, seed=experiment.settings.seed, partition_id=partition_id
    )
    x, y = evaluation if held_out else train
    return Prepared(experiment=experiment, partition_id=partition_id, model=model, x=x, y=y, he_context=he_context)


@dataclass(frozen=True)
class TrainedRound:
    """A round's local training that succeeded: what the reply is made from."""

    experiment: Any
    model: torch.nn.Module
    outcome: Any
    seed: int | None
    he_context: Any = None


def _train_locally(msg: Message, context: Context) -> TrainedRound | Message:
    """Train the received global model on this node's partition; an error or decline reply if it cannot."""
    try:
        prepared = _prepare(msg, context)
    except DataError as exc:
        return _error_reply(msg, code=DATA_ERROR, reason=f"client data could not be loaded: {exc.reason}")
    except KeyProblem as exc:
        return _error_reply(msg, code=KEY_ERROR, reason=exc.reason)
    experiment, partition_id, model, x, y = prepared.experiment, prepared.partition_id, prepared.model, prepared.x, prepared.y
    # audit.level=record: the included canary records of this client join its training data.
    x, y = experiment.audit.client_data(
        x,
        y,
        partition_id=partition_id,
        num_partitions=_node_partition(context)[1],
        input_shape=experiment.dataset.input_shape,
        num_classes=experiment.dataset.num_classes,
    )
    server_round = int(msg.content["config"][ROUND_KEY])
    seed = training_seed(experiment=experiment, server_round=server_round, partition_id=partition_id)
    state_path = node_state_path(
        node_config=context.node_config,
        run_config=context.run_config,
        ledger_id=str(msg.content["config"].get(LEDGER_KEY, "")),
        partition_id=partition_id,
    )
    try:
        if state_path is not None and restore_node_state(context.state, state_path):
            logger.info("round %d: privacy ledger restored from %s", server_round, state_path)
    except ValueError as exc:
        # Training without the ledger would forget the epsilon it holds.
        return _error_reply(msg, code=DATA_ERROR, reason=str(exc))
    resumed_after = int(msg.content["config"].get(RESUMED_KEY, 0))
    private = experiment.client.privacy_level is not None
    if private and resumed_after and STATE_KEY not in context.state.config_records:
        # It cannot tell a lost ledger from one it never wrote: starting from
        # zero could under-report its epsilon, so it trains no more in this run.
        reason = (
            f"resumed after round {resumed_after} without this client's privacy ledger "
            f"({state_path or 'no ledger folder: set output_dir or the node config ledger-dir'}); "
            "its epsilon so far is unknown"
        )
        logger.warning("declining round %d: %s", server_round, reason)
        return _decline_reply(msg, reason=reason, privacy={})
    try:
        outcome = experiment.client.fit(
            model, x, y, seed=seed, state=context.state, planned_rounds=experiment.settings.num_rounds
        )
    except PrivacyBudgetExhausted as exhausted:
        logger.warning("declining round %d: %s", server_round, exhausted)
        if state_path is not None:
            # A first round's count release is accounted even when declining.
            save_node_state(context.state, state_path)
        return _decline_reply(msg, reason=str(exhausted), privacy=exhausted.reply_metrics())
    except (RuntimeError, ValueError) as exc:
        return _error_reply(msg, code=TRAIN_ERROR, reason=f"local training failed: {exc}")
    if state_path is not None:
        save_node_state(context.state, state_path)
    return TrainedRound(experiment=experiment, model=model, outcome=outcome, seed=seed, he_context=prepared.he_context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's partition for one round.

    A message with a SecAgg+ record is one stage of a secure round
    (:func:`secure_stage`); a client of a ``secure=secagg`` run answers
    nothing else, so its update never leaves it unmasked.
    """
    # One simulated client per core: intra-op threads would only contend.
    torch.set_num_threads(1)
    if SECAGG_RECORD in msg.content.config_records:
        return secure_stage(msg, context)
    if _secure_run(context):
        return _error_reply(
            msg, code=SECURE_REFUSED, reason="secure=secagg: this client sends its update only through SecAgg+"
        )
    trained = _train_locally(msg, context)
    if isinstance(trained, Message):
        return trained
    outcome = trained.outcome
    if trained.he_context is not None:
        return _encrypted_reply(msg, trained)
    loss = {} if outcome.loss is None else {"train_loss": outcome.loss}
    metrics = {WEIGHT_KEY: outcome.num_examples, **loss, **outcome.metrics}
    compression = trained.experiment.compression
    arrays = (
        compressed_update(msg, trained, state=context.state) if compression.enabled else ArrayRecord(trained.model.state_dict())
    )
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def compressed_update(msg: Message, trained: TrainedRound, *, state: RecordDict) -> ArrayRecord:
    """The update (trained minus received model, one flat vector), compressed.

    Top-k adds the residual it left out last time (kept in ``state``) and
    keeps what it leaves out now. Compressing a privatized update is
    post-processing: it costs no epsilon.
    """
    compression = trained.experiment.compression
    received = flat_vector(array.numpy() for array in msg.content["arrays"].values())
    update = flat_vector(value.detach().cpu().numpy() for value in trained.model.state_dict().values()) - received
    if compression.name == "topk":
        residual = state.array_records.get(RESIDUAL_RECORD)
        if residual is not None and residual[PAYLOAD].numpy().shape == update.shape:
            update = update + residual[PAYLOAD].numpy()
        payload, left_out = compression.encode(PAYLOAD, update)
        state[RESIDUAL_RECORD] = ArrayRecord({PAYLOAD: Array(left_out)})
    else:
        # Quantization's rounding uses the training seed: fresh OS entropy for a private client.
        payload = compression.encode(PAYLOAD, update, rng=np.random.default_rng(trained.seed))
    return ArrayRecord({name: Array(value) for name, value in payload.items()})


def _encrypted_reply(msg: Message, trained: TrainedRound) -> Message:
    """``secure=ckks``: the weighted model encrypted; in the clear only the privacy the client reports."""
    secure = trained.experiment.secure
    arrays = he_client.encrypted_model(
        trained.model, context=trained.he_context, num_examples=trained.outcome.num_examples, secure=secure
    )
    content = {"arrays": arrays}
    privacy = {k: v for k, v in trained.outcome.metrics.items() if k in PRIVACY_METRIC_KEYS}
    if privacy:
        content["metrics"] = MetricRecord(privacy)
    return Message(content=RecordDict(content), reply_to=msg)


def _secure_run(context: Context) -> bool:
    try:
        return experiment_from_run_config(context.run_config).secure.name == "secagg"
    except (OSError, ValueError):
        return False


def secure_stage(msg: Message, context: Context) -> Message:
    """Answer one SecAgg+ stage; the setup stage trains first and keeps the encoded update.

    The encoded update waits in ``context.state`` (never in a reply) until
    the masking stage; the protocol state (secret keys, shares) lives there
    too, for this round only, and is never written to the node's ledger file.
    """
    record = msg.content.config_records[SECAGG_RECORD]
    stage = record.get(secagg.STAGE)
    try:
        if stage == secagg.SETUP:
            return _secure_setup(msg, context, record)
        if SECAGG_RECORD not in context.state.config_records:
            raise ValueError(f"stage {stage!r} without a setup in this round")
        protocol = dict(context.state.config_records[SECAGG_RECORD])
        if stage == secagg.SHARE_KEYS:
            protocol, answer = secagg_client.share_keys(protocol, record)
            context.state[SECAGG_RECORD] = ConfigRecord(protocol)
            return Message(content=RecordDict({SECAGG_RECORD: ConfigRecord(answer)}), reply_to=msg)
        if stage == secagg.COLLECT_MASKED:
            encoded = context.state.array_records[secagg.INPUT_RECORD]["input"].numpy()
            protocol, masked = secagg_client.collect_masked(protocol, record, encoded=encoded)
            context.state[SECAGG_RECORD] = ConfigRecord(protocol)
            del context.state[secagg.INPUT_RECORD]
            content = RecordDict({secagg.MASKED: ArrayRecord({secagg.MASKED: Array(masked)})})
            return Message(content=content, reply_to=msg)
        if stage == secagg.UNMASK:
            answer = secagg_client.unmask(protocol, record)
            # One answer per round: a second request could pair seed and key shares.
            del context.state[SECAGG_RECORD]
            return Message(content=RecordDict({SECAGG_RECORD: ConfigRecord(answer)}), reply_to=msg)
        raise ValueError(f"stage={stage!r}: not a SecAgg+ stage")
    except (KeyError, TypeError, ValueError) as exc:
        return _error_reply(msg, code=SECURE_REFUSED, reason=f"secure aggregation: {type(exc).__name__}: {exc}")


def check_noise_floor(encoding: Any, *, experiment: Any, dimension: int) -> None:
    """Refuse to add less noise than the run's published config implies (``encoding``: a ``DistributedDPEncoding``).

    The client rebuilds the run's noise plan from its own config and checks
    the server's request: the same grid, the same clipping, and at least the
    share each client adds when every one of ``num_clients`` is sampled.

    Raises
    ------
    ValueError
        Naming what the server asked for and what the config implies.
    """
    from fedpriv.secagg.encoding import plan_distributed_noise

    strategy = experiment.strategy_config
    plan = plan_distributed_noise(
        clipping_norm=strategy["clipping_norm"],
        noise_multiplier=strategy["noise_multiplier"],
        max_clients=experiment.settings.num_clients,
        dimension=dimension,
        modulus=experiment.secure.modulus_range,
        dropout_tolerance=experiment.secure.dropout_tolerance,
    )
    floor = plan.variance_per_client(experiment.settings.num_clients)
    if encoding.scale != plan.scale or encoding.clipping_norm != strategy["clipping_norm"]:
        raise ValueError(
            f"the server's grid (scale {encoding.scale:g}, clipping_norm {encoding.clipping_norm:g}) is not "
            f"the run's (scale {plan.scale:g}, clipping_norm {strategy['clipping_norm']:g})"
        )
    if encoding.variance_per_client < floor * (1 - 1e-9):
        raise ValueError(
            f"the server asks for noise variance {encoding.variance_per_client:.6g} per client, below the "
            f"{floor:.6g} the run's config implies"
        )


def _secure_setup(msg: Message, context: Context, record: ConfigRecord) -> Message:
    """Train, encode the update for the round's sum, keep it, and answer with fresh public keys."""
    for name in (SECAGG_RECORD, secagg.INPUT_RECORD):
        if name in context.state:
            del context.state[name]
    encoding = secagg.encoding_from_record(record)
    if "arrays" not in msg.content.array_records:
        raise ValueError("the setup message carries no model")
    received = flat_vector(array.numpy() for array in msg.content.array_records["arrays"].values())
    trained = _train_locally(msg, context)
    if isinstance(trained, Message):
        return trained
    update = flat_vector(value.detach().cpu().numpy() for value in trained.model.state_dict().values()) - received
    if record[secagg.ENCODING] == "distributed-dp":
        check_noise_floor(encoding, experiment=trained.experiment, dimension=received.size)
    # The DP noise and the rounding draw from the operating system, never from the
    # config's seed (a plain client's training is seeded; its noise must not be).
    rng = np.random.default_rng(trained.seed if trained.experiment.settings.seeded_noise else None)
    encoded = encoding.encode(update, num_examples=trained.outcome.num_examples, rng=rng)
    protocol, answer = secagg_client.setup(node_id=msg.metadata.dst_node_id, config=record)
    context.state[SECAGG_RECORD] = ConfigRecord(protocol)
    context.state[secagg.INPUT_RECORD] = ArrayRecord({"input": Array(encoded)})
    # Only what the threat model publishes: the privacy this client has spent.
    content = {SECAGG_RECORD: ConfigRecord(answer)}
    if trained.outcome.metrics:
        privacy = {k: v for k, v in trained.outcome.metrics.items() if k in PRIVACY_METRIC_KEYS}
        if privacy:
            content["metrics"] = MetricRecord(privacy)
    return Message(content=RecordDict(content), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this node's partition (``secure=ckks``: its held-out part).

    A private client refuses: its exact loss, accuracy and size on local data
    are not covered by any epsilon.
    """
    torch.set_num_threads(1)
    try:
        prepared = _prepare(msg, context, held_out=True)
    except DataError as exc:
        return _error_reply(msg, code=DATA_ERROR, reason=f"client data could not be loaded: {exc.reason}")
    except KeyProblem as exc:
        return _error_reply(msg, code=KEY_ERROR, reason=exc.reason)
    experiment, model, x, y = prepared.experiment, prepared.model, prepared.x, prepared.y
    if experiment.client.privacy_level is not None:
        return _error_reply(
            msg,
            code=EVALUATE_REFUSED,
            reason="a private client (record-level or local DP) does not release exact evaluation metrics",
        )
    try:
        device = client_device(experiment.client.device)
    except ValueError as exc:
        return _error_reply(msg, code=DEVICE_ERROR, reason=str(exc))
    scores = dataset_metrics(model.to(device), x.to(device), y.to(device), dataset=experiment.dataset)
    # eval_loss, eval_accuracy and, for a binary task, eval_auc (when both classes
    # are present here), eval_balanced_accuracy and eval_cost.
    metrics = {
        WEIGHT_KEY: len(y),
        **{f"eval_{key.removeprefix('test_')}": value for key, value in scores.items() if value is not None},
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
