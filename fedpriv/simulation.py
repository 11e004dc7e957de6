"""Run an experiment on Flower's simulation runtime, in this process.

This calls the same engine that ``flwr run`` starts inside its simulation
process (``flwr.simulation.run_simulation._run_simulation``), with the
ServerApp and ClientApp loaded from their component strings, exactly as in a
deployment. The engine runs the ClientApps on a backend: ``mode.backend=process``
(the default) is fedpriv's :class:`~fedpriv.process_backend.ProcessBackend`, a
pool of worker processes of this one; ``mode.backend=ray`` is Flower's Ray
backend, for GPUs shared by Ray's scheduler and for Ray clusters. Flower 1.42's
engine builds its Ray backend by name whatever backend it is asked for
(``start_vce`` imports ``RayBackend`` when it starts), so for the process
backend :func:`~fedpriv.flower_engine.engine_backend` puts a maker of ``ProcessBackend`` under that
name for the duration of the run (in a stand-in module, so that Ray is not
imported either) and restores it after. The public ``run_simulation`` wrapper is
deprecated in Flower 1.42, and ``flwr run`` only accepts run-config keys that
the app's ``pyproject.toml`` already declares, while a config group (say
``strategy=dp_fixed``) brings keys of its own. So the composed run config is
written as the defaults of a staged copy of the app metadata, and both apps
read it from ``context.run_config`` like any Flower app. Flower's engine reads
that file again for every simulated node; :func:`~fedpriv.flower_engine.app_config_read_once`
has it read once per run.

With ``mode.ray_address`` the simulation joins a running Ray cluster instead
of starting Ray on this machine: Flower's Ray backend hands its ``init_args``
to ``ray.init``, so the address goes there, and Flower sizes its pool of
client actors from the resources of every node of the cluster.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import tomli_w

from fedpriv.checks import check_bool, check_real
from fedpriv.flower_engine import app_config_read_once, engine_backend, engine_stops_promptly
from fedpriv.logs import get_logger
from fedpriv.run_config import Scalar

SERVER_APP = "strategies.server_app:app"
CLIENT_APP = "clients.client_app:app"
BACKENDS = ("process", "ray")
# HOST:PORT of a Ray head node's GCS (a name, an IPv4 address or a bracketed IPv6 one).
_RAY_ADDRESS = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\]):(\d{1,5})")

logger = get_logger(__name__)


def stage_app(
    run_config: dict[str, Scalar],
    directory: Path,
    *,
    server_app: str = SERVER_APP,
    client_app: str = CLIENT_APP,
) -> Path:
    """Write a Flower app ``pyproject.toml`` whose run config is ``run_config``.

    ``server_app`` and ``client_app`` are the components it names.

    Returns
    -------
    Path
        The file written.
    """
    document = {
        "project": {
            "name": "fedpriv",
            "version": "0.1.0",
            "description": "fedpriv staged run",
            "license": "Apache-2.0",
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedpriv",
                    "components": {"serverapp": server_app, "clientapp": client_app},
                    "config": dict(run_config),
                }
            }
        },
    }
    path = Path(directory) / "pyproject.toml"
    path.write_text(tomli_w.dumps(document))
    return path


@dataclass(frozen=True)
class SimulationMode:
    """``mode=simulation``: one simulated SuperNode per client, on this machine or a Ray cluster.

    Parameters
    ----------
    backend : str
        ``process`` (default): the clients run in worker processes of this
        one (:class:`~fedpriv.process_backend.ProcessBackend`), no Ray.
        ``ray``: Flower's Ray backend, needed for ``ray_address``.
    client_num_cpus : float
        CPUs reserved per simulated client; with 2 cores, 1 runs two clients at
        a time.
    client_num_gpus : float
        GPUs reserved per simulated client; a client with ``client.device=auto``
        trains on the GPU its worker (or Ray) assigns it.
    ray_address : str
        With ``backend=ray`` only. Empty (default) starts Ray on this machine. ``HOST:PORT`` (the
        address ``ray start --head`` printed) or ``auto`` (the cluster this
        machine's ``ray start`` started or joined) runs the clients on that
        existing Ray cluster; the ServerApp stays in this process, which must
        be on a node of it. Every node needs the same Python, Ray and fedpriv
        installation (see the README, A Ray cluster).
    verbose : bool
        Show Flower's and Ray's debug logs.
    server_app, client_app : str
        ``module:attribute`` of the apps to run; fedpriv's by default.
        ``scripts/bench.py`` runs Flower's built-in FedAvg and a client in the
        style of Flower's Opacus example on the same config this way
        (``+mode.server_app=...``).
    """

    simulated: ClassVar[bool] = True
    """Every node is started by the run itself (``num_clients`` of them)."""

    backend: str = "process"
    client_num_cpus: float = 1.0
    client_num_gpus: float = 0.0
    ray_address: str = ""
    verbose: bool = False
    server_app: str = SERVER_APP
    client_app: str = CLIENT_APP

    def __post_init__(self) -> None:
        """Validate the settings."""
        if self.backend not in BACKENDS:
            raise ValueError(f"mode.backend={self.backend!r}: must be one of {list(BACKENDS)}")
        # Ray keeps 4 decimals of a resource: smaller requests would round to 0.
        check_real("mode.client_num_cpus", self.client_num_cpus, minimum=0.01, maximum=1024.0)
        gpus = check_real("mode.client_num_gpus", self.client_num_gpus, minimum=0.0, maximum=64.0)
        if 0 < gpus < 0.01:
            raise ValueError(f"mode.client_num_gpus={self.client_num_gpus!r}: must be 0 or in [0.01, 64]")
        check_bool("mode.verbose", self.verbose)
        if not _valid_ray_address(self.ray_address):
            raise ValueError(
                f"mode.ray_address={self.ray_address!r}: must be HOST:PORT of a Ray head node "
                "(e.g. 10.0.0.5:6379), auto, or empty for Ray on this machine"
            )
        if self.ray_address and self.backend != "ray":
            raise ValueError(f"mode.ray_address={self.ray_address!r}: needs mode.backend=ray (got {self.backend!r})")
        for key in ("server_app", "client_app"):
            module, _, attribute = str(getattr(self, key)).partition(":")
            if not (module and attribute):
                raise ValueError(f"mode.{key}={getattr(self, key)!r}: must be 'module:attribute'")

    def worker_count(self) -> int:
        """How many clients the process backend trains at once on this machine.

        Raises
        ------
        ValueError
            When one client's ``client_num_cpus`` or ``client_num_gpus`` is more
            than this machine has.
        """
        from fedpriv.worker_pool import machine_pool_size

        return machine_pool_size(client_num_cpus=self.client_num_cpus, client_num_gpus=self.client_num_gpus)

    def run(self, *, run_config: dict[str, Scalar], num_supernodes: int) -> None:
        """Run the app with ``run_config`` on ``num_supernodes`` simulated nodes.

        Raises
        ------
        RuntimeError
            When the ServerApp or the simulation runtime failed.
        """
        pool = None
        if self.backend == "process":
            from fedpriv.worker_pool import WorkerPool

            # Started before Flower's engine is even imported: the workers
            # import torch and load the ClientApp while this process starts
            # the engine and the ServerApp.
            pool = WorkerPool(
                client_app=self.client_app,
                size=self.worker_count(),
                client_num_cpus=self.client_num_cpus,
                client_num_gpus=self.client_num_gpus,
                verbose=self.verbose,
            )
            pool.start()
        try:
            self._run_engine(run_config=run_config, num_supernodes=num_supernodes, pool=pool)
        finally:
            # Flower's engine stops the backend it built; this covers a run that failed before.
            if pool is not None:
                pool.terminate()

    def _run_engine(self, *, run_config: dict[str, Scalar], num_supernodes: int, pool) -> None:
        """Flower's simulation engine on Ray, or on the process backend over ``pool``."""
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        from flwr.app import Context, RecordDict
        from flwr.supercore.telemetry import EventType
        from flwr.simulation.run_simulation import _run_simulation

        init_args = {"include_dashboard": False, "log_to_driver": self.verbose}
        if self.ray_address:
            init_args["address"] = self.ray_address
        backend_config = {
            "client_resources": {"num_cpus": self.client_num_cpus, "num_gpus": self.client_num_gpus},
            "init_args": init_args,
        }
        make_backend = None
        if pool is not None:
            from fedpriv.process_backend import ProcessBackend

            def make_backend(config):
                return ProcessBackend(config, pool=pool)

        with (
            tempfile.TemporaryDirectory(prefix="fedpriv-app-") as app_dir,
            engine_backend(make_backend),
            app_config_read_once(),
            engine_stops_promptly(),
        ):
            stage_app(run_config, Path(app_dir), server_app=self.server_app, client_app=self.client_app)
            context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
            _run_simulation(
                num_supernodes=num_supernodes,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                backend_name=self.backend,
                backend_config=backend_config,
                server_app_attr=self.server_app,
                client_app_attr=self.client_app,
                server_app_context=context,
                app_dir=app_dir,
                is_app=True,
                verbose_logging=self.verbose,
            )


def _valid_ray_address(address: object) -> bool:
    """Empty, ``auto``, or ``HOST:PORT`` with a port in [1, 65535]."""
    if address in ("", "auto"):
        return True
    match = _RAY_ADDRESS.fullmatch(address) if isinstance(address, str) else None
    return match is not None and 1 <= int(match.group(1)) <= 65535
