"""Shared test helpers: Flower message construction outside a running Flower app."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# Flower reads this when first imported.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Partitionings the tests compute stay out of the user's ~/.cache (child processes inherit it).
if "FEDPRIV_CACHE" not in os.environ:
    import tempfile

    os.environ["FEDPRIV_CACHE"] = tempfile.mkdtemp(prefix="fedpriv-test-cache-")

import dp_accounting
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """One torch thread per xdist worker: two workers on two cores, not four threads."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Start the slow tests first, so their waits overlap the rest of the suite."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def one_thread():
    """One intra-op torch thread, as in a ClientApp, restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def task_identity():
    """Messages need a task identity, which a running ServerApp would set."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


def arrays_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord holding copies of ``arrays``."""
    return ArrayRecord({name: Array(np.array(value)) for name, value in arrays.items()})


def reply(
    node_id: int,
    arrays: dict[str, np.ndarray] | None,
    metrics: dict | None,
    *,
    message_type: str = MessageType.TRAIN,
) -> Message:
    """A reply from ``node_id`` carrying ``arrays`` and ``metrics`` (either may be None)."""
    request = Message(content=RecordDict(), message_type=message_type, dst_node_id=node_id)
    content = {}
    if arrays is not None:
        content["arrays"] = arrays_record(arrays)
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    return Message(content=RecordDict(content), reply_to=request)


def error_reply(node_id: int, *, code: int = 101, reason: str = "boom") -> Message:
    """An error reply from ``node_id``."""
    request = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node_id)
    return Message(error=Error(code=code, reason=reason), reply_to=request)


class FakeGrid:
    """The part of Flower's Grid that strategies use for sampling nodes."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


def noisy_round(strategy, server_round: int, model: dict[str, np.ndarray], *, rng: np.random.Generator, nodes=range(1, 11)):
    """One round on a fake grid from ``model``: every sampled node replies with ``model`` plus N(0, 1) noise.

    Returns the round's new model (arrays by name).
    """
    from flwr.app import ConfigRecord

    messages = strategy.configure_train(server_round, arrays_record(model), ConfigRecord(), FakeGrid(nodes))
    replies = [
        reply(
            msg.metadata.dst_node_id,
            {name: (value + rng.normal(size=value.shape)).astype(value.dtype) for name, value in model.items()},
            {"num-examples": 50, "train_loss": 1.0},
        )
        for msg in messages
    ]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return {name: arrays[name].numpy() for name in model}


def pld_epsilon(history: Sequence[tuple[float, float, int]], *, delta: float) -> float:
    """The independent reference: Google dp-accounting's PLD epsilon.

    ``history`` holds ``(noise_multiplier, sample_rate, steps)`` runs of
    Poisson-subsampled Gaussian releases, composed in order.
    """
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    for noise_multiplier, sample_rate, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


def run_project_script(name: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``scripts/<name>`` in a child Python that imports this checkout.

    ``tests/`` is on its path too, so a config may name a test's ``_target_``.
    """
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])},
    )


def operator_records(run_dir: Path) -> tuple[str, list[dict]]:
    """The operator file of a run: its warning line and its records, in order."""
    from fedpriv.publication import OPERATOR_FILE

    lines = [json.loads(line) for line in (Path(run_dir) / OPERATOR_FILE).read_text().splitlines()]
    return lines[0]["warning"], lines[1:]


def stop_and_assert_gone(directory: Path, started: list[int]) -> None:
    """Stop a local federation; nothing it or Flower started may be left running."""
    from fedpriv import federation

    spawned = federation._descendants(started)
    federation.stop_federation(directory)
    left = [pid for pid in [*started, *spawned] if federation.is_running(pid)]
    assert left == [], f"still running: {left}"
    assert list(directory.glob("*.pid")) == []
