"""Benchmarks: fedpriv against the compute floor and against Flower's built-ins.

    python scripts/bench.py [--quick | --smoke] [--mnist-root DIR] [--out bench.json] [--device cpu|cuda]

Every figure is a ratio (or a pair) measured side by side in this one run, so
load from other processes on the machine affects both sides alike:

1. overhead: a fedpriv simulation (``scripts/run.py``) over the compute floor,
   the same local training steps and server evaluations in one plain process;
2. flower: the same private workload with Flower's built-in ``FedAvg`` and a
   client in the style of Flower's Opacus example (``scripts/bench_apps.py``),
   against fedpriv's strategy and ``client=opacus``: wall time and epsilon;
3. dp_step: a DP-SGD step over a plain step for every ``grad_sample_mode``
   at batch sizes 64 to 1024, and a whole private local round
   (``OpacusTraining.fit``) over a plain one, on ``--device`` (``cpu`` or
   ``cuda``); it needs only torch, Opacus and numpy (no Flower, no Ray), so
   ``--only dp_step --device cuda`` runs on a bare GPU machine;
4. accounting: fedpriv's epsilon over ``dp-accounting``'s PLD for the same
   mechanism, and over Flower's accountant (no amplification);
5. memory: peak memory of a whole run (every process: workers, or Ray's) at 10
   and 100 clients;
6. scale: seconds per round with 10 clients sampled out of 100 to 10,000;
7. utility (full mode, needs ``--mnist-root``): test accuracy without privacy,
   with record-level DP at several epsilons (and epsilon 3 with the tuned
   preset, ``tuning=mnist_opacus_eps3``) and with client-level DP;
8. local_dp (quick and full): test accuracy of logistic regression with local
   DP (``client=local_dp``) over ``client.epsilon_per_round``, next to central
   DP (``strategy=dp_fixed``) at the same total epsilon, on breast cancer, heart
   disease (IID over 10 clients) and digits; a plot goes next to ``--out``.
   ``--only local_dp`` runs it alone.
9. secagg, 10. he, 11. compression: secure aggregation, homomorphic
   encryption and compressed updates against the plain federation;
12. deployment: seconds per round of fedpriv on a local SuperLink with 2 and 4
   SuperNodes, against Flower's trivial app (``scripts/trivial_app.py``) on
   the same federation;
13. heterogeneity (full mode, ``--only heterogeneity``): FedAvg, FedProx,
   FedAvgM and FedAdam on label-skewed MNIST-8k (or digits) and the four
   heart-disease hospitals, with and without client-level DP, accuracy (AUC)
   per round in a plot next to ``--out``;
14. poisoning (full mode, ``--only poisoning``): final accuracy when 2 of 10
   IID clients scale their update by -10, per ``strategy.aggregator``.

The workload is MNIST-8k (the MNIST test file, 8,000 images for the clients,
2,000 held out; CNN) with ``--mnist-root``, else scikit-learn's digits (MLP).
``--quick`` takes a few minutes; ``--smoke`` is the smallest setting, for tests.
Prints a table and writes the figures as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
if str(REPO) not in sys.path:
    # Running from a checkout without `pip install -e .` still finds the packages.
    sys.path.insert(0, str(REPO))

from clients.opacus_training import BOOKKEEPING, GRAD_SAMPLE_MODES, OpacusTraining  # noqa: E402
from clients.plain import PlainTraining  # noqa: E402
from fedpriv.allocator import keep_freed_memory  # noqa: E402
from fedpriv.models import CNN28, MLP  # noqa: E402
from fedpriv.training import make_optimizer  # noqa: E402

STEP_MODES = (BOOKKEEPING, *GRAD_SAMPLE_MODES)
"""Section 3's DP-SGD implementations: fedpriv's book-keeping and Opacus' modes."""

FLOWER_APPS = ("+mode.server_app=bench_apps:server_app", "+mode.client_app=bench_apps:client_app")
SECTIONS = (
    "overhead", "dp_step", "accounting", "flower", "scale", "memory", "utility", "local_dp", "secagg", "he", "compression",
    "deployment", "heterogeneity", "poisoning",
)
SAMPLED_PER_ROUND = 10


@dataclass(frozen=True)
class Sizes:
    """How much of each section to run.

    Attributes
    ----------
    clients, rounds : int
        The federation of sections 1, 2 and 5.
    memory_clients : int
        Clients of one more run of the section-1 workload, for section 5 (0:
        none; section 5 then reports the runs of sections 1 and 6).
    scale_clients : tuple[int, ...]
        Federation sizes of section 6.
    scale_rounds : int
        Rounds of each scale run (the first one is the warm-up).
    step_timing : dict
        ``warmup``, ``steps`` and ``repeats`` of the step timings of section 3.
    step_batch_sizes : tuple[int, ...]
        Batch sizes of the step timings of section 3.
    fit_repeats : int
        Local rounds timed per training procedure in section 3.
    accounting_steps : int
        DP-SGD steps of the client-side accounting case of section 4.
    flower : bool
        Run section 2.
    utility : bool
        Run section 7.
    local_dp_repeats : int
        Runs per point of section 8 (0: skip it).
    secagg_clients : tuple[int, ...]
        Federation sizes of section 9 (empty: skip it).
    he : bool
        Run section 10 (needs TenSEAL).
    compression_rounds : int
        Rounds of each run of section 11 (0: skip it).
    deployment_supernodes : tuple[int, ...]
        Federation sizes of section 12 (empty: skip it).
    heterogeneity_rounds : int
        Rounds of each run of sections 13 and 14 (0: skip them).
    """

    clients: int
    rounds: int
    memory_clients: int
    scale_clients: tuple[int, ...]
    scale_rounds: int
    step_timing: dict
    step_batch_sizes: tuple[int, ...]
    fit_repeats: int
    accounting_steps: int
    flower: bool
    utility: bool
    local_dp_repeats: int
    secagg_clients: tuple[int, ...]
    he: bool
    compression_rounds: int
    deployment_supernodes: tuple[int, ...]
    heterogeneity_rounds: int


SIZES = {
    "smoke": Sizes(
        clients=2,
        rounds=1,
        memory_clients=0,
        scale_clients=(),
        scale_rounds=0,
        step_timing={"warmup": 1, "steps": 1, "repeats": 1},
        step_batch_sizes=(64,),
        fit_repeats=2,
        accounting_steps=10,
        flower=False,
        utility=False,
        local_dp_repeats=0,
        secagg_clients=(),
        he=False,
        compression_rounds=0,
        deployment_supernodes=(),
        heterogeneity_rounds=0,
    ),
    "quick": Sizes(
        clients=10,
        rounds=3,
        memory_clients=0,
        scale_clients=(100, 1_000),
        scale_rounds=3,
        step_timing={"warmup": 3, "steps": 5, "repeats": 5},
        step_batch_sizes=(64, 256, 1024),
        fit_repeats=4,
        accounting_steps=500,
        flower=True,
        utility=False,
        local_dp_repeats=1,
        secagg_clients=(10,),
        he=True,
        compression_rounds=5,
        deployment_supernodes=(4,),
        heterogeneity_rounds=0,
    ),
    "full": Sizes(
        clients=10,
        rounds=20,
        memory_clients=100,
        scale_clients=(100, 1_000, 10_000),
        scale_rounds=5,
        step_timing={"warmup": 10, "steps": 20, "repeats": 15},
        step_batch_sizes=(64, 256, 1024),
        fit_repeats=8,
        accounting_steps=500,
        flower=True,
        utility=True,
        local_dp_repeats=2,
        secagg_clients=(10, 50),
        he=True,
        compression_rounds=20,
        deployment_supernodes=(2, 4),
        heterogeneity_rounds=30,
    ),
}


# --- running things and measuring them -------------------------------------------------


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # the process ended while we looked
        # The command name may hold spaces: the fields after it start at ") ".
        ppid = int(stat.rsplit(") ", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """Return ``root`` and all its descendants (client worker processes, Ray's raylet, ...)."""
    children = _children_by_parent()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _memory_kib(pid: int) -> tuple[int, int]:
    """``(pss, rss)`` of one process in KiB; zeros once it has ended."""
    values = {"Pss:": 0, "Rss:": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(" ")
            if key in values:
                values[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return values["Pss:"], values["Rss:"]


class PeakMemory:
    """Peak memory of a process tree, sampled in a background thread.

    PSS (proportional set size) splits shared pages, such as torch's
    libraries mapped by every client worker, among the processes that share them,
    so the sum over the tree is the tree's real footprint; the summed RSS
    counts shared pages once per process and is reported as an upper bound.

    Parameters
    ----------
    pid : int
        Root of the tree.
    interval : float
        Seconds between samples.
    """

    def __init__(self, pid: int, *, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_pss_mib = 0.0
        self.peak_rss_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            pss, rss = map(sum, zip(*(_memory_kib(p) for p in process_tree(self.pid)), strict=True))
            self.peak_pss_mib = max(self.peak_pss_mib, pss / 1024)
            self.peak_rss_mib = max(self.peak_rss_mib, rss / 1024)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def _subprocess_env() -> dict[str, str]:
    # scripts/ for bench_apps (Flower's apps, the synthetic data set): the client
    # workers inherit the variable and import it there.
    path = [str(REPO), str(SCRIPTS), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "FLWR_TELEMETRY_ENABLED": "0"}


def run_measured(args: list[str], *, cwd: Path) -> dict[str, Any]:
    """Run a Python script to its end; return its wall time, peak memory and output.

    Raises
    ------
    RuntimeError
        If it exits with a non-zero code (the end of its output is in the message).
    """
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=_subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    with PeakMemory(process.pid) as memory:
        output, _ = process.communicate()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} exited with {process.returncode}:\n{output[-3000:]}")
    return {
        "wall_seconds": wall,
        "peak_pss_mib": memory.peak_pss_mib,
        "peak_rss_sum_mib": memory.peak_rss_mib,
        "output": output,
    }


def run_federation(overrides: list[str], *, out_dir: Path) -> dict[str, Any]:
    """Run ``scripts/run.py`` (a real simulation) and read its ``results.json``.

    Returns
    -------
    dict
        ``wall_seconds`` and memory of the whole process tree, the
        ``results`` document and ``round_seconds``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    measured = run_measured([str(SCRIPTS / "run.py"), f"output_dir={out_dir}", *overrides], cwd=out_dir)
    results = json.loads((out_dir / "results.json").read_text())
    measured.pop("output")
    return {**measured, "results": results, "round_seconds": [row["seconds"] for row in results["rounds"]]}


# --- section 1: overhead over the compute floor -----------------------------------------


def compute_floor(overrides: list[str], *, workers: int = 1) -> dict[str, Any]:
    """The federation's work without Flower: every client's local round, then FedAvg and evaluation.

    The same local training (``experiment.client.fit``) on the same partitions
    and the same server evaluation. ``workers`` processes train a round's
    clients in parallel, one thread each, as the simulation's worker processes do
    (one per ``mode.client_num_cpus`` of the machine's cores, each with
    one thread); with ``workers=1`` this process trains them itself.
    Full participation and the plain strategy only.

    Returns
    -------
    dict
        ``setup_seconds`` (config and the server's test split; whoever
        trains loads the clients' examples), ``round_seconds`` and the final
        ``test_accuracy``.
    """
    from fedpriv.compose import compose_config
    from fedpriv.experiment import load_experiment
    from fedpriv.training import evaluate
    from strategies.aggregation import weighted_average

    torch.set_num_threads(1)
    start = time.perf_counter()
    with _floor_pool(overrides, workers=workers) as pool:
        if pool is not None:
            # Starts every worker now, so that they start (and load the clients) while this
            # process sets up, as the simulation starts its worker pool before its engine;
            # from a thread, as the simulation does, since a fork server's first fork
            # waits for its imports. The pool starts a worker per job submitted while none
            # is idle, and a worker is busy loading the clients for seconds: one job each.
            threading.Thread(target=_start_floor_workers, args=(pool, workers), daemon=True).start()
        experiment = load_experiment(compose_config(overrides))
        settings = experiment.settings
        if experiment.strategy_config.get("fraction_train", 1.0) != 1.0:
            raise ValueError("the compute floor assumes every client trains in every round")
        splits = experiment.dataset.load()
        torch.manual_seed(settings.seed)
        model = experiment.build_model()
        # The simulation's server evaluates the initial model before round 1 too.
        evaluate(model, splits.test_x, splits.test_y)
        setup = time.perf_counter() - start
        round_seconds, accuracy = [], None
        for server_round in range(1, settings.num_rounds + 1):
            start = time.perf_counter()
            global_state = {name: value.numpy() for name, value in model.state_dict().items()}
            jobs = [(global_state, partition_id, server_round) for partition_id in range(settings.num_clients)]
            trained = list(pool.map(_floor_client_round, jobs)) if pool else [_floor_client_round(job) for job in jobs]
            averaged = weighted_average([arrays for arrays, _ in trained], [weight for _, weight in trained])
            model.load_state_dict({name: torch.from_numpy(value) for name, value in zip(global_state, averaged, strict=True)})
            _, accuracy = evaluate(model, splits.test_x, splits.test_y)
            round_seconds.append(time.perf_counter() - start)
    return {"setup_seconds": setup, "round_seconds": round_seconds, "test_accuracy": accuracy, "workers": workers}


_FLOOR: dict[str, Any] = {}
"""This process's experiment and client data, for :func:`_floor_client_round`."""


def _floor_clients(overrides: list[str]) -> tuple[Any, list]:
    """Build the experiment and every client's examples once per process (as a client worker caches them)."""
    from fedpriv.compose import compose_config
    from fedpriv.experiment import client_examples, load_experiment

    torch.set_num_threads(1)
    if _FLOOR.get("overrides") != overrides:
        experiment = load_experiment(compose_config(overrides))
        num_clients = experiment.settings.num_clients
        data = [client_examples(experiment, partition_id=i, num_partitions=num_clients) for i in range(num_clients)]
        _FLOOR.update(overrides=overrides, experiment=experiment, data=data)
    return _FLOOR["experiment"], _FLOOR["data"]


def _start_floor_workers(pool, workers: int) -> None:
    """Have ``pool`` start its ``workers`` processes now: one no-op job each."""
    for _ in range(workers):
        pool.submit(int)


def _floor_pool(overrides: list[str], *, workers: int):
    """``workers`` fresh processes that have loaded the clients, or, for one, a null context (this process loads them)."""
    import contextlib
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from fedpriv.worker_pool import FORK_SERVER_PRELOAD

    if workers == 1:
        _floor_clients(overrides)
        return contextlib.nullcontext()
    # As the simulation's worker pool: workers forked from a server that has imported
    # torch and Flower's ClientApp once.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(FORK_SERVER_PRELOAD))
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_floor_clients, initargs=(overrides,),
    )


def _floor_client_round(job: tuple[dict, int, int]) -> tuple[list[np.ndarray], int]:
    """Train client ``partition_id`` from ``global_state`` as the ClientApp does; its arrays and weight."""
    from flwr.app import RecordDict

    from clients.client_app import training_seed

    global_state, partition_id, server_round = job
    experiment = _FLOOR["experiment"]
    x, y = _FLOOR["data"][partition_id]
    local = experiment.build_model()
    local.load_state_dict({name: torch.from_numpy(value) for name, value in global_state.items()})
    outcome = experiment.client.fit(
        local,
        x,
        y,
        seed=training_seed(experiment=experiment, server_round=server_round, partition_id=partition_id),
        state=RecordDict(),
        planned_rounds=experiment.settings.num_rounds,
    )
    return [value.numpy() for value in local.state_dict().values()], outcome.num_examples


def simulation_workers(overrides: list[str]) -> int:
    """How many clients the simulation trains at once: one worker per ``mode.client_num_cpus`` cores."""
    from fedpriv.compose import compose_config
    from fedpriv.simulation import SimulationMode

    return SimulationMode(client_num_cpus=float(compose_config(overrides)["mode"]["client_num_cpus"])).worker_count()


def run_floor(overrides: list[str], *, workers: int, cwd: Path) -> dict[str, Any]:
    """:func:`compute_floor` in a fresh process, as the simulation runs; plus its wall time."""
    request = json.dumps({"overrides": overrides, "workers": workers})
    measured = run_measured([str(SCRIPTS / "bench.py"), "--floor", request], cwd=cwd)
    floor = json.loads(measured.pop("output").strip().splitlines()[-1])
    return {**measured, **floor}


def bench_overhead(workload: list[str], *, sizes: Sizes, work_dir: Path) -> dict[str, Any]:
    """Section 1: a fedpriv simulation over the compute floor of the same work."""
    overrides = [*workload, f"num_clients={sizes.clients}", f"num_rounds={sizes.rounds}", "client.local_epochs=1"]
    federation = run_federation(overrides, out_dir=work_dir / "overhead")
    floor = run_floor(overrides, workers=simulation_workers(overrides), cwd=work_dir)
    fed_rounds, floor_rounds = federation["round_seconds"], floor["round_seconds"]
    steady = slice(1, None) if len(fed_rounds) > 1 else slice(None)
    return {
        "overrides": overrides,
        "federation_wall_seconds": federation["wall_seconds"],
        "floor_wall_seconds": floor["wall_seconds"],
        "wall_ratio": federation["wall_seconds"] / floor["wall_seconds"],
        "federation_round_seconds": fed_rounds,
        "floor_round_seconds": floor_rounds,
        "rounds_ratio": sum(fed_rounds) / sum(floor_rounds),
        "steady_rounds_ratio": sum(fed_rounds[steady]) / sum(floor_rounds[steady]),
        "federation_startup_seconds": federation["wall_seconds"] - sum(fed_rounds),
        "floor_startup_seconds": floor["wall_seconds"] - sum(floor_rounds),
        "federation_test_accuracy": federation["results"]["final"]["test_accuracy"],
        "floor_test_accuracy": floor["test_accuracy"],
        "peak_pss_mib": federation["peak_pss_mib"],
        "peak_rss_sum_mib": federation["peak_rss_sum_mib"],
        "floor_peak_pss_mib": floor["peak_pss_mib"],
        "floor_workers": floor["workers"],
    }


# --- section 2: against Flower's built-in FedAvg and Opacus example client ---------------


def bench_flower(workload: list[str], *, sizes: Sizes, work_dir: Path) -> dict[str, Any]:
    """Section 2: the same private workload, Flower's pieces against fedpriv's."""
    overrides = [
        *workload,
        f"num_clients={sizes.clients}",
        f"num_rounds={sizes.rounds}",
        "client=opacus",
        "client.local_epochs=1",
    ]
    fedpriv = run_federation(overrides, out_dir=work_dir / "fedpriv_opacus")
    flower = run_federation([*overrides, *FLOWER_APPS], out_dir=work_dir / "flower_opacus")
    return {
        "overrides": overrides,
        "fedpriv_wall_seconds": fedpriv["wall_seconds"],
        "flower_wall_seconds": flower["wall_seconds"],
        "wall_ratio": fedpriv["wall_seconds"] / flower["wall_seconds"],
        "fedpriv_steady_round_seconds": _steady(fedpriv["round_seconds"]),
        "flower_steady_round_seconds": _steady(flower["round_seconds"]),
        "fedpriv_test_accuracy": fedpriv["results"]["final"]["test_accuracy"],
        "flower_test_accuracy": flower["results"]["final"]["test_accuracy"],
        # fedpriv composes every round a client trained in; Flower's example
        # restarts its accountant each round, so it reports one round's worth.
        "fedpriv_epsilon": fedpriv["results"]["final"]["epsilon_record_max"],
        "flower_epsilon": flower["results"]["final"]["epsilon_reported"],
        "fedpriv_epsilon_per_round": [row["epsilon_record_max"] for row in fedpriv["results"]["rounds"]],
        "flower_epsilon_per_round": [row["epsilon"] for row in flower["results"]["rounds"]],
    }


def model_dimension(name: str) -> int:
    """Values in the state dict of the bench model ``name`` (``mlp`` on digits, ``cnn28`` on MNIST)."""
    factory, _, _ = STEP_MODELS[name]
    return sum(value.numel() for value in factory().state_dict().values())


def _steady(round_seconds: list[float]) -> float:
    """Median seconds of the rounds after the first (the first one warms the actors up)."""
    return statistics.median(round_seconds[1:] or round_seconds)


# --- section 3: DP-SGD step and round cost ----------------------------------------------

STEP_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    # name: (build, input shape, examples of one client in the workload)
    "mlp": (lambda: MLP(input_shape=(1, 8, 8), num_classes=10), (1, 8, 8), 144),
    "cnn28": (lambda: CNN28(input_shape=(1, 28, 28), num_classes=10), (1, 28, 28), 800),
}


def _no_synchronization() -> None:
    """The CPU runs a step before it returns: nothing to wait for."""


def time_interleaved(
    steps_by_name: dict[str, Callable[[], None]],
    *,
    warmup: int,
    steps: int,
    repeats: int,
    synchronize: Callable[[], None] = _no_synchronization,
) -> dict:
    """Median over ``repeats`` of the mean seconds per call of each step function.

    The candidates take turns within every repeat, so load from other processes
    affects them alike; each turn starts with one untimed call, so that what is
    timed is a step after a step of the same kind, as in a training loop, not
    the first one after another candidate has filled the caches. Garbage
    collection is off while timing, as in ``timeit``.
    ``synchronize`` waits for the device (``torch.cuda.synchronize``: a GPU
    returns before its kernels have run) before a timing starts and ends.
    """
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps_by_name}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, step in steps_by_name.items():
                step()
                synchronize()
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                synchronize()
                samples[name].append((time.perf_counter() - start) / steps)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: statistics.median(values) for name, values in samples.items()}


def _plain_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One step of ``client=plain``: its optimizer (``fedpriv.training.SGD``, ``torch.optim.SGD``'s update)."""
    optimizer = make_optimizer("sgd", model.parameters(), lr=0.1)
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()

    return step


def _private_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, mode: str) -> Callable[[], None]:
    """One DP-SGD step of ``model`` on ``(x, y)``, all three on one device, noise drawn there too.

    Each mode with the optimizer ``client=opacus`` gives it: ``torch.optim.SGD``
    inside Opacus' ``DPOptimizer``, ``fedpriv.training.SGD`` for book-keeping.
    """
    if mode == BOOKKEEPING:
        return _bookkeeping_step(model, x, y)
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="prv")
    private = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=len(y)),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
        grad_sample_mode=mode,
        noise_generator=torch.Generator(device=x.device).manual_seed(0),
    )
    if mode == "ghost":
        module, optimizer, criterion, _ = private
    else:
        (module, optimizer, _), criterion = private, nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(module(x), y).backward()
        optimizer.step()

    return step


def _bookkeeping_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    from fedpriv.privacy.bookkeeping import BookKeepingDPSGD

    optimizer = make_optimizer("sgd", model.parameters(), lr=0.1)
    dp_sgd = BookKeepingDPSGD(
        model,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        expected_batch_size=len(y),
        generator=torch.Generator(device=x.device).manual_seed(0),
    )

    def step() -> None:
        dp_sgd.gradients(x, y)
        optimizer.step()

    return step


def _random_batch(shape: tuple[int, ...], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(size, *shape, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else _no_synchronization


def step_costs(*, batch_size: int, timing: dict, device: torch.device) -> list[dict]:
    """One optimizer step, private over plain, per model and ``grad_sample_mode``, on a fixed batch on ``device``."""
    rows = []
    for name, (build, shape, _) in STEP_MODELS.items():
        x, y = (tensor.to(device) for tensor in _random_batch(shape, batch_size))
        candidates, errors = {"plain": _plain_step(build().to(device), x, y)}, {}
        for mode in STEP_MODES:
            try:
                step = _private_step(build().to(device), x, y, mode=mode)
                step()
            except (RuntimeError, ValueError, NotImplementedError) as exc:
                errors[mode] = f"{type(exc).__name__}: {exc}"
            else:
                candidates[mode] = step
        seconds = time_interleaved(candidates, **timing, synchronize=_synchronizer(device))
        for mode in STEP_MODES:
            row = {"model": name, "mode": mode, "batch_size": batch_size, "plain_ms": seconds["plain"] * 1e3}
            if mode in errors:
                row.update(private_ms=None, ratio=None, error=errors[mode])
            else:
                row.update(private_ms=seconds[mode] * 1e3, ratio=seconds[mode] / seconds["plain"], error=None)
            rows.append(row)
    return rows


def round_costs(*, batch_size: int, repeats: int, device: torch.device) -> list[dict]:
    """A whole local round of ``client=opacus`` over one of ``client=plain``, per model, on ``device``.

    This is what a client pays: besides the steps, Opacus' ``make_private``,
    Poisson batches and the accounting of the round. One client's worth of
    examples, one local epoch, the same batch size; the private client keeps
    its state between rounds (a plain ``dict``, so that no Flower is needed),
    so its accountant history grows as in a run. Both trainings take the
    model from the CPU and give it back there, as in a ClientApp.
    """
    rows = []
    synchronize = _synchronizer(device)
    for name, (build, shape, examples) in STEP_MODELS.items():
        x, y = _random_batch(shape, examples)
        settings = {"local_epochs": 1, "batch_size": batch_size, "lr": 0.1, "momentum": 0.5, "device": device.type}
        trainings = {
            "plain": PlainTraining(**settings),
            "opacus": OpacusTraining(**settings, noise_multiplier=1.0),
        }
        states: dict[str, dict] = {kind: {} for kind in trainings}
        samples: dict[str, list[float]] = {kind: [] for kind in trainings}
        for repeat in range(repeats + 1):  # the first round of each warms up
            for kind, training in trainings.items():
                model = build()
                synchronize()
                start = time.perf_counter()
                training.fit(model, x, y, seed=repeat, state=states[kind], planned_rounds=repeats + 1)
                synchronize()
                if repeat:
                    samples[kind].append(time.perf_counter() - start)
        plain, private = (statistics.median(samples[kind]) for kind in ("plain", "opacus"))
        rows.append(
            {"model": name, "examples": examples, "batch_size": batch_size, "plain_ms": plain * 1e3,
             "private_ms": private * 1e3, "ratio": private / plain}
        )
    return rows


def device_name(device: torch.device) -> str:
    """``cpu``, or ``cuda`` with the GPU's name."""
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def bench_dp_step(*, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Section 3 on ``device``, on one CPU thread as each simulated client runs.

    The process keeps freed memory as a ClientApp process does
    (:func:`fedpriv.allocator.keep_freed_memory`), for every candidate alike.
    """
    keep_freed_memory()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            # Opacus warns on every engine without secure_mode and on every backward
            # through a first layer whose input needs no grad; neither matters here.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            steps = [
                row
                for batch_size in sizes.step_batch_sizes
                for row in step_costs(batch_size=batch_size, timing=sizes.step_timing, device=device)
            ]
            rounds = round_costs(batch_size=32, repeats=sizes.fit_repeats, device=device)
    finally:
        torch.set_num_threads(threads)
    return {"device": device_name(device), "steps": steps, "rounds": rounds}


# --- section 4: accounting tightness -----------------------------------------------------


def pld_epsilon(history: list[tuple[float, float, int]], *, delta: float) -> float:
    """Google ``dp-accounting``'s PLD epsilon of Poisson-subsampled Gaussian releases."""
    import dp_accounting

    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    for noise_multiplier, sample_rate, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(delta))


def flower_no_amplification_epsilon(*, noise_multiplier: float, sampled: int, population: int, rounds: int, delta: float) -> float:
    """Epsilon from Flower's ``RdpAccountant`` with the only sampling its DP strategies accept."""
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    config = PrivacyConfig(
        target_delta=delta,
        population_size=population,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )
    accountant = RdpAccountant(config)
    event = GaussianPrivacyEvent(noise_multiplier=noise_multiplier, sample_size=sampled, population_size=population)
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


def bench_accounting(*, sizes: Sizes) -> dict[str, Any]:
    """Section 4: fedpriv's epsilon over PLD's and over Flower's, and the time each takes."""
    from fedpriv.privacy.accounting import compute_epsilon

    delta = 1e-5
    # Client side: a client of the workload (800 examples, expected batch 32)
    # in DP-SGD; server side: DP-FedAvg, 100 clients, q = 0.1, z = 1, 100 rounds.
    cases = {
        "client_dp_sgd": [(1.0, 1 / 25, sizes.accounting_steps)],
        "server_dp_fedavg": [(1.0, 0.1, 100)],
    }
    rows = {}
    for name, history in cases.items():
        start = time.perf_counter()
        fedpriv = compute_epsilon(history, delta=delta)
        seconds = time.perf_counter() - start
        reference = pld_epsilon(history, delta=delta)
        rows[name] = {"history": history, "fedpriv_epsilon": fedpriv, "pld_epsilon": reference,
                      "ratio": fedpriv / reference, "fedpriv_seconds": seconds}
    flower = flower_no_amplification_epsilon(noise_multiplier=1.0, sampled=10, population=100, rounds=100, delta=delta)
    user = rows["server_dp_fedavg"]["fedpriv_epsilon"]
    rows["against_flower"] = {"fedpriv_epsilon_user": user, "flower_epsilon": flower, "ratio": user / flower}
    rows["local_dp_against_flower"] = local_dp_against_flower(epsilon_per_round=1.0, delta=delta)
    return rows


def local_dp_against_flower(*, epsilon_per_round: float, delta: float, rounds=(10, 50)) -> dict[str, Any]:
    """Local DP over ``rounds``: what Flower's ``LocalDpMod`` reports, what its releases spend, and fedpriv.

    ``LocalDpMod(clipping_norm=C, sensitivity=C, epsilon, delta)`` adds Gaussian
    noise of std ``C * sqrt(2 ln(1.25 / delta)) / epsilon`` every round and
    logs that round's ``(epsilon, delta)``; nothing composes them. Under local
    DP (any two updates, which clipping to ``C`` puts ``2 C`` apart) its
    releases are Gaussian with noise multiplier ``std / 2C``, composed here by
    dp-accounting's PLD accountant. fedpriv's ``client=local_dp`` at the same
    per-round epsilon: Laplace, basic composition and PLD (from its ledger).
    """
    import dp_accounting

    from fedpriv.privacy.laplace_accounting import laplace_basic_epsilon, laplace_epsilon

    clipping_norm = 1.0
    flower_std = clipping_norm * math.sqrt(2 * math.log(1.25 / delta)) / epsilon_per_round
    noise_multiplier = flower_std / (2 * clipping_norm)
    rows: dict[str, Any] = {"epsilon_per_round": epsilon_per_round, "delta": delta, "flower_noise_multiplier": noise_multiplier}
    for k in rounds:
        accountant = dp_accounting.pld.PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), k)
        history = [(1.0 / epsilon_per_round, 1.0, k)]
        rows[f"{k}_rounds"] = {
            "flower_reported_epsilon": epsilon_per_round,
            "flower_true_epsilon": accountant.get_epsilon(delta),
            "fedpriv_basic_epsilon": laplace_basic_epsilon(history),
            "fedpriv_pld_epsilon": laplace_epsilon(history, delta=delta),
        }
    return rows


# --- sections 5 and 6: memory and scale --------------------------------------------------


def bench_memory(workload: list[str], *, sizes: Sizes, sections: dict, work_dir: Path) -> dict[str, Any]:
    """Section 5: peak memory of whole runs, by number of clients and what they ran."""
    overhead = sections["overhead"]
    rows = {
        f"{sizes.clients} clients, section 1": {
            "peak_pss_mib": overhead["peak_pss_mib"],
            "peak_rss_sum_mib": overhead["peak_rss_sum_mib"],
        }
    }
    for clients, run in sections.get("scale", {}).items():
        rows[f"{clients} clients, {SAMPLED_PER_ROUND} sampled, section 6"] = {
            "peak_pss_mib": run["peak_pss_mib"],
            "peak_rss_sum_mib": run["peak_rss_sum_mib"],
        }
    if sizes.memory_clients:
        overrides = [*workload, f"num_clients={sizes.memory_clients}", f"num_rounds={sizes.rounds}", "client.local_epochs=1"]
        run = run_federation(overrides, out_dir=work_dir / f"memory_{sizes.memory_clients}")
        rows[f"{sizes.memory_clients} clients, section-1 workload"] = {
            "peak_pss_mib": run["peak_pss_mib"],
            "peak_rss_sum_mib": run["peak_rss_sum_mib"],
        }
    return rows


def scale_overrides(num_clients: int, *, rounds: int) -> list[str]:
    """A cheap federation of ``num_clients`` on synthetic 8x8 data, 10 sampled per round."""
    return [
        "dataset=synthetic",
        f"dataset.num_examples={int(math.ceil(num_clients * 2 / 0.8))}",  # 2 per client
        f"num_clients={num_clients}",
        f"num_rounds={rounds}",
        f"strategy.fraction_train={SAMPLED_PER_ROUND / num_clients}",
        f"strategy.min_train_nodes={SAMPLED_PER_ROUND}",
        "client.local_epochs=1",
    ]


def bench_scale(*, sizes: Sizes, work_dir: Path) -> dict[str, Any]:
    """Section 6: seconds per round against the number of simulated clients."""
    rows = {}
    for num_clients in sizes.scale_clients:
        run = run_federation(scale_overrides(num_clients, rounds=sizes.scale_rounds), out_dir=work_dir / f"scale_{num_clients}")
        rows[str(num_clients)] = {
            "steady_round_seconds": _steady(run["round_seconds"]),
            "first_round_seconds": run["round_seconds"][0],
            "wall_seconds": run["wall_seconds"],
            "peak_pss_mib": run["peak_pss_mib"],
            "peak_rss_sum_mib": run["peak_rss_sum_mib"],
        }
    return rows


# --- section 7: utility -------------------------------------------------------------------

UTILITY_ROUNDS = 15
UTILITY_RUNS = {
    "non_private": ["client.lr=0.1", "client.local_epochs=2"],
    **{
        f"record_level_eps{eps}": ["client=opacus", "client.batch_size=128", "client.lr=1.0",
                                   "client.noise_multiplier=null", f"client.target_epsilon={eps}"]
        for eps in (1, 3, 8)
    },
    # The epsilon-3 preset found by the README's sweep (conf/tuning/mnist_opacus_eps3.yaml);
    # record_level_eps3 above is the "before".
    "record_level_eps3_tuned": ["client=opacus", "tuning=mnist_opacus_eps3"],
    # ScatterNet (fixed scattering features, GroupNorm, linear), without DP and with the
    # epsilon-3 preset (conf/tuning/mnist_opacus_eps3_scatter.yaml). The preset picks the
    # model itself, but the workload's model=cnn28 would win over it, hence model= here.
    "non_private_scatternet": ["model=scatternet", "client.lr=0.003", "client.momentum=0.9", "client.local_epochs=2"],
    "record_level_eps3_scatternet": ["client=opacus", "tuning=mnist_opacus_eps3_scatter", "model=scatternet"],
    "client_level": ["client.lr=0.1", "client.local_epochs=2", "strategy=dp_fixed",
                     "strategy.noise_multiplier=1.0", "strategy.clipping_norm=0.5"],
}


def bench_utility(workload: list[str], *, work_dir: Path) -> dict[str, Any]:
    """Section 7: test accuracy and wall time, without privacy and with each kind of DP."""
    rows = {}
    for name, extra in UTILITY_RUNS.items():
        overrides = [*workload, "num_clients=10", f"num_rounds={UTILITY_ROUNDS}", *extra]
        run = run_federation(overrides, out_dir=work_dir / f"utility_{name}")
        final = run["results"]["final"]
        rows[name] = {
            "overrides": extra,
            "test_accuracy": final["test_accuracy"],
            "epsilon_record_max": final["epsilon_record_max"],
            "epsilon_user": final["epsilon_user"],
            "wall_seconds": run["wall_seconds"],
        }
    return rows


# --- section 8: local DP against central DP --------------------------------------------------

LOCAL_DP_DATASETS = {
    "breast_cancer": ["dataset=breast_cancer"],
    "heart_disease": ["dataset=heart_disease"],
    "digits": ["dataset=digits"],
}
LOCAL_DP_EPSILONS = (1.0, 3.0, 10.0)
LOCAL_DP_CLIENTS, LOCAL_DP_ROUNDS, LOCAL_DP_DELTA = 10, 10, 1e-5


def bench_local_dp(*, repeats: int, work_dir: Path, plot_path: Path) -> dict[str, Any]:
    """Section 8: local DP at each per-round epsilon, central DP at the total epsilon it reaches.

    Logistic regression, 10 clients, 10 rounds, every client in every round.
    The local runs report ``epsilon_local_max`` (PLD, delta 1e-5); the central
    run's noise multiplier is solved so that its ``epsilon_user`` after the
    same rounds is at most that. Mean test accuracy over ``repeats`` runs.
    """
    from fedpriv.privacy.accounting import solve_noise_multiplier

    base = ["model=logreg", f"num_clients={LOCAL_DP_CLIENTS}", f"num_rounds={LOCAL_DP_ROUNDS}"]
    rows: dict[str, Any] = {}
    for dataset, extra in LOCAL_DP_DATASETS.items():
        def accuracy(name: str, overrides: list[str]) -> tuple[float, dict]:
            finals = [
                run_federation([*base, *extra, *overrides], out_dir=work_dir / f"local_dp_{dataset}_{name}_{i}")["results"]["final"]
                for i in range(repeats)
            ]
            return statistics.mean(f["test_accuracy"] for f in finals), finals[-1]

        plain, _ = accuracy("plain", ["client.local_epochs=1"])
        points = []
        for epsilon in LOCAL_DP_EPSILONS:
            local, final = accuracy(f"local{epsilon:g}", ["client=local_dp", f"client.epsilon_per_round={epsilon}"])
            total = final["epsilon_local_max"]
            z = solve_noise_multiplier(target_epsilon=total, delta=LOCAL_DP_DELTA, sample_rate=1.0, steps=LOCAL_DP_ROUNDS)
            central, final = accuracy(
                f"central{epsilon:g}",
                ["client.local_epochs=1", "strategy=dp_fixed", f"strategy.noise_multiplier={z}"],
            )
            points.append({
                "epsilon_per_round": epsilon,
                "total_epsilon": total,
                "local_accuracy": local,
                "central_noise_multiplier": z,
                "central_epsilon_user": final["epsilon_user"],
                "central_accuracy": central,
            })
        rows[dataset] = {"non_private_accuracy": plain, "points": points}
    _plot_local_dp(rows, path=plot_path)
    rows["plot"] = str(plot_path)
    return rows


def _plot_local_dp(rows: dict[str, Any], *, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.8), squeeze=False)
    for ax, (dataset, row) in zip(axes[0], rows.items(), strict=True):
        totals = [p["total_epsilon"] for p in row["points"]]
        ax.plot(totals, [p["local_accuracy"] for p in row["points"]], "o-", label="local DP (client=local_dp)")
        ax.plot(totals, [p["central_accuracy"] for p in row["points"]], "s-", label="central DP (strategy=dp_fixed)")
        ax.axhline(row["non_private_accuracy"], color="grey", linestyle="--", label="no DP")
        ax.set_xscale("log")
        ax.set_xlabel(f"total epsilon after {LOCAL_DP_ROUNDS} rounds (delta {LOCAL_DP_DELTA:g})")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{dataset}, logistic regression, {LOCAL_DP_CLIENTS} clients")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- section 11: compression -------------------------------------------------------------------

COMPRESSION_RUNS = {
    "none": ["compression=none"],
    "quantize 8 bits": ["compression=quantize", "compression.bits=8"],
    "quantize 4 bits": ["compression=quantize", "compression.bits=4"],
    "quantize 2 bits": ["compression=quantize", "compression.bits=2"],
    "topk 10%": ["compression=topk", "compression.fraction=0.1"],
    "topk 1%": ["compression=topk", "compression.fraction=0.01"],
}
COMPRESSION_CLIENTS = 10


def bench_compression(workload: list[str], *, rounds: int, work_dir: Path, plot_path: Path) -> dict[str, Any]:
    """Section 11: test accuracy against total bytes sent up, per compression setting."""
    rows = {}
    for name, extra in COMPRESSION_RUNS.items():
        overrides = [*workload, f"num_clients={COMPRESSION_CLIENTS}", f"num_rounds={rounds}", *extra]
        run = run_federation(overrides, out_dir=work_dir / f"compression_{_slug(name)}")
        final = run["results"]["final"]
        rows[name] = {
            "overrides": extra,
            "test_accuracy": final["test_accuracy"],
            "bytes_up_total": final["bytes_up_total"],
            "bytes_down_total": final["bytes_down_total"],
            "wall_seconds": run["wall_seconds"],
        }
    plain = rows["none"]
    for row in rows.values():
        row["bytes_up_ratio"] = row["bytes_up_total"] / plain["bytes_up_total"]
        row["accuracy_points_lost"] = 100 * (plain["test_accuracy"] - row["test_accuracy"])
    _plot_compression(rows, path=plot_path, rounds=rounds)
    return {"rounds": rounds, "runs": rows, "plot": str(plot_path)}


def _plot_compression(rows: dict[str, Any], *, path: Path, rounds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in rows.items():
        ax.plot(row["bytes_up_total"] / 1e6, row["test_accuracy"], "o")
        ax.annotate(name, (row["bytes_up_total"] / 1e6, row["test_accuracy"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"megabytes sent by clients over {rounds} rounds")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"compression: accuracy against bytes up, {COMPRESSION_CLIENTS} clients")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- section 12: deployment round latency -----------------------------------------------------

DEPLOYMENT_ROUNDS = 6
DEPLOYMENT_REPEATS = 2
TRIVIAL_APPS = {"flower_trivial": False, "flower_trivial_fast_polling": True}
"""Flower's trivial app with Flower's own grid, and with fedpriv's polling grid."""


def run_trivial_app(federation, *, shapes: list[list[int]], rounds: int, fast_polling: bool, work_dir: Path) -> list[float]:
    """Run ``scripts/trivial_app.py`` on ``federation``; returns its seconds per round."""
    import shutil

    from fedpriv.deployment import DeploymentMode, stage_deployment_app

    app_dir = work_dir / "app"
    timings = work_dir / "timings.json"
    run_config = {"shapes": json.dumps(shapes), "num-rounds": rounds, "timings-file": str(timings),
                  "fast-polling": fast_polling}
    stage_deployment_app(run_config, app_dir, server_app="trivial_app:server_app", client_app="trivial_app:client_app")
    shutil.copy(SCRIPTS / "trivial_app.py", app_dir)
    mode = DeploymentMode(address=federation.address, insecure=True, stream=False, timeout_seconds=60.0 * rounds)
    mode.run_app(app_dir, num_supernodes=len(federation.supernode_pids))
    return json.loads(timings.read_text())["round_seconds"]


def deployment_round_seconds(supernodes: int, *, work_dir: Path) -> dict[str, Any]:
    """Seconds per round of every app on one federation of ``supernodes`` SuperNodes."""
    from fedpriv.federation import start_federation, stop_federation

    shapes = [list(value.shape) for value in STEP_MODELS["mlp"][0]().state_dict().values()]
    federation = start_federation(work_dir / "federation", supernodes)
    runs: dict[str, list[float]] = {name: [] for name in (*TRIVIAL_APPS, "fedpriv")}
    try:
        for repeat in range(DEPLOYMENT_REPEATS):
            for name, fast_polling in TRIVIAL_APPS.items():
                seconds = run_trivial_app(federation, shapes=shapes, rounds=DEPLOYMENT_ROUNDS,
                                          fast_polling=fast_polling, work_dir=work_dir / f"{name}_{repeat}")
                runs[name] += seconds[1:]
            run = run_federation([*workload_overrides(None), *federation.mode_overrides(), "mode.stream=false",
                                  f"num_clients={supernodes}", f"num_rounds={DEPLOYMENT_ROUNDS}"],
                                 out_dir=work_dir / f"fedpriv_{repeat}")
            runs["fedpriv"] += run["round_seconds"][1:]
    finally:
        stop_federation(work_dir / "federation")
    apps = {name: {"median_round_seconds": statistics.median(seconds), "min_round_seconds": min(seconds),
                   "max_round_seconds": max(seconds), "rounds": len(seconds)} for name, seconds in runs.items()}
    fedpriv = apps["fedpriv"]["median_round_seconds"]
    return {
        "apps": apps,
        "ratio_to_flower_trivial": fedpriv / apps["flower_trivial"]["median_round_seconds"],
        "ratio_to_flower_trivial_fast_polling": fedpriv / apps["flower_trivial_fast_polling"]["median_round_seconds"],
    }


def bench_deployment(*, supernodes: tuple[int, ...], work_dir: Path) -> dict[str, Any]:
    """Section 12: seconds per deployment round, fedpriv (digits, MLP) against Flower's trivial app.

    For each federation size, one local federation (plain HTTP) runs every
    app ``DEPLOYMENT_REPEATS`` times for ``DEPLOYMENT_ROUNDS`` rounds,
    interleaved, so load on the machine falls on all alike. The trivial app
    sends arrays of the MLP's shapes. Each figure is over the rounds after
    the first of every run (the first installs the app on the SuperNodes).
    """
    return {
        "rounds_per_run": DEPLOYMENT_ROUNDS,
        "runs_per_app": DEPLOYMENT_REPEATS,
        **{f"{count} supernodes": deployment_round_seconds(count, work_dir=work_dir / f"supernodes_{count}")
           for count in supernodes},
    }

# --- section 13: heterogeneous clients -----------------------------------------------------------

HETEROGENEITY_METHODS = {
    "FedAvg": [],
    "FedProx mu 0.01": ["client.proximal_mu=0.01"],
    "FedProx mu 0.1": ["client.proximal_mu=0.1"],
    # Effective step server_lr / (1 - momentum) = 1, FedAvg's, reached within a few rounds.
    "FedAvgM": ["strategy.server_lr=0.3", "strategy.server_momentum=0.7"],
    "FedAdam": ["strategy.server_optimizer=adam"],
}
HETEROGENEITY_DP = ["strategy=dp_fixed", "strategy.noise_multiplier=1.0", "strategy.clipping_norm=0.5"]
"""Client-level DP of section 13: every client in every round, one fixed noise multiplier."""
POISONING_TRAINING = ["client.local_epochs=1", "client.momentum=0.0"]
"""Local training of section 14: with MNIST's tuned 2 epochs at momentum 0.9 the clients' models
drift so far apart that a coordinate-wise median of honest ones is a constant classifier."""
POISONING_RUNS = {
    "mean, no attack": ([], False),
    "mean": ([], True),
    "median": (["strategy.aggregator=median"], True),
    "trimmed_mean": (["strategy.aggregator=trimmed_mean", "strategy.trim_fraction=0.2"], True),
    "krum": (["strategy.aggregator=krum", "strategy.num_byzantine=2"], True),
}
POISONING_APP = "+mode.client_app=bench_apps:poisoning_client_app"


def heterogeneity_datasets(workload: list[str]) -> dict[str, dict[str, Any]]:
    """Section 13's federations: the workload with label skew over 10 clients, and the four hospitals.

    ``adam_lr`` is FedAdam's server learning rate for the model (a CNN's
    weights are small next to Flower's default 0.1; logistic regression's are not).
    """
    return {
        "label skew": {
            "overrides": [*workload, "num_clients=10", "partition=dirichlet", "partition.alpha=0.1"],
            "metric": "test_accuracy",
            "adam_lr": 0.01,
        },
        "heart disease": {
            "overrides": ["dataset=heart_disease", "partition=natural", "num_clients=4"],
            "metric": "test_auc",
            "adam_lr": 0.1,
        },
    }


def _per_round(run: dict[str, Any], metric: str) -> dict[str, Any]:
    """``metric`` per round and at the end of one federation, its ``epsilon_user`` and wall time."""
    results = run["results"]
    return {
        "per_round": [row[metric] for row in results["rounds"]],
        "final": results["final"][metric],
        "epsilon_user": results["final"]["epsilon_user"],
        "wall_seconds": run["wall_seconds"],
    }


def bench_heterogeneity(workload: list[str], *, rounds: int, work_dir: Path, plot_path: Path) -> dict[str, Any]:
    """Section 13: each method with and without client-level DP on two heterogeneous federations."""
    datasets = {}
    for name, spec in heterogeneity_datasets(workload).items():
        runs = {}
        for method, extra in HETEROGENEITY_METHODS.items():
            if method == "FedAdam":
                extra = [*extra, f"strategy.server_lr={spec['adam_lr']}"]
            runs[method] = {"overrides": extra}
            for privacy, dp in (("no_dp", []), ("dp", HETEROGENEITY_DP)):
                overrides = [*spec["overrides"], f"num_rounds={rounds}", *dp, *extra]
                run = run_federation(overrides, out_dir=work_dir / f"heterogeneity_{_slug(name)}_{_slug(method)}_{privacy}")
                runs[method][privacy] = _per_round(run, spec["metric"])
        datasets[name] = {"overrides": spec["overrides"], "metric": spec["metric"], "runs": runs}
    _plot_heterogeneity(datasets, path=plot_path)
    return {"rounds": rounds, "dp": HETEROGENEITY_DP, "datasets": datasets, "plot": str(plot_path)}


def bench_poisoning(workload: list[str], *, rounds: int, work_dir: Path) -> dict[str, Any]:
    """Section 14: final accuracy per aggregator when 2 of 10 IID clients send -10 times their update."""
    from scripts.bench_apps import POISON_SCALE, POISONED_PARTITIONS

    runs = {}
    for name, (extra, attacked) in POISONING_RUNS.items():
        overrides = [*workload, "num_clients=10", f"num_rounds={rounds}", *POISONING_TRAINING, *extra,
                     *([POISONING_APP] if attacked else [])]
        run = run_federation(overrides, out_dir=work_dir / f"poisoning_{_slug(name)}")
        runs[name] = {"overrides": extra, "attacked": attacked, **_per_round(run, "test_accuracy")}
    return {"rounds": rounds, "clients": 10, "poisoned": POISONED_PARTITIONS, "update_scale": POISON_SCALE,
            "training": POISONING_TRAINING, "runs": runs}


def _plot_heterogeneity(datasets: dict[str, Any], *, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 3.8 * len(datasets)), squeeze=False)
    for row, (name, dataset) in zip(axes, datasets.items(), strict=True):
        for ax, privacy in zip(row, ("no_dp", "dp"), strict=True):
            for method, runs in dataset["runs"].items():
                values = runs[privacy]["per_round"]
                ax.plot(range(1, len(values) + 1), values, label=method)
            epsilon = next(iter(dataset["runs"].values()))["dp"]["epsilon_user"]
            ax.set_title(f"{name}: {'no DP' if privacy == 'no_dp' else f'client-level DP, epsilon {epsilon:.1f}'}")
            ax.set_xlabel("round")
            ax.set_ylabel(dataset["metric"].replace("_", " "))
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the report ---------------------------------------------------------------------------


# --- section 9: secure aggregation ------------------------------------------------------------

SECAGG_ROUNDS = 4


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def federation_round_costs(overrides: list[str], *, out_dir: Path) -> dict[str, float]:
    """One federation's steady seconds per round, bytes per client per round (rounds 2..) and final accuracy."""
    run = run_federation(overrides, out_dir=out_dir)
    steady = run["results"]["rounds"][1:]
    return {
        "round_seconds": _steady(run["round_seconds"]),
        "bytes_up_per_client": statistics.median(r["bytes_up"] / r["num_clients"] for r in steady),
        "bytes_down_per_client": statistics.median(r["bytes_down"] / r["num_clients"] for r in steady),
        "test_accuracy": run["results"]["final"]["test_accuracy"],
    }
SECAGG_SPARSE_SHARES = 11
"""SecAgg+ neighbours of the sparse variant, run where there are more clients than that."""


def bench_secagg(workloads: dict[str, list[str]], *, clients: tuple[int, ...], work_dir: Path) -> dict[str, Any]:
    """Section 9: seconds per round and bytes per client per round, ``secure=secagg`` over ``secure=none``.

    Steady rounds (after the first) of the same federation, every client in
    every round, one local epoch; SecAgg with every client as a neighbour
    (the default), and SecAgg+ with ``SECAGG_SPARSE_SHARES`` neighbours where
    there are more clients.
    """
    rows = {}
    for name, workload in workloads.items():
        for num_clients in clients:
            variants = {"none": ["secure=none"], "secagg": ["secure=secagg"]}
            if num_clients > SECAGG_SPARSE_SHARES:
                variants[f"secagg_k{SECAGG_SPARSE_SHARES}"] = ["secure=secagg", f"secure.num_shares={SECAGG_SPARSE_SHARES}"]
            runs = {}
            for variant, extra in variants.items():
                overrides = [*workload, f"num_clients={num_clients}", f"num_rounds={SECAGG_ROUNDS}",
                             "client.local_epochs=1", *extra]
                runs[variant] = federation_round_costs(overrides, out_dir=work_dir / f"secagg_{_slug(name)}_{num_clients}_{variant}")
            plain = runs.pop("none")
            for variant, measured in runs.items():
                rows[f"{name}, {num_clients} clients, {variant}"] = {
                    "none": plain,
                    variant: measured,
                    "seconds_ratio": measured["round_seconds"] / plain["round_seconds"],
                    "bytes_up_ratio": measured["bytes_up_per_client"] / plain["bytes_up_per_client"],
                    "bytes_down_ratio": measured["bytes_down_per_client"] / plain["bytes_down_per_client"],
                }
    return rows


# --- section 10: homomorphic encryption ----------------------------------------------------

HE_ROUNDS = 4
HE_CLIENTS = 10


def ckks_error(dimension: int, *, clients: int = HE_CLIENTS, seed: int = 0) -> dict[str, float]:
    """Largest error of a decrypted weighted mean of ``clients`` random models of ``dimension`` values.

    Models are uniform in [-1, 1] and weights 10 to 1,000 examples, at the
    default ``secure=ckks`` parameters; also the seconds to encrypt, add and
    decrypt one model.
    """
    from fedpriv.he import CKKS
    from fedpriv.he.packing import decrypt_average, encrypt_weighted
    from strategies.aggregation import weighted_average
    from strategies.he_server import EncryptedSum

    ckks = CKKS()
    secret = ckks.make_context()
    public = secret.copy()
    public.make_context_public()
    rng = np.random.default_rng(seed)
    models = [rng.uniform(-1, 1, dimension) for _ in range(clients)]
    weights = [float(w) for w in rng.integers(10, 1000, clients)]
    total = EncryptedSum(public)
    start = time.perf_counter()
    records = [encrypt_weighted(secret, m, weight=w, slots=ckks.slots) for m, w in zip(models, weights)]
    encrypt_seconds = (time.perf_counter() - start) / clients
    start = time.perf_counter()
    for record in records:
        total.add(record)
    add_seconds = (time.perf_counter() - start) / clients
    start = time.perf_counter()
    average = decrypt_average(secret, total.record(), length=dimension)
    decrypt_seconds = time.perf_counter() - start
    expected = weighted_average([[m] for m in models], weights)[0]
    return {
        "dimension": dimension,
        "max_abs_error": float(np.max(np.abs(average - expected))),
        "encrypt_seconds": encrypt_seconds,
        "add_seconds": add_seconds,
        "decrypt_seconds": decrypt_seconds,
    }


def bench_he(workloads: dict[str, tuple[list[str], int]], *, work_dir: Path) -> dict[str, Any]:
    """Section 10: ``secure=ckks`` over ``secure=none``: seconds per round, bytes per client, the CKKS error.

    Steady rounds (after the first) of the same federation of ``HE_CLIENTS``,
    one local epoch; ``secure=ckks`` also evaluates on every client.
    """
    rows = {}
    for name, (workload, dimension) in workloads.items():
        runs = {}
        for secure in ("none", "ckks"):
            overrides = [*workload, f"num_clients={HE_CLIENTS}", f"num_rounds={HE_ROUNDS}", "client.local_epochs=1",
                         f"secure={secure}"]
            runs[secure] = federation_round_costs(overrides, out_dir=work_dir / f"he_{_slug(name)}_{secure}")
        rows[name] = {
            **runs,
            "seconds_ratio": runs["ckks"]["round_seconds"] / runs["none"]["round_seconds"],
            "bytes_up_ratio": runs["ckks"]["bytes_up_per_client"] / runs["none"]["bytes_up_per_client"],
            "ckks_error": ckks_error(dimension),
        }
    return rows


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_rows(sections: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(figure, measured, target or note)`` rows for every section that ran."""
    rows = []
    if "overhead" in sections:
        s = sections["overhead"]
        rows += [
            ("1 overhead: wall time / compute floor", _fmt(s["wall_ratio"]),
             f"target <= 1.10; {_fmt(s['federation_wall_seconds'], 1)}s vs {_fmt(s['floor_wall_seconds'], 1)}s"),
            ("1 overhead: rounds / floor rounds", _fmt(s["rounds_ratio"]), "first round includes the client workers' start"),
            ("1 overhead: rounds 2.. / floor rounds 2..", _fmt(s["steady_rounds_ratio"]), "steady state"),
            ("1 start-up seconds: fedpriv / floor", f"{_fmt(s['federation_startup_seconds'], 1)} / {_fmt(s['floor_startup_seconds'], 1)}", "wall time outside the rounds"),
        ]
    if "flower" in sections:
        s = sections["flower"]
        rows += [
            ("2 wall time: fedpriv / Flower built-ins", _fmt(s["wall_ratio"]),
             f"{_fmt(s['fedpriv_wall_seconds'], 1)}s vs {_fmt(s['flower_wall_seconds'], 1)}s"),
            ("2 epsilon reported: fedpriv / Flower example", f"{_fmt(s['fedpriv_epsilon'])} / {_fmt(s['flower_epsilon'])}",
             "Flower's restarts every round"),
            ("2 test accuracy: fedpriv / Flower", f"{_fmt(s['fedpriv_test_accuracy'], 3)} / {_fmt(s['flower_test_accuracy'], 3)}", ""),
        ]
    if "dp_step" in sections and "steps" in sections["dp_step"]:
        device = sections["dp_step"]["device"]
        for row in sections["dp_step"]["steps"]:
            target = "; target <= 1.5" if row["mode"] == "ew" else ""
            rows.append((f"3 DP step / plain step, {device}: {row['model']} {row['mode']} b{row['batch_size']}",
                         _fmt(row["ratio"]) if row["error"] is None else "failed",
                         f"plain step {_fmt(row['plain_ms'])} ms{target}"))
        for row in sections["dp_step"]["rounds"]:
            rows.append((f"3 DP round / plain round, {device}: {row['model']} n{row['examples']} b{row['batch_size']}",
                         _fmt(row["ratio"]), f"{_fmt(row['private_ms'], 0)} ms vs {_fmt(row['plain_ms'], 0)} ms"))
    if "accounting" in sections:
        s = sections["accounting"]
        for name in ("client_dp_sgd", "server_dp_fedavg"):
            rows.append((f"4 epsilon fedpriv / PLD: {name}", _fmt(s[name]["ratio"], 3),
                         f"{_fmt(s[name]['fedpriv_epsilon'])} vs {_fmt(s[name]['pld_epsilon'])}"))
        a = s["against_flower"]
        rows.append(("4 epsilon_user fedpriv / Flower (no amplification)", _fmt(a["ratio"], 3),
                     f"{_fmt(a['fedpriv_epsilon_user'])} vs {_fmt(a['flower_epsilon'], 1)}"))
    for clients, m in sections.get("memory", {}).items():
        rows.append((f"5 peak memory, {clients} (PSS, all processes)", f"{_fmt(m['peak_pss_mib'], 0)} MiB",
                     f"summed RSS {_fmt(m['peak_rss_sum_mib'], 0)} MiB"))
    for clients, s in sections.get("scale", {}).items():
        rows.append((f"6 seconds per round, {clients} clients, {SAMPLED_PER_ROUND} sampled", _fmt(s["steady_round_seconds"]),
                     f"first round {_fmt(s['first_round_seconds'], 1)}s"))
    for name, s in sections.get("utility", {}).items():
        privacy = s["epsilon_record_max"] if s["epsilon_record_max"] is not None else s["epsilon_user"]
        rows.append((f"7 test accuracy: {name}", _fmt(s["test_accuracy"], 3),
                     f"epsilon {_fmt(privacy)}, {_fmt(s['wall_seconds'], 0)}s"))
    for dataset, s in sections.get("local_dp", {}).items():
        if dataset == "plot" or not isinstance(s, dict) or "points" not in s:
            continue
        for p in s["points"]:
            rows.append((f"8 {dataset} accuracy at total epsilon {_fmt(p['total_epsilon'], 1)}: local / central DP",
                         f"{_fmt(p['local_accuracy'], 3)} / {_fmt(p['central_accuracy'], 3)}",
                         f"epsilon_per_round {p['epsilon_per_round']:g}; no DP {_fmt(s['non_private_accuracy'], 3)}"))
    for name, s in sections.get("secagg", {}).items():
        if not isinstance(s, dict) or "seconds_ratio" not in s:
            continue
        secure = next(value for key, value in s.items() if key.startswith("secagg"))
        rows.append((f"9 secure / none, seconds per round: {name}", _fmt(s["seconds_ratio"]),
                     f"target <= 2 (CNN, 10 clients); {_fmt(secure['round_seconds'])}s vs {_fmt(s['none']['round_seconds'])}s"))
        rows.append((f"9 secure / none, bytes up per client: {name}", _fmt(s["bytes_up_ratio"]),
                     f"target <= 2; {_fmt(secure['bytes_up_per_client'] / 1e6, 3)} MB vs "
                     f"{_fmt(s['none']['bytes_up_per_client'] / 1e6, 3)} MB; down {_fmt(s['bytes_down_ratio'])}x"))
    for name, s in sections.get("he", {}).items():
        if not isinstance(s, dict) or "seconds_ratio" not in s:
            continue
        rows.append((f"10 ckks / none, seconds per round: {name}", _fmt(s["seconds_ratio"]),
                     f"target <= 3 (CNN); {_fmt(s['ckks']['round_seconds'])}s vs {_fmt(s['none']['round_seconds'])}s"))
        rows.append((f"10 ckks / none, bytes up per client: {name}", _fmt(s["bytes_up_ratio"], 1),
                     f"{_fmt(s['ckks']['bytes_up_per_client'] / 1e6)} MB vs {_fmt(s['none']['bytes_up_per_client'] / 1e6, 3)} MB"))
        e = s["ckks_error"]
        rows.append((f"10 CKKS error of the decrypted mean: {name}", f"{e['max_abs_error']:.1e}",
                     f"{e['dimension']} values; encrypt {_fmt(e['encrypt_seconds'], 3)}s, add {_fmt(e['add_seconds'], 3)}s, "
                     f"decrypt {_fmt(e['decrypt_seconds'], 3)}s per model"))
    for name, r in sections.get("compression", {}).get("runs", {}).items():
        rows.append((f"11 compression {name}: test accuracy, bytes up / none", f"{_fmt(r['test_accuracy'], 3)}, {_fmt(r['bytes_up_ratio'], 3)}",
                     f"goal for 8 bits: within 0.5 points at <= 0.25; {_fmt(r['bytes_up_total'] / 1e6, 1)} MB up"))
    for name, s in sections.get("deployment", {}).items():
        if not isinstance(s, dict) or "apps" not in s:
            continue
        apps = s["apps"]
        rows.append((f"12 deployment seconds per round, {name}: fedpriv / Flower trivial app", _fmt(s["ratio_to_flower_trivial"]),
                     f"goal <= 1.3 (4 SuperNodes); {_fmt(apps['fedpriv']['median_round_seconds'])}s vs "
                     f"{_fmt(apps['flower_trivial']['median_round_seconds'])}s (median)"))
        rows.append((f"12 the same, {name}, trivial app with fedpriv's reply polling",
                     _fmt(s["ratio_to_flower_trivial_fast_polling"]),
                     f"{_fmt(apps['flower_trivial_fast_polling']['median_round_seconds'])}s"))
    heterogeneity = sections.get("heterogeneity", {})
    for name, dataset in heterogeneity.get("datasets", {}).items():
        for method, runs in dataset["runs"].items():
            rows.append((f"13 {name} {method}: final {dataset['metric']}, no DP / DP",
                         f"{_fmt(runs['no_dp']['final'], 3)} / {_fmt(runs['dp']['final'], 3)}",
                         f"epsilon_user {_fmt(runs['dp']['epsilon_user'])}"))
    for name, run in sections.get("poisoning", {}).get("runs", {}).items():
        rows.append((f"14 poisoning, {name}: final test accuracy", _fmt(run["final"], 3),
                     "2 of 10 clients send -10 x their update" if run["attacked"] else "no attack"))
    for name, section in sections.items():
        if isinstance(section, dict) and "error" in section:
            rows.append((f"{name}: FAILED", "-", section["error"].splitlines()[0]))
    return rows


def render_table(sections: dict[str, Any]) -> str:
    """The figures as a Markdown table."""
    lines = ["| figure | measured | target / note |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in table_rows(sections)]
    return "\n".join(lines)


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on; ``flwr`` is ``None`` where Flower is not installed (section 3 alone)."""
    import opacus

    try:
        import flwr
    except ImportError:
        flwr = None
    return {
        "date": datetime.date.today().isoformat(),
        "cpu_cores": os.cpu_count(),
        "gpu": torch.cuda.is_available(),
        "device": device_name(device),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": None if flwr is None else flwr.__version__,
        "opacus": opacus.__version__,
    }


def workload_overrides(mnist_root: Path | None) -> list[str]:
    """MNIST-8k and the CNN with a root, else scikit-learn's digits and the MLP."""
    if mnist_root is None:
        return ["dataset=digits", "model=mlp"]
    return ["dataset=mnist", f"dataset.root={mnist_root}", "dataset.split_source=test_file", "model=cnn28"]


def run_sections(
    *,
    sizes: Sizes,
    mnist_root: Path | None,
    work_dir: Path,
    plot_path: Path,
    only: str | None = None,
    device: torch.device = torch.device("cpu"),
) -> dict[str, Any]:
    """Run every section ``sizes`` asks for (or just ``only``); a failing section is recorded, the rest go on.

    Section 3 runs on ``device``; the others on the CPU.
    """
    workload = workload_overrides(mnist_root)
    sections: dict[str, Any] = {"workload": workload}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("overhead", lambda: bench_overhead(workload, sizes=sizes, work_dir=work_dir)),
        ("dp_step", lambda: bench_dp_step(sizes=sizes, device=device)),
        ("accounting", lambda: bench_accounting(sizes=sizes)),
    ]
    if sizes.flower:
        steps.append(("flower", lambda: bench_flower(workload, sizes=sizes, work_dir=work_dir)))
    if sizes.scale_clients:
        steps.append(("scale", lambda: bench_scale(sizes=sizes, work_dir=work_dir)))
    steps.append(("memory", lambda: bench_memory(workload, sizes=sizes, sections=sections, work_dir=work_dir)))
    if sizes.utility and mnist_root is not None:
        steps.append(("utility", lambda: bench_utility(workload, work_dir=work_dir)))
    if sizes.local_dp_repeats:
        steps.append(
            ("local_dp", lambda: bench_local_dp(repeats=sizes.local_dp_repeats, work_dir=work_dir, plot_path=plot_path))
        )
    if sizes.secagg_clients:
        secagg_workloads = {"mlp, digits": workload_overrides(None)}
        if mnist_root is not None:
            secagg_workloads["cnn28, MNIST-8k"] = workload
        steps.append(("secagg", lambda: bench_secagg(secagg_workloads, clients=sizes.secagg_clients, work_dir=work_dir)))
    if sizes.he:
        he_workloads = {"mlp, digits": (workload_overrides(None), model_dimension("mlp"))}
        if mnist_root is not None:
            he_workloads["cnn28, MNIST-8k"] = (workload, model_dimension("cnn28"))
        steps.append(("he", lambda: bench_he(he_workloads, work_dir=work_dir)))
    if sizes.compression_rounds:
        steps.append(("compression", lambda: bench_compression(
            workload, rounds=sizes.compression_rounds, work_dir=work_dir,
            plot_path=plot_path.with_name(plot_path.name.replace("_local_dp", "_compression")),
        )))
    if sizes.deployment_supernodes:
        steps.append(("deployment", lambda: bench_deployment(supernodes=sizes.deployment_supernodes, work_dir=work_dir)))
    if sizes.heterogeneity_rounds:
        steps.append(("heterogeneity", lambda: bench_heterogeneity(
            workload, rounds=sizes.heterogeneity_rounds, work_dir=work_dir,
            plot_path=plot_path.with_name(plot_path.name.replace("_local_dp", "_heterogeneity")),
        )))
        steps.append(("poisoning", lambda: bench_poisoning(workload, rounds=sizes.heterogeneity_rounds, work_dir=work_dir)))
    if only is not None:
        steps = [(name, step) for name, step in steps if name == only]
    for name, step in steps:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            sections[name] = step()
        except Exception as exc:  # one broken section must not hide the others' figures
            sections[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"bench: {name} took {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    return sections


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run the benchmark, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few minutes: fewer rounds, no 10,000 clients, no utility")
    size.add_argument("--smoke", action="store_true", help="the smallest setting, for tests")
    parser.add_argument("--mnist-root", type=Path, help="folder with the MNIST test file (else digits)")
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="where to write the figures")
    parser.add_argument("--only", choices=SECTIONS, help="run this one section")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where section 3 runs (default cpu)")
    parser.add_argument("--floor", help=argparse.SUPPRESS)  # internal: compute_floor on {"overrides", "workers"}
    args = parser.parse_args(argv)
    if args.floor is not None:
        request = json.loads(args.floor)
        print(json.dumps(compute_floor(request["overrides"], workers=request["workers"])))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here")
    device = torch.device(args.device)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedpriv-bench-") as work_dir:
        sections = run_sections(
            sizes=SIZES[mode],
            mnist_root=args.mnist_root,
            work_dir=Path(work_dir),
            plot_path=args.out.with_name(f"{args.out.stem}_local_dp.png"),
            only=args.only,
            device=device,
        )
    document = {"mode": mode, "sizes": asdict(SIZES[mode]), "machine": machine(device),
                "seconds": time.perf_counter() - start, **sections}
    print(render_table(sections))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out} ({document['seconds']:.0f}s)")
    failed = [name for name, section in sections.items() if isinstance(section, dict) and "error" in section]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
