"""``mode.ray_address``: a simulation on an existing Ray cluster of a head and a worker node.

The test starts both nodes on this machine itself (``ray start --block``, each
in a process group of its own, with a temporary folder of its own so that no
other Ray on the machine finds this cluster) and stops exactly those groups;
nothing they started may be left running.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_project_script
from fedpriv.simulation import SimulationMode

STARTED = "Ray runtime started."
START_TIMEOUT = 90
STOP_TIMEOUT = 30


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def group_members(pgid: int) -> list[int]:
    """The processes of process group ``pgid``."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone while we looked
        if int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


class LocalRayCluster:
    """A Ray head node and one worker node on this machine, one CPU each.

    Parameters
    ----------
    root : Path
        A short, empty folder: each node keeps its sessions in a folder of its
        own under it (Ray's socket paths must stay under 108 characters).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.left_running: list[int] = []

    def start(self) -> None:
        """Start the head, then the worker, and wait until both are in the cluster."""
        self._start_node(
            "head",
            "--head",
            f"--port={self.port}",
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
        )
        self._start_node("worker", f"--address={self.address}")
        probe = (
            "import sys, time, ray\n"
            f"ray.init(address={self.address!r}, log_to_driver=False)\n"
            "deadline = time.monotonic() + 60\n"
            "while sum(node['Alive'] for node in ray.nodes()) < 2 and time.monotonic() < deadline:\n"
            "    time.sleep(0.2)\n"
            "sys.exit(0 if sum(node['Alive'] for node in ray.nodes()) == 2 else 1)\n"
        )
        joined = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=START_TIMEOUT)
        assert joined.returncode == 0, f"the worker node did not join: {joined.stderr[-2000:]}"

    def _start_node(self, name: str, *args: str) -> None:
        folder = self.root / name
        folder.mkdir()
        log = folder / "ray-start.log"
        with log.open("w") as output:
            self.nodes[name] = subprocess.Popen(
                [
                    sys.executable, "-m", "ray.scripts.scripts", "start", *args,
                    "--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1",
                    f"--temp-dir={folder}", f"--dashboard-agent-listen-port={free_port()}",
                    "--disable-usage-stats", "--block",
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while STARTED not in log.read_text():
            assert self.nodes[name].poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)

    def logs(self, name: str) -> Path:
        """The log folder of node ``name``'s session."""
        return self.root / name / "session_latest" / "logs"

    def stop(self) -> None:
        """Stop both nodes' process groups (SIGTERM, then SIGKILL); keep what survived in ``left_running``."""
        for process in reversed(self.nodes.values()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in self.nodes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        while time.monotonic() < deadline and any(group_members(p.pid) for p in self.nodes.values()):
            time.sleep(0.2)
        self.left_running = [pid for p in self.nodes.values() for pid in group_members(p.pid)]
        for process in self.nodes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)


@contextlib.contextmanager
def local_ray_cluster() -> Iterator[LocalRayCluster]:
    """A started :class:`LocalRayCluster`, stopped on the way out."""
    with tempfile.TemporaryDirectory(prefix="fpray-", dir="/tmp") as root:
        cluster = LocalRayCluster(Path(root))
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


def actor_logs(folder: Path) -> list[Path]:
    """Ray worker logs of Flower's client actors in a node's log folder."""
    return [path for path in folder.glob("worker-*") if "ClientAppActor" in path.read_text(errors="replace")]


@pytest.mark.parametrize(("ray_address", "expected"), [("", {}), ("10.0.0.5:6379", {"address": "10.0.0.5:6379"})])
def test_the_ray_address_reaches_flowers_ray_init_arguments(ray_address, expected, monkeypatch):
    # Prepare: Flower's simulation engine, replaced by a recorder (the package's
    # run_simulation attribute is the function, so the module comes from importlib)
    engine = importlib.import_module("flwr.simulation.run_simulation")
    calls = []
    monkeypatch.setattr(engine, "_run_simulation", lambda **kwargs: calls.append(kwargs))

    # Execute
    SimulationMode(backend="ray", ray_address=ray_address).run(run_config={"num-clients": 2}, num_supernodes=2)

    # Assert: RayBackend.init_ray passes init_args to ray.init
    (call,) = calls
    assert call["backend_config"]["init_args"] == {"include_dashboard": False, "log_to_driver": False, **expected}
    assert call["backend_config"]["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}


@pytest.mark.slow
def test_a_simulation_joins_an_existing_ray_cluster_and_trains_on_both_nodes(tmp_path):
    # Prepare: two clients of one CPU each on two nodes of one CPU each, so
    # Flower sizes its pool from the cluster (one actor per node)
    out = tmp_path / "run"

    # Execute
    with local_ray_cluster() as cluster:
        result = run_project_script(
            "run.py",
            f"output_dir={out}",
            "mode.backend=ray",
            f"mode.ray_address={cluster.address}",
            "num_clients=2",
            "num_rounds=2",
            "client=opacus",
            "client.local_epochs=1",
            "client.grad_sample_mode=auto",
            "server_device=auto",
            cwd=tmp_path,
            timeout=240,
        )
        on_head, on_worker = (actor_logs(cluster.logs(name)) for name in ("head", "worker"))

    # Assert: the run, on both nodes, and nothing of the cluster left running
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads((out / "results.json").read_text())
    assert document["config"]["mode"]["ray_address"] == cluster.address
    assert [row["round"] for row in document["rounds"]] == [1, 2]
    assert all(row["num_clients"] == 2 and row["epsilon_record_max"] > 0 for row in document["rounds"])
    assert document["final"]["stopped_reason"] == "completed"
    assert on_head and on_worker, "a client actor on each node"
    assert cluster.left_running == []
