"""The fedpriv ClientApp (Flower message API).

Every message rebuilds nothing expensive: the experiment, the dataset and the
partition are cached per process (one Ray actor or one ``flwr-clientapp``
process), keyed by the run config.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.node_state import node_state_path, restore_node_state, save_node_state
from clients.privacy_state import STATE_KEY, PrivacyBudgetExhausted
from fedpriv.experiment import client_examples, experiment_from_run_config
from fedpriv.logs import get_logger
from fedpriv.protocol import DECLINE_REASON_KEY, DECLINED_KEY, LEDGER_KEY, RESUMED_KEY, ROUND_KEY, WEIGHT_KEY
from fedpriv.metrics import dataset_metrics

logger = get_logger(__name__)

# Error codes of replies that carry no result (the server counts them as rejected).
DATA_ERROR = 101
TRAIN_ERROR = 102
EVALUATE_REFUSED = 103

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


def _prepare(msg: Message, context: Context):
    """Rebuild the experiment, this node's data and the global model from ``msg``.

    Raises
    ------
    DataError
        With the config error's text, or, once the data is read, the loader's
        text for a non-private client only: a loader's message can quote the
        data (a CSV cell), which a private client must not send.
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
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return experiment, partition_id, model, x, y


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's partition for one round."""
    # One simulated client per core: intra-op threads would only contend.
    torch.set_num_threads(1)
    try:
        experiment, partition_id, model, x, y = _prepare(msg, context)
    except DataError as exc:
        return _error_reply(msg, code=DATA_ERROR, reason=f"client data could not be loaded: {exc.reason}")
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
    loss = {} if outcome.loss is None else {"train_loss": outcome.loss}
    metrics = {WEIGHT_KEY: outcome.num_examples, **loss, **outcome.metrics}
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this node's partition.

    A private client refuses: its exact loss, accuracy and size on local data
    are not covered by any epsilon.
    """
    torch.set_num_threads(1)
    try:
        experiment, _, model, x, y = _prepare(msg, context)
    except DataError as exc:
        return _error_reply(msg, code=DATA_ERROR, reason=f"client data could not be loaded: {exc.reason}")
    if experiment.client.privacy_level is not None:
        return _error_reply(
            msg,
            code=EVALUATE_REFUSED,
            reason="a private client (record-level or local DP) does not release exact evaluation metrics",
        )
    scores = dataset_metrics(model, x, y, dataset=experiment.dataset)
    # eval_loss, eval_accuracy and, for a binary task, eval_auc (when both classes
    # are present here), eval_balanced_accuracy and eval_cost.
    metrics = {
        WEIGHT_KEY: len(y),
        **{f"eval_{key.removeprefix('test_')}": value for key, value in scores.items() if value is not None},
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
