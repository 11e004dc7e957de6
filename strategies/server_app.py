"""The fedpriv ServerApp: builds the experiment from the run config and runs it.

Flower's ``Strategy.start`` owns the round loop. This module supplies its
``evaluate_fn``: the server evaluates the global model on its held-out test
split after every round, and the :class:`~fedpriv.results.RunRecorder` writes
the round's row and a checkpoint. A :class:`~strategies.weighted_fedavg.StopRun`
raised by the strategy ends the run cleanly with the model saved.

With ``resume`` set, the run goes on from the checkpoint in that folder: the
model, the rounds so far, the strategy's privacy state and the privacy-ledger
id under which the clients find their own accountant histories.
"""

from __future__ import annotations

import copy
import math
import uuid
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedpriv.checkpoint import Checkpoint, check_resumable, load_checkpoint
from fedpriv.devices import server_device
from fedpriv.experiment import Experiment, enable_secure_aggregation, experiment_from_run_config
from fedpriv.logs import get_logger
from fedpriv.protocol import LEDGER_KEY, RESUMED_KEY
from fedpriv.results import ENCRYPTED_MODEL_FILE, MODEL_FILE, RunRecorder, merge_results_section
from fedpriv.run_config import build_component
from fedpriv.metrics import dataset_metrics
from strategies.polling import PollingGrid, poll_interval
from strategies.weighted_fedavg import StopRun, WeightedFedAvg

logger = get_logger(__name__)

app = ServerApp()
PRIVACY_LOG_FIELDS = (
    "epsilon_user", "epsilon_record_max", "epsilon_local_max", "epsilon_local_basic_max", "noise_std", "clipping_norm"
)
SEED_KEYS = ("sampling_seed", "noise_seed")


class RunDiverged(RuntimeError):
    """Raised after the results are written when the run stopped because its model diverged.

    The run then fails in every runtime (``scripts/run.py`` exits non-zero),
    with the last finite model and every round on disk.
    """


def round_line(row: dict[str, Any], *, rounds: list[dict[str, Any]], total_rounds: int) -> str:
    """The per-round log line, built from the published row only.

    Under client-level DP the row holds no counts and no timings (they are
    withheld), so neither does the line.
    """
    accuracy = "none (no client evaluated)" if row["test_accuracy"] is None else f"{row['test_accuracy']:.4f}"
    parts = [f"round {row['round']}/{total_rounds}: test accuracy {accuracy}"]
    if row.get("test_auc") is not None:
        parts.append(f"AUC {row['test_auc']:.4f}")
    if row.get("num_clients") is not None:
        parts.append(f"{row['num_clients']} clients, {row.get('num_rejected') or 0} rejected")
    if row.get("seconds") is not None:
        parts.append(f"{row['seconds']:.1f}s")
    if row.get("bytes_up") is not None:
        parts.append(f"{row['bytes_down'] / 1e6:.2f} MB down, {row['bytes_up'] / 1e6:.2f} MB up")
    parts += [f"{key} {row[key]:.3g}" for key in PRIVACY_LOG_FIELDS if row.get(key) is not None]
    line = ", ".join(parts)
    if all(r.get("seconds") is not None for r in rounds):
        line += f" | {progress(rounds, total_rounds=total_rounds)}"
    return line


def _strategy_seed_kwargs(experiment: Experiment) -> dict[str, int]:
    """With ``seeded_noise``, the server's DP sampling and noise seeds derive from ``seed``."""
    if not experiment.settings.seeded_noise:
        return {}
    seed = experiment.settings.seed
    return {
        key: seed + offset
        for offset, key in enumerate(SEED_KEYS, start=1)
        if key in experiment.strategy_config and experiment.strategy_config[key] is None
    }


def privacy_section(experiment: Experiment, strategy: WeightedFedAvg) -> dict[str, Any]:
    """The ``privacy`` section of ``results.json``: which protections were on.

    ``secure_aggregation`` names the ``secure`` option (``none`` or
    ``secagg``), and ``distributed_noise`` is ``skellam`` when client-level DP
    noise was added by the clients under secure aggregation.
    ``guarantee_void`` is true when any DP noise or sampling was seeded
    (``seeded_noise``, ``strategy.noise_seed`` or ``strategy.sampling_seed``):
    the seed is in the published config, so the noise can be replayed.
    """
    seeded = experiment.settings.seeded_noise or any(
        experiment.strategy_config.get(key) is not None for key in SEED_KEYS
    )
    return {
        "client_level": strategy.client_level_private,
        "record_level": experiment.client.privacy_level == "record",
        "local": experiment.client.privacy_level == "local",
        "secure_aggregation": experiment.secure.name,
        "distributed_noise": "skellam" if experiment.secure.enabled and strategy.client_level_private else None,
        "seeded_noise": seeded,
        "guarantee_void": seeded,
    }


def federated_test_scores(scores: dict[str, float]) -> dict[str, float | None]:
    """Clients' evaluation metrics (``eval_*``) under the names of the server's test metrics."""
    named = {f"test_{key.removeprefix('eval_')}": value for key, value in scores.items() if key.startswith("eval_")}
    return {"test_loss": None, "test_accuracy": None, **named}


def _public_context(experiment: Experiment):
    """``secure=ckks``: the server's public TenSEAL context from ``secure.key_dir``; else ``None``."""
    if experiment.secure.name != "ckks":
        return None
    from fedpriv.he.keys import load_public_context

    return load_public_context(experiment.secure.key_dir)


def progress(rounds: list[dict[str, Any]], *, total_rounds: int) -> str:
    """Elapsed time and an estimate of the time left, from the rounds so far.

    The first round carries the warm-up (actors importing torch), so the
    estimate uses the later rounds once there are any.
    """
    elapsed = sum(row["seconds"] for row in rounds)
    steady = [row["seconds"] for row in rounds[1:]] or [row["seconds"] for row in rounds]
    left = (total_rounds - len(rounds)) * sum(steady) / len(steady)
    return f"elapsed {elapsed:.1f}s, about {left:.1f}s left"


def run_experiment(grid: Grid, experiment: Experiment, *, default_output_dir: Path) -> dict[str, Any]:
    """Run every round of ``experiment`` on ``grid`` and write its results.

    Returns
    -------
    dict[str, Any]
        The ``results.json`` document.
    """
    settings = experiment.settings
    output_dir = Path(settings.output_dir) if settings.output_dir else default_output_dir
    strategy: WeightedFedAvg = build_component(
        experiment.strategy_config,
        key="strategy",
        **experiment.audit.strategy_kwargs(),
        **_strategy_seed_kwargs(experiment),
    )
    torch.manual_seed(settings.seed)
    model = experiment.build_model()
    if experiment.secure.enabled:
        enable_secure_aggregation(
            strategy,
            experiment.secure,
            model=model,
            public_context=_public_context(experiment),
            experiment_client_evaluates=experiment.client.privacy_level is None,
        )
    if experiment.compression.enabled:
        strategy.enable_compression(experiment.compression)
    privacy = privacy_section(experiment, strategy)
    if privacy["guarantee_void"]:
        logger.warning("DP noise or sampling is seeded from the config: this run's privacy guarantee is VOID")
    # The model before round 1 (seeded, so a resumed run rebuilds the same): the audit's theta_0.
    initial_state = {name: value.clone() for name, value in model.state_dict().items()}
    splits = experiment.dataset.load()
    resumed: Checkpoint | None = load_checkpoint(settings.resume) if settings.resume else None
    if resumed is not None:
        check_resumable(resumed, config=experiment.config, run_dir=settings.resume)
        model.load_state_dict(resumed.state_dict)
        # The strategy owns the run's round numbers from here on (run_round).
        strategy.restore(resumed.strategy_state, completed_rounds=resumed.round)
        logger.info("resuming %s after round %d of %d", settings.resume, resumed.round, settings.num_rounds)
    ledger_id = resumed.ledger_id if resumed is not None else uuid.uuid4().hex
    recorder = RunRecorder(
        output_dir,
        model_file=ENCRYPTED_MODEL_FILE if strategy.encrypted_model else MODEL_FILE,
        config=experiment.config,
        ledger_id=ledger_id,
        resumed=resumed,
        client_level_private=strategy.client_level_private,
        privacy=privacy,
    )
    latest = {"state_dict": model.state_dict(), "scores": {"test_loss": None, "test_accuracy": None}}
    logger.info("fedpriv run: results go to %s", output_dir.resolve())
    # The test split waits on the evaluation device for an evaluation copy of
    # the model; ``model`` itself stays on the CPU for the audit.
    device = server_device(settings.server_device)
    evaluator = copy.deepcopy(model).to(device)
    test_x, test_y = splits.test_x.to(device), splits.test_y.to(device)

    def evaluated(server_round: int, arrays: ArrayRecord) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The round's model (as the run keeps it) and its test metrics."""
        if strategy.encrypted_model:
            # secure=ckks: the server cannot read the model; the clients' federated
            # evaluation of it stands in for the test metrics.
            state_dict = {name: torch.from_numpy(array.numpy().copy()) for name, array in arrays.items()}
            return state_dict, federated_test_scores(strategy.federated_scores.get(server_round, {}))
        state_dict = arrays.to_torch_state_dict()
        evaluator.load_state_dict(state_dict)
        scores = dataset_metrics(evaluator, test_x, test_y, dataset=experiment.dataset)
        if server_round and not math.isfinite(scores["test_loss"]):
            strategy.reject_model(server_round, reason=f"the server's test loss is {scores['test_loss']}")
            # The previous model stays the global one, with its own test metrics.
            state_dict, scores = latest["state_dict"], latest["scores"]
        return state_dict, scores

    def end_of_round(flower_round: int, arrays: ArrayRecord) -> MetricRecord:
        # Flower's evaluate_fn is its only per-round callback: the server's
        # evaluation, the round's row and the checkpoint all happen here.
        server_round = strategy.run_round(flower_round) if flower_round else 0
        state_dict, scores = evaluated(server_round, arrays)
        latest.update(state_dict=state_dict, scores=scores)
        if server_round == 0:
            recorder.start_clock()
        else:
            metrics = {**strategy.train_metrics.get(server_round, {}), **scores}
            row = recorder.record_round(
                server_round=server_round,
                metrics=metrics,
                state_dict=state_dict,
                strategy_state=strategy.resume_state(),
            )
            logger.info("%s", round_line(row, rounds=recorder.rounds, total_rounds=settings.num_rounds))
        shown = {key: scores[key] for key in ("test_loss", "test_accuracy") if scores[key] is not None}
        return MetricRecord(shown)

    stop = None
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=settings.num_rounds - strategy.completed_rounds,
            timeout=settings.round_timeout,
            train_config=ConfigRecord({LEDGER_KEY: ledger_id, RESUMED_KEY: strategy.completed_rounds}),
            evaluate_fn=end_of_round,
        )
        stop = strategy.stop
    except StopRun as raised:
        stop = raised
    if stop is not None:
        logger.warning("run stopped early: %s", stop)
    final = {**latest["scores"], **strategy.privacy_summary(), **strategy.traffic.summary()}
    document = recorder.finish(
        stopped_reason=stop.reason if stop else "completed",
        detail=stop.detail if stop else "",
        final=final,
        state_dict=latest["state_dict"],
    )
    if stop is not None and stop.reason == "diverged":
        raise RunDiverged(f"the model diverged: {stop.detail} (results in {output_dir})")
    audit = experiment.audit.report(
        initial_state=initial_state,
        final_state=latest["state_dict"],
        model=model,
        input_shape=experiment.dataset.input_shape,
        num_classes=experiment.dataset.num_classes,
        privacy=final,
    )
    if audit is None:
        return document
    return merge_results_section(recorder.results_path, section="audit", values=audit)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of the ServerApp (simulation and deployment alike)."""
    experiment = experiment_from_run_config(context.run_config)
    # Replies are pulled every 0.1 s instead of Flower's deployment grid's 3 s (every 0.01 s in a simulation).
    polling = PollingGrid(grid, interval=poll_interval(grid))
    run_experiment(polling, experiment, default_output_dir=Path("fedpriv-runs") / str(context.run_id))
