"""Adjustments to Flower 1.42's simulation engine, each for the duration of one run.

Flower's engine (``flwr.server.superlink.fleet.vce.vce_api.start_vce``) has
no hook for any of these, so each context manager binds one name in one of
Flower's modules on the way in and restores it on the way out, whatever
happens inside. None changes what a client or the server computes:

* :func:`engine_backend` makes the engine build fedpriv's process backend
  instead of Ray's;
* :func:`app_config_read_once` has the staged app's run config parsed once per
  run instead of once per simulated node (1.4 s at 10,000 nodes);
* :func:`engine_stops_promptly` lets the engine's threads see the end of the
  run within :data:`ENGINE_POLL_SECONDS` instead of one second.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

ENGINE_POLL_SECONDS = 0.05
"""Longest wait of the engine's threads on their message queues before they look at the stop event again."""


@contextlib.contextmanager
def engine_backend(make_backend: Callable[[dict], object] | None) -> Iterator[None]:
    """Make Flower's simulation engine build its backend with ``make_backend`` while inside.

    ``make_backend`` takes Flower's backend config and returns a
    :class:`~flwr.server.superlink.fleet.vce.backend.Backend`; ``None`` keeps
    Flower's Ray backend. Flower 1.42's ``start_vce`` has one backend and
    looks it up as ``RayBackend`` in
    ``flwr.server.superlink.fleet.vce.backend.raybackend`` when it builds it.
    Where that module is not imported yet, a stand-in module holding
    ``make_backend`` under that name takes its place, so Ray is never
    imported; otherwise the name is bound in the real module. Both are undone
    on the way out, whatever happens inside.
    """
    if make_backend is None:
        yield
        return
    name = "flwr.server.superlink.fleet.vce.backend.raybackend"
    module = sys.modules.get(name)
    if module is None:
        stand_in = types.ModuleType(name, "fedpriv's stand-in: the simulation engine's backend")
        stand_in.RayBackend = make_backend
        sys.modules[name] = stand_in
        try:
            yield
        finally:
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]
        return
    original = module.RayBackend
    module.RayBackend = make_backend
    try:
        yield
    finally:
        module.RayBackend = original


@contextlib.contextmanager
def app_config_read_once() -> Iterator[None]:
    """Make Flower's engine read the staged app's run config once per run, not once per node.

    Before the first round, Flower 1.42's ``start_vce`` registers a context for
    every simulated node, and each registration reads and parses the app's
    ``pyproject.toml`` again (``get_fused_config_from_dir``, called from
    ``flwr.compat.client.run_info_store``): 0.14 ms a node, 1.4 s of the first
    round at 10,000 nodes. The staged file does not change during a run, so
    inside this block that name returns a copy of the first result for the
    same folder and overrides (the values are scalars, so a shallow copy is a
    full one). The original is restored on the way out, whatever happens inside.
    """
    from flwr.compat.client import run_info_store

    read = run_info_store.get_fused_config_from_dir
    parsed: dict[tuple, dict] = {}

    def read_once(project_dir: Path, override_config: dict) -> dict:
        key = (str(project_dir), tuple(sorted(override_config.items())))
        if key not in parsed:
            parsed[key] = read(project_dir, override_config)
        return dict(parsed[key])

    run_info_store.get_fused_config_from_dir = read_once
    try:
        yield
    finally:
        run_info_store.get_fused_config_from_dir = read


class _PromptQueue(queue.Queue):
    """A queue whose blocking ``get`` gives up after at most :data:`ENGINE_POLL_SECONDS`.

    The engine's threads only call ``get`` with a timeout, and treat an early
    ``queue.Empty`` as "nothing yet": they check the stop event and wait again.
    """

    def get(self, block: bool = True, timeout: float | None = None):
        if block and (timeout is None or timeout > ENGINE_POLL_SECONDS):
            timeout = ENGINE_POLL_SECONDS
        return super().get(block, timeout)


@contextlib.contextmanager
def engine_stops_promptly() -> Iterator[None]:
    """Let the engine's threads notice the end of the run within :data:`ENGINE_POLL_SECONDS`.

    Flower 1.42's ``run_api`` only returns once its client threads have
    stopped, and each waits on a message queue for up to one second before it
    looks at the stop event: on average half a second after the last round,
    for nothing. Inside this block the queues it creates
    (``vce_api.Queue``) wait at most :data:`ENGINE_POLL_SECONDS` at a time.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.Queue
    vce_api.Queue = _PromptQueue
    try:
        yield
    finally:
        vce_api.Queue = original
