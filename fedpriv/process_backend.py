"""A Flower simulation backend that runs ClientApps in worker processes, without Ray.

Flower 1.42's simulation engine hands each message for a simulated SuperNode to
a :class:`~flwr.server.superlink.fleet.vce.backend.Backend`; its only backend
runs the ClientApp in a pool of Ray actors. On one machine Ray costs seconds a
run that train nothing: starting its cluster (GCS, raylet, API server,
dashboard agent), starting actors, and a shutdown that gives each daemon a
second to exit. :class:`ProcessBackend` does the same job with a
:class:`~fedpriv.worker_pool.WorkerPool` of child processes of this one, which
answer each message with the reply and the node's updated context, exactly what
a Ray actor returns. Everything else (the link state, the message queues, the
node contexts, the ServerApp and its grid) is Flower's engine, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientApp
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig

from fedpriv.worker_pool import WorkerPool, machine_pool_size

CONFIG_KEY = "process"
"""The backend config section of this backend: ``{"client_app": "module:attribute"}``."""


class ProcessBackend(Backend):
    """Flower simulation backend: ClientApps in a pool of local worker processes.

    Parameters
    ----------
    backend_config : dict
        Flower's backend config: ``client_resources`` (``num_cpus``,
        ``num_gpus``, as for Ray) and ``process`` (``client_app``: the
        ClientApp's ``module:attribute``, loaded by each worker).
    pool : WorkerPool, optional
        A pool already started (its workers load the app while the engine
        starts); by default one sized for this machine
        (:func:`~fedpriv.worker_pool.machine_pool_size`).
    cpus, gpus : int, optional
        The machine's cores and visible GPUs for the default pool (default:
        what this process sees).

    Raises
    ------
    ValueError
        When ``process.client_app`` is missing or the resources fit no client.
    """

    def __init__(
        self,
        backend_config: BackendConfig,
        *,
        pool: WorkerPool | None = None,
        cpus: int | None = None,
        gpus: int | None = None,
    ) -> None:
        super().__init__(backend_config)
        if pool is None:
            settings = backend_config.get(CONFIG_KEY) or {}
            client_app = str(settings.get("client_app", ""))
            if ":" not in client_app:
                raise ValueError(f"backend config {CONFIG_KEY}.client_app={client_app!r}: must be 'module:attribute'")
            resources = backend_config.get("client_resources") or {}
            num_cpus = float(resources.get("num_cpus", 1.0))
            num_gpus = float(resources.get("num_gpus", 0.0))
            size = machine_pool_size(client_num_cpus=num_cpus, client_num_gpus=num_gpus, cpus=cpus, gpus=gpus)
            pool = WorkerPool(client_app=client_app, size=size, client_num_cpus=num_cpus, client_num_gpus=num_gpus)
        self.pool = pool

    @property
    def num_workers(self) -> int:
        """Messages processed at once: the pool's running workers."""
        return self.pool.running

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        """Start the pool (unless started) and wait until every worker has loaded the ClientApp.

        ``app_fn`` (the driver's own copy of the app) is not used: each worker
        loads the app by its reference, so nothing is pickled but messages.

        Raises
        ------
        LoadClientAppError
            When a worker cannot load the ClientApp.
        """
        self.pool.wait_ready()

    def is_worker_idle(self) -> bool:
        """Whether a worker is free for a message."""
        return self.pool.has_idle()

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        """Run the ClientApp on ``message`` in a free worker; its reply and the node's updated context.

        Raises
        ------
        ClientAppException
            When the ClientApp raised, or its worker died (the worker is replaced).
        """
        return self.pool.run(message, context)

    def terminate(self) -> None:
        """Stop every worker."""
        self.pool.terminate()
