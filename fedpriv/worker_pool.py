"""A pool of worker processes, each running one ClientApp, for the process backend.

:class:`WorkerPool` is the driver's side of :mod:`fedpriv.process_worker`:
it starts ``size`` processes, each of which loads the ClientApp from its
``module:attribute`` once, and hands each ``(message, context)`` to a free one,
which answers with the reply and the node's updated context. It imports only
what the workers need (``flwr.clientapp``), so a simulation can start it before
it imports Flower's engine (:class:`~fedpriv.simulation.SimulationMode`).

The workers are forked from multiprocessing's fork server, which imports
torch and Flower's ClientApp (:data:`FORK_SERVER_PRELOAD`) once for every
worker of the process, where spawned workers would each import them again:
about 1 s of CPU per worker saved at the start of a run. Each worker then
takes the driver's stdout and stderr and its environment as :meth:`WorkerPool.start`
found it, as a spawned one would have, and imports the ClientApp's module itself.

The pool is sized as Ray sizes its actor pool on one node (:func:`pool_size`):
one worker per ``client_num_cpus`` cores, and per ``client_num_gpus`` of the
visible GPUs when that is set (:func:`gpu_assignment`). A ClientApp that raises
gives Flower's ``ClientAppException``; a worker that dies (killed, out of
memory) is replaced and the message it held gets the same exception, so the
round goes on with the other clients.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import threading
from dataclasses import dataclass
from multiprocessing import reduction

from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientAppException, LoadClientAppError

from fedpriv.logs import get_logger
from fedpriv.process_worker import serve

FORK_SERVER_PRELOAD = ("torch", "fedpriv.process_worker")
"""What the fork server imports once for every worker it forks: torch and Flower's ClientApp.

Not the ClientApp's own module: one that touched CUDA as it was imported
would leave every forked worker unable to use it.
"""

STOP_SECONDS = 10.0
"""How long :meth:`WorkerPool.terminate` waits for a worker before killing it."""

logger = get_logger(__name__)


def pool_size(*, cpus: int, client_num_cpus: float, gpus: int = 0, client_num_gpus: float = 0.0) -> int:
    """How many clients train at once on a machine with ``cpus`` cores and ``gpus`` GPUs.

    One worker per whole ``client_num_cpus`` of the cores and, when
    ``client_num_gpus > 0``, no more than the GPUs hold (see
    :func:`gpu_assignment`), as Ray packs its actors on one node.

    Raises
    ------
    ValueError
        When not even one client fits (naming the setting that does not).
    """
    # A small tolerance so that 3 x 0.1 cores fit in 0.3 despite binary fractions.
    size = math.floor(cpus / client_num_cpus + 1e-9)
    if size < 1:
        raise ValueError(f"mode.client_num_cpus={client_num_cpus!r}: more than this machine's {cpus} cores")
    if client_num_gpus > 0:
        if client_num_gpus < 1:
            by_gpus = gpus * math.floor(1 / client_num_gpus + 1e-9)
        else:
            by_gpus = gpus // int(client_num_gpus)
        if by_gpus < 1:
            raise ValueError(f"mode.client_num_gpus={client_num_gpus!r}: this machine has {gpus} visible GPUs")
        size = min(size, by_gpus)
    return size


def machine_pool_size(
    *, client_num_cpus: float, client_num_gpus: float = 0.0, cpus: int | None = None, gpus: int | None = None
) -> int:
    """:func:`pool_size` on this machine: its cores and, when clients ask for GPUs, its visible GPUs.

    ``cpus`` and ``gpus`` stand in for what this process sees (tests).
    """
    if gpus is None:
        gpus = visible_gpus() if client_num_gpus > 0 else 0
    return pool_size(
        cpus=cpus or os.cpu_count() or 1, client_num_cpus=client_num_cpus, gpus=gpus, client_num_gpus=client_num_gpus
    )


def gpu_assignment(worker: int, *, client_num_gpus: float) -> tuple[int, ...]:
    """The GPU ids worker number ``worker`` (from 0) runs on.

    A share below one GPU packs ``floor(1 / share)`` workers on each GPU in
    turn; a whole number of GPUs gives each worker its own consecutive ones.
    No GPUs when ``client_num_gpus`` is 0.

    Raises
    ------
    ValueError
        A share above one that is not a whole number (Ray refuses those too).
    """
    if client_num_gpus <= 0:
        return ()
    if client_num_gpus < 1:
        return (worker // math.floor(1 / client_num_gpus + 1e-9),)
    if client_num_gpus != int(client_num_gpus):
        raise ValueError(f"mode.client_num_gpus={client_num_gpus!r}: above 1 it must be a whole number of GPUs")
    count = int(client_num_gpus)
    return tuple(range(worker * count, (worker + 1) * count))


def visible_gpus() -> int:
    """CUDA GPUs this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class _DriverFd:
    """One of this process's file descriptors, duplicated into a worker as it starts.

    Pickled only while a worker starts, as multiprocessing pickles a pipe's end.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        return _adopt, (reduction.DupFd(self.fd),)


def _adopt(duplicate) -> int:
    """The worker's own copy of a :class:`_DriverFd`."""
    return duplicate.detach()


@dataclass
class _Worker:
    """One worker process and the driver's end of its pipe."""

    number: int
    process: multiprocessing.process.BaseProcess
    connection: object

    def describe(self) -> str:
        """``worker N (pid P, exit code X)`` for messages."""
        self.process.join(timeout=1.0)
        return f"worker {self.number} (pid {self.process.pid}, exit code {self.process.exitcode})"


class WorkerPool:
    """``size`` worker processes that run the ClientApp ``client_app``, one message each at a time.

    Parameters
    ----------
    client_app : str
        The ClientApp's ``module:attribute``; each worker loads it itself.
    size : int
        Number of workers (see :func:`pool_size`).
    client_num_cpus : float
        Cores per client: each worker runs ``max(1, int(client_num_cpus))`` torch threads.
    client_num_gpus : float
        GPUs per client: worker ``i`` sees ``gpu_assignment(i)`` (none when 0).
    verbose : bool
        Show the clients' log lines below WARNING on the console too.

    Raises
    ------
    ValueError
        When ``client_app`` is not ``module:attribute`` or ``size`` is below 1.
    """

    def __init__(
        self,
        *,
        client_app: str,
        size: int,
        client_num_cpus: float = 1.0,
        client_num_gpus: float = 0.0,
        verbose: bool = False,
    ) -> None:
        if ":" not in str(client_app):
            raise ValueError(f"client_app={client_app!r}: must be 'module:attribute'")
        if size < 1:
            raise ValueError(f"size={size!r}: a pool needs at least one worker")
        self.client_app = str(client_app)
        self.size = int(size)
        self.client_num_cpus = float(client_num_cpus)
        self.client_num_gpus = float(client_num_gpus)
        self.verbose = bool(verbose)
        self._context = multiprocessing.get_context("forkserver")
        self._workers: dict[int, _Worker] = {}
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._started = False
        self._starter: threading.Thread | None = None
        self._environ: dict[str, str] = {}
        self._start_error: BaseException | None = None
        self._ready = False
        self.replaced = 0
        """Workers that died and were started again."""

    @property
    def running(self) -> int:
        """Workers started and not yet stopped."""
        return len(self._workers)

    def start(self) -> None:
        """Start the workers without waiting for them; they import and load the app meanwhile. Once only."""
        with self._lock:
            if self._started:
                return
            self._started = True
        # Only before the fork server starts does the list count (once per process).
        self._context.set_forkserver_preload(list(FORK_SERVER_PRELOAD))
        # Taken here, in the caller's thread: the starter thread must not read
        # os.environ while the caller goes on changing it.
        self._environ = dict(os.environ)
        # Starting a worker waits until the fork server has imported all that:
        # a thread waits, so that this one goes on with its own work meanwhile.
        self._starter = threading.Thread(target=self._start_all, name="fedpriv-worker-starter", daemon=True)
        self._starter.start()

    def _start_all(self) -> None:
        try:
            for number in range(self.size):
                self._start(number)
        except BaseException as error:  # noqa: BLE001 - handed to wait_ready in the caller's thread
            self._start_error = error

    def wait_ready(self) -> None:
        """Start the workers if :meth:`start` was not called; wait until each has loaded the app.

        Raises
        ------
        LoadClientAppError
            When a worker cannot load the ClientApp.
        """
        self.start()
        self._starter.join()
        if self._start_error is not None:
            error = self._start_error
            raise LoadClientAppError(f"the worker pool could not start its workers: {error}") from error
        with self._lock:
            if self._ready:
                return
            self._ready = True
            started = list(self._workers.values())
        for worker in started:
            self._await_ready(worker)
            self._idle.put(worker)
        logger.debug("worker pool: %d workers, pids %s", self.size, [w.process.pid for w in started])

    def has_idle(self) -> bool:
        """Whether a worker is free for a message."""
        return not self._idle.empty()

    def run(self, message: Message, context: Context) -> tuple[Message, Context]:
        """Run the ClientApp on ``message`` in a free worker; its reply and the node's updated context.

        Waits for a free worker; call :meth:`wait_ready` first.

        Raises
        ------
        ClientAppException
            When the ClientApp raised, or its worker died (the worker is replaced).
        """
        worker = self._idle.get()
        try:
            worker.connection.send((message, context))
            answer = worker.connection.recv()
        except (EOFError, OSError) as error:
            described = worker.describe()
            self._idle.put(worker if self._stopping.is_set() else self._replace(worker))
            raise ClientAppException(
                f"{described} stopped while running the ClientApp for node {message.metadata.dst_node_id}"
            ) from error
        self._idle.put(worker)
        if answer[0] == "raised":
            raise ClientAppException(answer[1])
        _, reply, updated = answer
        return reply, updated

    def terminate(self) -> None:
        """Ask every worker to stop; kill the ones still running after :data:`STOP_SECONDS`. Idempotent."""
        self._stopping.set()
        if self._starter is not None:
            self._starter.join()
        with self._lock:
            workers, self._workers = list(self._workers.values()), {}
        for worker in workers:
            try:
                worker.connection.send(None)
            except OSError:
                pass
        for worker in workers:
            worker.process.join(timeout=STOP_SECONDS)
            if worker.process.is_alive():
                logger.warning("worker pool: %s did not stop, killing it", worker.describe())
                worker.process.kill()
                worker.process.join()
            worker.connection.close()

    def _start(self, number: int) -> _Worker:
        """Start worker ``number`` (it loads the app in the background)."""
        parent_end, child_end = self._context.Pipe()
        gpus = gpu_assignment(number, client_num_gpus=self.client_num_gpus) if self.client_num_gpus > 0 else None
        process = self._context.Process(
            target=serve,
            args=(child_end,),
            kwargs={
                "client_app": self.client_app,
                "threads": max(1, int(self.client_num_cpus)),
                "gpus": gpus,
                "verbose": self.verbose,
                # A forked worker has the fork server's; a spawned one would have this
                # process's, and so does this one (the environment as :meth:`start` found it).
                "stdio": (_DriverFd(1), _DriverFd(2)),
                "environ": self._environ,
            },
            name=f"fedpriv-client-worker-{number}",
            daemon=True,
        )
        process.start()
        child_end.close()
        worker = _Worker(number=number, process=process, connection=parent_end)
        with self._lock:
            self._workers[number] = worker
        return worker

    def _await_ready(self, worker: _Worker) -> None:
        """Wait for ``worker``'s ready signal.

        Raises
        ------
        LoadClientAppError
            When it could not load the app or exited first.
        """
        try:
            answer = worker.connection.recv()
        except EOFError as error:
            raise LoadClientAppError(f"{worker.describe()} exited before loading {self.client_app!r}") from error
        if answer[0] != "ready":
            raise LoadClientAppError(answer[1])

    def _replace(self, worker: _Worker) -> _Worker:
        """Start a new worker in place of the dead ``worker``.

        If the new one cannot load the app either, the dead one is returned:
        the next message sent to it fails at once and tries again, so every
        message still gets an answer.
        """
        worker.connection.close()
        try:
            replacement = self._start(worker.number)
            self._await_ready(replacement)
        except LoadClientAppError as error:
            logger.error("worker pool: worker %d could not be replaced: %s", worker.number, error)
            return worker
        self.replaced += 1
        logger.warning("worker pool: worker %d replaced (new pid %d)", worker.number, replacement.process.pid)
        return replacement
