"""Run an experiment on a Flower deployment: a running SuperLink and its SuperNodes.

``mode=deployment`` submits the app to a SuperLink with ``flwr run``, the
same way as by hand, and waits for the run to end. The app that is submitted
(a Flower App Bundle, FAB) is staged in a temporary folder: the code packages
the ServerApp and ClientApp import (``fedpriv``, ``strategies``, ``clients``)
and a ``pyproject.toml`` whose run config is the composed experiment, written
by :func:`fedpriv.simulation.stage_app` exactly as for a simulation (Flower
only accepts override keys that the app declares, and a config group option
brings keys of its own).

The SuperLink connection is written to a temporary ``FLWR_HOME/config.toml``
(Flower 1.42's CLI reads connections there, not from the app's pyproject), so
the user's ``~/.flwr`` is neither read nor changed.

The SuperLink must run with ``--disable-runtime-dependency-installation`` (or
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` in its environment), and
the SuperLink's and SuperNodes' Python environments must have fedpriv's
dependencies installed: the staged app declares none, so nothing is
installed per run. ``scripts/federation.py`` starts such a deployment.

The run is submitted with ``flwr run --format json`` (which gives the run id;
with ``--format json`` Flower swallows streamed logs, so they are streamed
separately with ``flwr log ID --stream``). ``flwr run --stream`` and
``flwr log`` exit 0 even when the run failed, so the run's final status is
read with ``flwr ls --run-id ID --format json`` and anything but
``finished:completed`` raises :class:`RuntimeError`. On Ctrl-C or after
``timeout_seconds`` the run is stopped on the SuperLink (``flwr stop``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from fedpriv.checks import check_bool, check_real
from fedpriv.logs import get_logger
from fedpriv.run_config import Scalar
from fedpriv.simulation import CLIENT_APP, SERVER_APP, stage_app

logger = get_logger(__name__)

# The packages the ServerApp and ClientApp import from this project.
APP_PACKAGES = ("fedpriv", "strategies", "clients")
CONNECTION = "fedpriv"
OUTPUT_DIR_KEY = "output-dir"
COMPLETED = "finished:completed"
_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:\[\]/]+):(?P<port>\d{1,5})$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(text: str) -> str:
    """The CLI's error output on one line, without colours and its "Using SuperLink" preamble."""
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines()]
    return " ".join(line for line in lines if line and not line.startswith("Using SuperLink"))


def flower_command(name: str) -> str:
    """Path of a Flower console script (``flwr``, ``flower-superlink``, ...) of this environment.

    Raises
    ------
    RuntimeError
        If it is neither next to this Python nor on ``PATH``.
    """
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found next to {sys.executable} or on PATH (is flwr installed?)")
    return found


def flwr_json(args: list[str], *, env: dict[str, str], timeout: float = 120.0) -> dict:
    """Run ``flwr ARGS --format json`` and return its JSON document.

    A command that prints no JSON gives ``{"success": false, "error-message": ...}``
    with what it printed, so callers handle one shape.
    """
    result = subprocess.run(
        [flower_command("flwr"), *args, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        detail = _ANSI.sub("", (result.stdout + result.stderr).strip())
        return {"success": False, "error-message": detail or f"exit code {result.returncode}"}


def stage_deployment_app(
    run_config: dict[str, Scalar],
    directory: Path,
    *,
    server_app: str = SERVER_APP,
    client_app: str = CLIENT_APP,
) -> Path:
    """Stage a Flower app folder for ``flwr run``: code packages plus ``pyproject.toml``.

    ``server_app`` and ``client_app`` are the components the app names; a
    module outside the packages must be copied into ``directory`` by the caller.

    Returns
    -------
    Path
        ``directory``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for package in APP_PACKAGES:
        spec = find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package {package!r} not found: is fedpriv installed (pip install -e .)?")
        source = Path(next(iter(spec.submodule_search_locations)))
        shutil.copytree(
            source,
            directory / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"),
        )
    stage_app(run_config, directory, server_app=server_app, client_app=client_app)
    return directory


@dataclass(frozen=True)
class DeploymentMode:
    """``mode=deployment``: run on a SuperLink and the SuperNodes connected to it.

    Parameters
    ----------
    address : str
        The SuperLink's Control API address ``HOST:PORT`` (in Flower 1.42 the
        same port as its Fleet and Runtime APIs, ``flower-superlink --port``).
    insecure : bool
        Connect without TLS (the SuperLink runs with ``--insecure``).
    root_certificates : str | None
        PEM file of the CA that signed the SuperLink's certificate. Exactly
        one of ``insecure`` and ``root_certificates`` must be set.
    stream : bool
        Stream the run's logs (ServerApp output) to this process's stdout.
    timeout_seconds : float | None
        Stop the run (``flwr stop``) and fail when it takes longer; ``None``
        waits as long as it takes.
    poll_seconds : float
        How often the run's status is polled when not streaming, and after
        the stream ended until the status is final.
    """

    address: str
    insecure: bool = False
    root_certificates: str | None = None
    stream: bool = True
    timeout_seconds: float | None = None
    poll_seconds: float = 2.0

    def __post_init__(self) -> None:
        """Validate the settings."""
        if not isinstance(self.address, str) or not (match := _ADDRESS.match(self.address)):
            raise ValueError(f"mode.address={self.address!r}: must be HOST:PORT, e.g. 127.0.0.1:9093")
        if not 1 <= int(match["port"]) <= 65535:
            raise ValueError(f"mode.address={self.address!r}: port must be in 1..65535")
        if not isinstance(self.insecure, bool):
            raise ValueError(f"mode.insecure={self.insecure!r}: must be true or false")
        if self.insecure and self.root_certificates is not None:
            raise ValueError(
                f"mode.insecure=true and mode.root_certificates={self.root_certificates!r}: "
                "set exactly one of them"
            )
        if not self.insecure and self.root_certificates is None:
            raise ValueError(
                "mode.insecure=false and mode.root_certificates=null: set exactly one of them "
                "(the CA certificate that signed the SuperLink's, or insecure=true for plain HTTP)"
            )
        if self.root_certificates is not None and not Path(self.root_certificates).expanduser().is_file():
            raise ValueError(f"mode.root_certificates={self.root_certificates!r}: file not found")
        check_bool("mode.stream", self.stream)
        if self.timeout_seconds is not None:
            check_real("mode.timeout_seconds", self.timeout_seconds, minimum=1.0, maximum=1e7)
        check_real("mode.poll_seconds", self.poll_seconds, minimum=0.01, maximum=3600.0)

    @property
    def results_local(self) -> bool:
        """Whether the ServerApp (which writes ``output_dir``) runs on this machine.

        True when the SuperLink's address is a loopback one; on another host
        the results are written there, under the same ``output_dir``.
        """
        host = _ADDRESS.match(self.address)["host"].strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    # ------------------------------------------------------------------ helpers

    def write_flwr_config(self, flwr_home: Path) -> Path:
        """Write ``FLWR_HOME/config.toml`` with one default connection to ``address``.

        Returns
        -------
        Path
            The file written.
        """
        import tomli_w

        connection: dict[str, object] = {"address": self.address}
        if self.insecure:
            connection["insecure"] = True
        else:
            # Flower requires an absolute path here.
            connection["root-certificates"] = str(Path(self.root_certificates).expanduser().resolve())
        flwr_home.mkdir(parents=True, exist_ok=True)
        path = flwr_home / "config.toml"
        path.write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}))
        return path

    @staticmethod
    def _env(flwr_home: Path) -> dict[str, str]:
        return {
            **os.environ,
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            # Read by a SuperLink started from this environment; harmless for the CLI.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }

    def run_status(self, run_id: int, *, env: dict[str, str]) -> tuple[str, str]:
        """``(status, details)`` of run ``run_id`` per ``flwr ls --run-id``."""
        doc = flwr_json(["ls", "--run-id", str(run_id)], env=env)
        if not doc.get("success") or not doc.get("runs"):
            message = _one_line(str(doc.get("error-message") or doc))
            raise RuntimeError(f"could not read the status of run {run_id}: {message}")
        run = doc["runs"][0]
        return str(run.get("status", "")), str(run.get("status-details", ""))

    # ------------------------------------------------------------------ run

    def run(self, *, run_config: dict[str, Scalar], num_supernodes: int) -> None:
        """Submit the app with ``run_config`` to the SuperLink and wait for the run.

        ``num_supernodes`` is informational: the run uses the SuperNodes
        connected to the SuperLink, and the strategy waits for
        ``strategy.min_available_nodes`` of them.

        Raises
        ------
        RuntimeError
            When the run could not be submitted, did not finish with status
            ``finished:completed``, or exceeded ``timeout_seconds``.
        """
        run_config = dict(run_config)
        output_dir = run_config.get(OUTPUT_DIR_KEY)
        if isinstance(output_dir, str) and output_dir and not Path(output_dir).is_absolute():
            # The ServerApp runs in the SuperLink's working directory, not this one.
            run_config[OUTPUT_DIR_KEY] = str(Path(output_dir).resolve())
        logger.info(
            "deployment: submitting the run to the SuperLink at %s (%s); expecting %d SuperNodes",
            self.address,
            "insecure" if self.insecure else f"TLS, CA {self.root_certificates}",
            num_supernodes,
        )
        with tempfile.TemporaryDirectory(prefix="fedpriv-deploy-") as tmp:
            self.run_app(stage_deployment_app(run_config, Path(tmp) / "app"), num_supernodes=num_supernodes)

    def run_app(self, app_dir: Path, *, num_supernodes: int) -> int:
        """Submit the staged Flower app in ``app_dir`` to the SuperLink and wait for its run.

        Returns
        -------
        int
            The run id.

        Raises
        ------
        RuntimeError
            As :meth:`run`.
        """
        with tempfile.TemporaryDirectory(prefix="fedpriv-flwr-home-") as flwr_home:
            self.write_flwr_config(Path(flwr_home))
            env = self._env(Path(flwr_home))
            self._report_nodes(num_supernodes, env=env)
            run_id = self._submit(app_dir, env=env)
            started = time.monotonic()
            try:
                status, details = self._wait(run_id, env=env, started=started)
            except BaseException:
                # Ctrl-C or a timeout: do not leave the run going on the SuperLink.
                self._stop(run_id, env=env)
                raise
        seconds = time.monotonic() - started
        if status != COMPLETED:
            raise RuntimeError(
                f"run {run_id} on {self.address} ended with status {status or 'unknown'}"
                + (f": {details}" if details else "")
            )
        logger.info("deployment: run %d finished (%s) in %.1fs", run_id, status, seconds)
        return run_id

    def _report_nodes(self, expected: int, *, env: dict[str, str]) -> None:
        """Log how many SuperNodes are online (the run itself decides whether enough are)."""
        doc = flwr_json(["supernode", "ls"], env=env)
        if not doc.get("success"):
            return  # `flwr run` reports an unreachable SuperLink in one line
        online = sum(1 for node in doc.get("nodes", []) if node.get("status") == "online")
        if online < expected:
            logger.warning(
                "deployment: %d SuperNode(s) online at %s, the experiment has num_clients=%d; "
                "the strategy waits for strategy.min_available_nodes of them",
                online,
                self.address,
                expected,
            )
        else:
            logger.info("deployment: %d SuperNode(s) online", online)

    def _submit(self, app_dir: Path, *, env: dict[str, str]) -> int:
        """``flwr run`` the staged app; returns the run id."""
        doc = flwr_json(["run", str(app_dir), CONNECTION], env=env, timeout=300.0)
        if not doc.get("success") or doc.get("run-id") is None:
            message = _one_line(str(doc.get("error-message") or doc))
            raise RuntimeError(f"flwr run could not start the run on {self.address}: {message}")
        run_id = int(doc["run-id"])
        logger.info("deployment: started run %d", run_id)
        return run_id

    def _wait(self, run_id: int, *, env: dict[str, str], started: float) -> tuple[str, str]:
        """Stream the logs (if asked) and poll until the run's status is final."""
        if self.stream:
            # `flwr log --stream` returns when the run has ended (or the
            # connection broke); the status poll below decides either way.
            remaining = None if self.timeout_seconds is None else self.timeout_seconds
            try:
                subprocess.run(
                    [flower_command("flwr"), "log", str(run_id), CONNECTION, "--stream"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    timeout=remaining,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(
                    f"run {run_id} did not finish within mode.timeout_seconds={self.timeout_seconds}; stopped it"
                ) from exc
        while True:
            status, details = self.run_status(run_id, env=env)
            if status.startswith("finished"):
                return status, details
            if self.timeout_seconds is not None and time.monotonic() - started > self.timeout_seconds:
                raise RuntimeError(
                    f"run {run_id} did not finish within mode.timeout_seconds={self.timeout_seconds} "
                    f"(status {status}); stopped it"
                )
            time.sleep(self.poll_seconds)

    def _stop(self, run_id: int, *, env: dict[str, str]) -> None:
        try:
            subprocess.run(
                [flower_command("flwr"), "stop", str(run_id), CONNECTION],
                env=env,
                capture_output=True,
                timeout=60,
                check=False,
            )
            logger.warning("deployment: asked the SuperLink to stop run %d", run_id)
        except (OSError, subprocess.SubprocessError) as exc:
            logger.warning("deployment: could not stop run %d: %s", run_id, exc)
