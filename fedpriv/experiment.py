"""One experiment, rebuilt the same way by ``scripts/run.py``, the ServerApp and the ClientApp.

The nested config (Hydra's, or :func:`fedpriv.run_config.unflatten` of a Flower
``run_config``) names one ``_target_`` per group. :func:`load_experiment` builds
the cheap, side-effect-free parts (run settings, dataset, partitioner, model
factory, client training) and validates them; the strategy is built only by the
ServerApp, from ``Experiment.strategy_config``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpriv.checks import check_bool, check_choice, check_int, check_real, check_text
from fedpriv.devices import DEVICES, client_device, server_device
from fedpriv.partition_cache import cached_partitioning, partition_key
from fedpriv.run_config import ConfigError, Scalar, build_component, flatten, unflatten

GROUPS = ("strategy", "client", "model", "dataset", "partition")
MAX_CLIENTS = 10**7
MAX_ROUNDS = 10**6
# Optional groups: a config without them (an older results.json) gets these.
OPTIONAL_GROUPS = {
    "audit": {"_target_": "fedpriv.audit.NoAudit"},
    "secure": {"_target_": "fedpriv.secagg.NoSecureAggregation"},
    "compression": {"_target_": "fedpriv.compression.NoCompression"},
}


@dataclass(frozen=True)
class RunSettings:
    """Top-level settings of a run.

    Parameters
    ----------
    num_clients : int
        Number of clients (SuperNodes); each holds one partition.
    num_rounds : int
        Number of federated rounds.
    seed : int
        Seed for splits, partitions, sampling and training.
    output_dir : str
        Folder for results; empty means ``fedpriv-runs/<run id>`` under the
        working directory of the ServerApp.
    round_timeout : float
        Seconds the server waits for replies in a round.
    resume : str
        Folder of an earlier run to go on from (its ``checkpoint.pt``); empty
        for a fresh run. ``scripts/run.py`` checks that the config matches.
    seeded_noise : bool
        Derive every DP noise and sampling draw (clients' DP-SGD, the server's
        DP-FedAvg unless its own seeds are set) from ``seed``. For tests that
        need identical private runs only: it voids every privacy guarantee,
        since ``seed`` is published with the config, and ``results.json`` says so.
    verbose : bool
        Show Flower's own log lines on the console too (``fedpriv.log`` in the
        run folder always has them).
    server_device : str
        Where the server evaluates the global model on its test split:
        ``cpu`` (default), ``cuda``, or ``auto`` (a GPU if the server's process
        sees one, else the CPU); see :mod:`fedpriv.devices`.
    """

    num_clients: int
    num_rounds: int
    seed: int = 0
    output_dir: str = ""
    round_timeout: float = 600.0
    resume: str = ""
    seeded_noise: bool = False
    verbose: bool = False
    server_device: str = "cpu"

    def __post_init__(self) -> None:
        """Validate the settings."""
        try:
            check_int("num_clients", self.num_clients, minimum=1, maximum=MAX_CLIENTS)
            check_int("num_rounds", self.num_rounds, minimum=1, maximum=MAX_ROUNDS)
            check_int("seed", self.seed, minimum=0, maximum=2**63 - 1)
            check_bool("seeded_noise", self.seeded_noise)
            check_bool("verbose", self.verbose)
            check_real("round_timeout", self.round_timeout, minimum=1.0, maximum=1e7)
            check_text("output_dir", self.output_dir)
            check_text("resume", self.resume)
            check_choice("server_device", self.server_device, DEVICES)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if self.resume and self.output_dir != self.resume:
            # Clients without a ledger-dir of their own keep their privacy
            # ledgers under output_dir: a resumed run must look in the same place.
            raise ConfigError(f"output_dir={self.output_dir!r}: a resumed run writes into resume={self.resume!r}")


@dataclass(frozen=True)
class Experiment:
    """Everything a run is built from, validated.

    Attributes
    ----------
    settings : RunSettings
        Top-level settings.
    dataset : Any
        A dataset definition from :mod:`fedpriv.datasets`.
    partition : Any
        A partitioner from :mod:`fedpriv.partition`.
    model_factory : Callable[..., nn.Module]
        Builds a fresh model given ``input_shape`` and ``num_classes``.
    client : Any
        The client's training procedure (from :mod:`clients`).
    strategy_config : Mapping[str, Any]
        The strategy's ``_target_`` node, built by the ServerApp.
    audit : Any
        The privacy audit (:mod:`fedpriv.audit`): ``NoAudit`` or ``CanaryAudit``.
    secure : Any
        Secure aggregation (:mod:`fedpriv.secagg`, :mod:`fedpriv.he`): ``NoSecureAggregation``,
        ``SecAggPlus`` or ``CKKS``.
    compression : Any
        What clients send (:mod:`fedpriv.compression`): ``NoCompression``, ``Quantize`` or ``TopK``.
    config : Mapping[str, Any]
        The whole nested config, as recorded in ``results.json``.
    """

    settings: RunSettings
    dataset: Any
    partition: Any
    model_factory: Callable[..., nn.Module]
    client: Any
    strategy_config: Mapping[str, Any]
    audit: Any
    secure: Any
    compression: Any
    config: Mapping[str, Any]

    def build_model(self) -> nn.Module:
        """Build a freshly initialised model for this experiment's dataset."""
        try:
            return self.model_factory(
                input_shape=self.dataset.input_shape, num_classes=self.dataset.num_classes
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        except TypeError as exc:
            raise ConfigError(f"model: {exc}") from exc


def load_experiment(config: Mapping[str, Any]) -> Experiment:
    """Build and validate an experiment from its nested config.

    Raises
    ------
    ConfigError
        Naming the first invalid key and its value.
    """
    missing = [group for group in GROUPS if group not in config]
    if missing:
        raise ConfigError(f"{missing[0]}: config group missing")
    top = {k: v for k, v in config.items() if k not in GROUPS and k not in OPTIONAL_GROUPS and k != "mode"}
    try:
        settings = RunSettings(**top)
    except TypeError as exc:
        raise ConfigError(f"top-level config: {exc}") from exc
    experiment = Experiment(
        settings=settings,
        dataset=build_component(config["dataset"], key="dataset"),
        partition=build_component(config["partition"], key="partition"),
        model_factory=build_component(config["model"], key="model"),
        client=build_component(config["client"], key="client"),
        strategy_config=config["strategy"],
        audit=build_component(config.get("audit", OPTIONAL_GROUPS["audit"]), key="audit"),
        secure=build_component(config.get("secure", OPTIONAL_GROUPS["secure"]), key="secure"),
        compression=build_component(config.get("compression", OPTIONAL_GROUPS["compression"]), key="compression"),
        config=config,
    )
    try:
        experiment.audit.check_strategy(config["strategy"].get("_target_", ""))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    fraction_evaluate = config["strategy"].get("fraction_evaluate", 0.0)
    if getattr(experiment.client, "privacy_level", None) is not None and fraction_evaluate:
        raise ConfigError(
            f"strategy.fraction_evaluate={fraction_evaluate}: federated evaluation would release "
            "exact client metrics that a private client's epsilon does not cover; the server evaluates on its own split"
        )
    _check_secure(experiment)
    weighted = config["strategy"].get("weighted")
    if getattr(experiment.client, "privacy_level", None) == "local" and weighted:
        # Every local-DP reply has weight 1: bounded weights min(1 / weight_cap, 1)
        # would shrink every update by weight_cap.
        raise ConfigError(
            f"strategy.weighted={weighted}: local-DP clients reply with weight 1 (a size would be an "
            "unaccounted release); set strategy.weighted=false"
        )
    return experiment


def _check_secure(experiment: Experiment) -> None:
    """Refuse what secure aggregation cannot do, in one line.

    Raises
    ------
    ConfigError
        Fewer than 2 clients, or (without DP) more clients than the modulus
        leaves room for; strategy and audit clashes are the strategy's to refuse.
    """
    secure = experiment.secure
    if not secure.enabled:
        return
    if experiment.compression.enabled:
        raise ConfigError(
            f"compression={experiment.compression.name}: secure={secure.name} encodes updates itself "
            "(SecAgg+ quantizes them, CKKS encrypts them); use compression=none with it"
        )
    if secure.name == "ckks":
        if experiment.settings.resume:
            raise ConfigError(f"resume={experiment.settings.resume!r}: a secure=ckks run cannot be resumed")
        if type(experiment.audit).__name__ != "NoAudit":
            raise ConfigError("audit: the server of a secure=ckks run cannot read the model it would audit")
        return
    num_clients = experiment.settings.num_clients
    if num_clients < 2:
        raise ConfigError(f"num_clients={num_clients}: secure={secure.name} needs at least 2 clients")
    is_dp = "DPFedAvg" in str(experiment.strategy_config.get("_target_", ""))
    if not is_dp and num_clients > secure.max_weighted_clients:
        raise ConfigError(
            f"secure.quantization_range={secure.quantization_range}: {num_clients} clients' quantized values "
            f"would wrap around secure.modulus_range={secure.modulus_range} (at most {secure.max_weighted_clients})"
        )


def prepare_run(nested: dict[str, Any], *, default_output_dir: str) -> tuple[Experiment, Any, dict[str, Scalar]]:
    """Validate a resolved config and build what a run needs, before anything starts.

    Parameters
    ----------
    nested : dict
        The resolved nested config (Hydra's, as plain containers); not modified.
    default_output_dir : str
        The output folder when the config names none (Hydra's job folder).

    Returns
    -------
    tuple
        ``(experiment, mode, run_config)``: the validated experiment, the
        ``mode`` object that runs it, and the flat Flower run config.

    Raises
    ------
    ConfigError
        Naming the first invalid key and value: any constructor's refusal, a
        checkpoint that does not match, a dataset that cannot be loaded or
        partitioned, or a run that could not start (:func:`check_runnable`).
    """
    from fedpriv.checkpoint import check_resumable, load_checkpoint

    nested = dict(nested)
    if nested.get("resume"):
        nested["resume"] = nested["output_dir"] = _resume_folder(nested)
    if not nested.get("output_dir"):
        nested["output_dir"] = default_output_dir
    secure = nested.get("secure") or {}
    if str(secure.get("_target_", "")).endswith("CKKS") and not secure.get("key_dir"):
        # The run's own keys, in its folder: the clients read the secret one, the server the public one.
        nested["secure"] = {**secure, "key_dir": str(Path(nested["output_dir"]) / "he-keys")}
    experiment = load_experiment(nested)
    if experiment.settings.resume:
        check_resumable(load_checkpoint(experiment.settings.resume), config=nested, run_dir=experiment.settings.resume)
    mode = build_run_components(experiment, mode_config=nested["mode"])
    try:
        # Loads the data and partitions it once (cached for the in-process server),
        # so a missing dataset or an impossible partition fails here, in one line.
        client_examples(experiment, partition_id=0, num_partitions=experiment.settings.num_clients)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    check_runnable(experiment, mode=mode)
    if experiment.secure.name == "ckks":
        _ensure_keys(experiment.secure)
    return experiment, mode, flatten(nested)


def _ensure_keys(secure: Any) -> None:
    """Make the CKKS keys in ``secure.key_dir`` unless a public context is already there."""
    from fedpriv.he.keys import PUBLIC_FILE, make_keys

    folder = Path(secure.key_dir).expanduser()
    if not (folder / PUBLIC_FILE).is_file():
        make_keys(folder, secure)


def build_run_components(experiment: Experiment, *, mode_config: Mapping[str, Any]) -> Any:
    """Build once what the ServerApp and the runtime will build, so a bad value fails now.

    Builds the strategy and the model (and discards them) and the mode.

    Returns
    -------
    Any
        The ``mode`` object that runs the experiment.

    Raises
    ------
    ConfigError
        Naming the first invalid key and value.
    """
    strategy = build_component(experiment.strategy_config, key="strategy", **experiment.audit.strategy_kwargs())
    model = experiment.build_model()
    try:
        if experiment.secure.enabled:
            enable_secure_aggregation(strategy, experiment.secure, model=model)
        if experiment.compression.enabled:
            strategy.enable_compression(experiment.compression)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return build_component(mode_config, key="mode")


def enable_secure_aggregation(
    strategy: Any, secure: Any, *, model: nn.Module, public_context: Any = None, experiment_client_evaluates: bool = True
) -> None:
    """Turn on ``secure`` in ``strategy`` for ``model``'s size (``ValueError`` if they do not fit).

    ``secure=ckks`` takes the server's ``public_context`` (without one only the
    settings are checked) and turns on federated evaluation when the clients
    may evaluate (``experiment_client_evaluates``: private clients refuse).
    """
    dimension = sum(value.numel() for value in model.state_dict().values())
    if secure.name == "ckks":
        strategy.enable_homomorphic_encryption(
            secure, dimension=dimension, public_context=public_context, evaluate=experiment_client_evaluates
        )
    else:
        strategy.enable_secure_aggregation(secure, dimension=dimension)


def _resume_folder(nested: Mapping[str, Any]) -> str:
    """The absolute folder to resume, which is also the run's output folder.

    Raises
    ------
    ConfigError
        If ``output_dir`` names another folder.
    """
    folder = Path(str(nested["resume"])).expanduser().resolve()
    if nested.get("output_dir") and Path(str(nested["output_dir"])).expanduser().resolve() != folder:
        raise ConfigError(
            f"output_dir={nested['output_dir']}: a resumed run writes into its own folder, resume={folder}"
        )
    return str(folder)


def check_runnable(experiment: Experiment, *, mode: Any) -> None:
    """Refuse, before anything starts, what can only fail later.

    Checks that the output folder can be created and written (nothing is
    created here) and, in a simulation, that the strategy does not wait for
    more nodes than there are clients and that a device set to ``cuda`` is
    there: the server's (it evaluates in this process) and, when the clients
    run on this machine, the clients'; and that the process backend's
    workers fit this machine's cores and GPUs.

    Raises
    ------
    ConfigError
        Naming the key and the value.
    """
    if experiment.settings.output_dir:
        problem = unwritable_reason(Path(experiment.settings.output_dir).expanduser())
        if problem:
            raise ConfigError(f"output_dir={experiment.settings.output_dir!r}: {problem}")
    if not getattr(mode, "simulated", False):
        return
    waits_for = experiment.strategy_config.get("min_available_nodes", 0)
    if waits_for > experiment.settings.num_clients:
        raise ConfigError(
            f"strategy.min_available_nodes={waits_for}: a simulation has only num_clients="
            f"{experiment.settings.num_clients} nodes, so the first round could never start"
        )
    try:
        server_device(experiment.settings.server_device)
        if not getattr(mode, "ray_address", ""):
            client_device(experiment.client.device)
        if getattr(mode, "backend", "") == "process":
            mode.worker_count()
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def unwritable_reason(folder: Path) -> str:
    """Why ``folder`` could not be created or written into; empty if it can.

    Looks at the folder, or at its nearest existing parent, without creating
    anything.
    """
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            return "no existing parent folder"
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return ""


@functools.lru_cache(maxsize=4)
def _cached_experiment(items: tuple[tuple[str, Scalar], ...]) -> Experiment:
    return load_experiment(unflatten(dict(items)))


def experiment_from_run_config(run_config: Mapping[str, Scalar]) -> Experiment:
    """Rebuild the experiment from a Flower ``run_config``, cached per process.

    Simulated clients in one Ray actor share the cache, so datasets and
    partitions are built once per actor rather than once per message.
    """
    return _cached_experiment(tuple(sorted(run_config.items())))


@functools.lru_cache(maxsize=8)
def _partitioning(dataset: Any, partition: Any, num_partitions: int, seed: int):
    # In memory per process, and on disk for the next process (fedpriv.partition_cache).
    splits = dataset.load()
    labels = splits.train_y.numpy()
    silos = splits.train_silo.numpy() if splits.train_silo is not None else None

    def compute():
        if getattr(partition, "needs_silos", False):
            if silos is None:
                raise ValueError("partition=natural: this dataset has no natural silos")
            return partition.split(labels, num_partitions=num_partitions, seed=seed, silos=silos)
        return partition.split(labels, num_partitions=num_partitions, seed=seed)

    key = partition_key(
        dataset=dataset,
        partition=partition,
        num_partitions=num_partitions,
        seed=seed,
        labels=labels if silos is None else np.concatenate([labels, silos]),
    )
    return cached_partitioning(key, compute)


def client_examples(
    experiment: Experiment, *, partition_id: int, num_partitions: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the training examples held by client ``partition_id``.

    Raises
    ------
    ValueError
        If the partition id is out of range or the partitioning is impossible.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id={partition_id}: must be in [0, {num_partitions})")
    splits = experiment.dataset.load()
    partitioning = _partitioning(
        experiment.dataset, experiment.partition, num_partitions, experiment.settings.seed
    )
    index = torch.as_tensor(partitioning.indices[partition_id], dtype=torch.long)
    # Tabular data: the client imputes and scales with its own rows only.
    return experiment.dataset.local_features(splits.train_x[index]), splits.train_y[index]
