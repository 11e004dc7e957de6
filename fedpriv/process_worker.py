"""The loop a worker process of :class:`~fedpriv.process_backend.ProcessBackend` runs.

Apart from the backend so that a worker imports only what a ClientApp needs
(Flower's ``flwr.clientapp``, not the SuperLink's engine).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Mapping, Sequence

from flwr.clientapp.client_app import ClientApp, LoadClientAppError

from fedpriv.devices import ASSIGNED_GPUS_ENV


def load_client_app(reference: str) -> ClientApp:
    """The ClientApp at ``module:attribute``.

    Raises
    ------
    LoadClientAppError
        When the module cannot be imported or the attribute is no ClientApp.
    """
    import importlib

    module_name, _, attribute = reference.partition(":")
    try:
        app = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise LoadClientAppError(f"cannot load the ClientApp {reference!r}: {error}") from error
    if not isinstance(app, ClientApp):
        raise LoadClientAppError(f"{reference!r} is a {type(app).__name__}, not a ClientApp")
    return app


def serve(
    connection,
    *,
    client_app: str,
    threads: int,
    gpus: Sequence[int] | None,
    verbose: bool = False,
    stdio: tuple[int, int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """A worker process's life: load the app, answer ``(message, context)`` jobs until ``None``, exit.

    ``stdio`` (the driver's stdout and stderr, duplicated) and ``environ``
    (the driver's environment) replace the ones the worker was forked with.

    Sends ``("ready", pid)`` once the app is loaded (``("load-error", text)``
    if it cannot be), then for each job ``("ok", reply, context)`` or
    ``("raised", text)`` when the ClientApp raised. Unless ``verbose``, the
    clients' log lines below WARNING stay off the console, as Ray keeps its
    actors' output from the driver unless ``mode.verbose``.
    """
    # Ctrl-C reaches the whole process group: the driver stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if stdio is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        for driver_fd, own_fd in zip(stdio, (1, 2), strict=True):
            os.dup2(driver_fd, own_fd)
            os.close(driver_fd)
    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    if gpus is not None:
        # Before anything initializes CUDA, as Ray sets it for an actor.
        ids = ",".join(str(gpu) for gpu in gpus)
        os.environ["CUDA_VISIBLE_DEVICES"] = ids
        os.environ[ASSIGNED_GPUS_ENV] = ids
    import torch

    # Ray gives an actor OMP_NUM_THREADS = its CPUs; the same here.
    torch.set_num_threads(threads)
    try:
        app = load_client_app(client_app)
    except LoadClientAppError as error:
        connection.send(("load-error", str(error)))
        return
    connection.send(("ready", os.getpid()))
    answer_jobs(connection, app)
    connection.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # Every reply is sent and every file the app wrote is closed: skip the
    # interpreter's teardown of torch and friends, which takes longer than
    # the last round's aggregation (the driver waits for it).
    os._exit(0)


def answer_jobs(connection, app: ClientApp) -> None:
    """Run ``app`` on each ``(message, context)`` received until ``None`` or a closed pipe."""
    while True:
        try:
            job = connection.recv()
        except EOFError:
            return
        if job is None:
            return
        message, context = job
        try:
            reply = app(message=message, context=context)
        except Exception as error:  # noqa: BLE001 - every ClientApp error is reported, as Ray's actor does
            connection.send(("raised", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
        else:
            connection.send(("ok", reply, context))
