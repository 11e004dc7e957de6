"""Start and stop a local Flower deployment: one SuperLink and N SuperNodes.

``scripts/federation.py`` is the command line (``start``, ``stop``, ``run``)
over :func:`start_federation`, :func:`stop_federation` and :func:`run_foreground`.

:func:`start_federation` launches ``flower-superlink`` and N ``flower-supernode`` processes
bound to 127.0.0.1 on free ports chosen at run time, each in a session of its
own, with logs (``superlink.log``, ``supernode-<i>.log``) and PID files in
DIR. It waits until all N SuperNodes are online (asked through the SuperLink's
Control API), writes the address to use as ``mode.address`` to ``DIR/address``
(and everything else to ``DIR/federation.json``), prints it and returns.
SuperNode ``i`` gets ``--node-config "partition-id=i num-partitions=N
ledger-dir=DIR/ledgers/supernode-i"``: the folder where its ClientApp keeps
its privacy ledger across runs, so a resumed run forgets no epsilon.

:func:`stop_federation` ends exactly the processes :func:`start_federation` launched, found through the
PIDs in DIR (checked against their recorded start times, so a recycled PID
is left alone), together with their descendants (the SuperExec, ServerApp and
ClientApp processes that Flower spawns): SIGTERM first, SIGKILL after a grace
period.

``--tls`` creates a CA and a server certificate for ``localhost`` and
``127.0.0.1`` in DIR (``ca.crt`` is what ``mode.root_certificates`` needs);
the SuperLink serves TLS with it and the SuperNodes verify it.

``--auth`` turns on SuperNode authentication: the SuperLink runs with
``--enable-supernode-auth``, one EC key pair per SuperNode is created in
``DIR/keys``, each public key is registered with ``flwr supernode register``
before its SuperNode starts with ``--auth-supernode-private-key``, and the
SuperLink refuses any SuperNode whose key was not registered. Flower 1.42
allows this only with TLS, so ``--auth`` needs ``--tls``.

The SuperLink runs with runtime dependency installation disabled: the
processes use this Python environment, which already has the app's
dependencies (otherwise the SuperLink would ``uv sync`` them for every run).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedpriv.deployment import flower_command, flwr_json
from fedpriv.he.keys import NODE_KEY_DIR_KEY
from fedpriv.logs import get_logger

logger = get_logger(__name__)

HOST = "127.0.0.1"
STATE_FILE = "federation.json"
ADDRESS_FILE = "address"
CA_CERT = "ca.crt"
# Environment of every process started here: no telemetry, no update checks,
# the app's dependencies come from this environment (no `uv sync`), and the
# SuperExecs look for new ServerApp/ClientApp tasks every 0.2 s (default 1 s).
PROCESS_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
}


class FederationError(RuntimeError):
    """The federation could not be started (the message says why)."""


@dataclass(frozen=True)
class Federation:
    """A running local federation, as recorded in ``DIR/federation.json``.

    Attributes
    ----------
    dir : str
        The folder with logs, PID files, certificates and state.
    address : str
        SuperLink address ``HOST:PORT`` (Control, Fleet and Runtime API); use
        it as ``mode.address``.
    insecure : bool
        Whether the SuperLink serves plain HTTP (no TLS).
    auth : bool
        Whether the SuperLink only accepts registered SuperNodes.
    root_certificates : str | None
        CA certificate to verify the SuperLink (``mode.root_certificates``).
    superlink_pid : int
        PID of ``flower-superlink``.
    supernode_pids : list[int]
        PIDs of the ``flower-supernode`` processes, by partition id.
    supernode_ports : list[int]
        Their ClientAppIo (Runtime API) ports.
    start_times : dict[str, int]
        Kernel start time of every PID above (to recognise a recycled PID).
    he_key_dir : str | None
        With CKKS keys: the folder of the server's public context
        (``secure.key_dir``); each SuperNode's secret context is in its own
        ``supernode-<i>`` folder under it, named by its ``he-key-dir``.
    """

    dir: str
    address: str
    insecure: bool
    root_certificates: str | None
    superlink_pid: int
    auth: bool = False
    supernode_pids: list[int] = field(default_factory=list)
    supernode_ports: list[int] = field(default_factory=list)
    start_times: dict[str, int] = field(default_factory=dict)
    he_key_dir: str | None = None

    @property
    def pids(self) -> list[int]:
        """Every PID the launcher started (SuperLink first)."""
        return [self.superlink_pid, *self.supernode_pids]

    def mode_overrides(self) -> list[str]:
        """The ``scripts/run.py`` overrides that point ``mode=deployment`` here."""
        overrides = ["mode=deployment", f"mode.address={self.address}"]
        if self.insecure:
            overrides.append("mode.insecure=true")
        else:
            overrides.append(f"mode.root_certificates={self.root_certificates}")
        return overrides

    def secure_overrides(self) -> list[str]:
        """With CKKS keys, the overrides that run ``secure=ckks`` with them; else none."""
        return ["secure=ckks", f"secure.key_dir={self.he_key_dir}"] if self.he_key_dir else []


# --------------------------------------------------------------------------- processes


def _bin(name: str) -> str:
    """A Flower console script of this Python environment."""
    try:
        return flower_command(name)
    except RuntimeError as exc:
        raise FederationError(str(exc)) from exc


def _env(flwr_home: Path) -> dict[str, str]:
    env = {**os.environ, **PROCESS_ENV, "FLWR_HOME": str(flwr_home)}
    # Flower starts `flower-superexec` and `flwr-clientapp` by name: this
    # environment's scripts must come first on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _start_time(pid: int) -> int | None:
    """The kernel start time of ``pid`` (clock ticks since boot), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after it are fixed.
    return int(stat.rsplit(")", 1)[1].split()[19])


def is_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True  # no /proc: os.kill said it exists
    return state not in ("Z", "X")


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is a child of this process."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _descendants(pids: Iterable[int]) -> list[int]:
    """Every live descendant of ``pids`` (from /proc; empty without it)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    stack = list(pids)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.append(child)
                stack.append(child)
    return found


def _free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct ports that are free on ``host`` right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


# --------------------------------------------------------------------------- TLS


def make_certificates(directory: Path, *, hosts: Iterable[str] = ("localhost", HOST)) -> dict[str, Path]:
    """Create a CA and a server certificate for ``hosts``, signed by it.

    Returns
    -------
    dict[str, Path]
        ``ca`` (the CA certificate, for clients), ``cert`` and ``key`` (the
        server's certificate and private key).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=30)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpriv local federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, next(iter(hosts)))]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    directory.mkdir(parents=True, exist_ok=True)
    paths = {"ca": directory / CA_CERT, "cert": directory / "server.crt", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(pem_key(server_key))
    os.chmod(paths["key"], 0o600)
    # The CA key is not needed after signing: it is not written anywhere.
    return paths


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """Create an EC (NIST P-384) key pair for SuperNode authentication.

    Returns
    -------
    tuple[Path, Path]
        The private key (OpenSSH PEM, for ``--auth-supernode-private-key``)
        and the public key (OpenSSH line, for ``flwr supernode register``).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / name, directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    os.chmod(private, 0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + b"\n"
    )
    return private, public


# --------------------------------------------------------------------------- control API


def write_cli_config(flwr_home: Path, *, address: str, insecure: bool, root_certificates: str | None,
                     name: str = "fedpriv") -> Path:
    """Write a ``$FLWR_HOME/config.toml`` whose default connection is ``address``.

    Flower 1.42's CLI reads SuperLink connections from this file: a
    ``[superlink]`` table with ``default`` and one ``[superlink.NAME]`` table
    per connection with ``address`` and ``insecure`` or ``root-certificates``
    (an absolute path).

    Returns
    -------
    Path
        The file written.
    """
    import tomli_w

    connection: dict[str, object] = {"address": address}
    if insecure:
        connection["insecure"] = True
    if root_certificates is not None:
        connection["root-certificates"] = str(Path(root_certificates).resolve())
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": name, name: connection}}))
    return path


def _flwr_json(args: list[str], *, flwr_home: Path, timeout: float = 60.0) -> dict:
    """Run ``flwr ARGS --format json`` against the launcher's own FLWR_HOME."""
    return flwr_json(args, env=_env(flwr_home), timeout=timeout)


def online_supernodes(flwr_home: Path) -> int | None:
    """Number of online SuperNodes per ``flwr supernode ls`` (None if it failed)."""
    doc = _flwr_json(["supernode", "ls"], flwr_home=flwr_home)
    if not doc.get("success"):
        return None
    return sum(1 for node in doc.get("nodes", []) if node.get("status") == "online")


# --------------------------------------------------------------------------- start / stop


def _write_state(directory: Path, state: dict) -> None:
    tmp = directory / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(directory / STATE_FILE)


def _spawn(name: str, command: list[str], *, directory: Path, state: dict) -> subprocess.Popen:
    """Start one process in its own session, logging to ``DIR/NAME.log``; record its PID."""
    home = directory / "home" / name
    home.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{name}.log", "ab") as log:
        process = subprocess.Popen(
            command,
            cwd=directory,
            env=_env(home),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (directory / f"{name}.pid").write_text(f"{process.pid}\n")
    state["start_times"][str(process.pid)] = _start_time(process.pid)
    return process


def _live_pids(directory: Path) -> list[int]:
    path = directory / STATE_FILE
    if not path.exists():
        return []
    state = json.loads(path.read_text())
    pids = [state.get("superlink_pid"), *state.get("supernode_pids", [])]
    return [pid for pid in pids if pid and _same_process(pid, state)]


def _same_process(pid: int, state: dict) -> bool:
    """``pid`` is alive and is the process that was started (not a recycled PID)."""
    if not is_running(pid):
        return False
    recorded = state.get("start_times", {}).get(str(pid))
    current = _start_time(pid)
    return recorded is None or current is None or recorded == current


def _node_config(directory: Path, *, index: int, num_supernodes: int, he_key_dir: Path | None = None) -> str:
    """The ``--node-config`` of SuperNode ``index``: its partition, its own ledger folder and key folder."""
    ledger_dir = directory / "ledgers" / f"supernode-{index}"
    config = f'partition-id={index} num-partitions={num_supernodes} ledger-dir="{ledger_dir}"'
    if he_key_dir is not None:
        config += f' {NODE_KEY_DIR_KEY}="{he_key_dir / f"supernode-{index}"}"'
    return config


def make_he_keys(folder: Path, *, num_supernodes: int, ckks: Any) -> Path:
    """CKKS keys for a local federation: the public context in ``folder``, the secret one in each SuperNode's.

    ``folder`` (the server's ``secure.key_dir``) keeps no secret key. Keys
    already made are kept (a restarted federation keeps its clients' key).
    """
    from fedpriv.he.keys import PUBLIC_FILE, SECRET_FILE, make_keys

    first = folder / "supernode-0" / SECRET_FILE
    if not (folder / PUBLIC_FILE).is_file() or not first.is_file():
        make_keys(folder, ckks)
        (folder / "supernode-0").mkdir(exist_ok=True)
        os.replace(folder / SECRET_FILE, first)
    secret = first.read_bytes()
    for index in range(1, num_supernodes):
        node = folder / f"supernode-{index}"
        node.mkdir(parents=True, exist_ok=True)
        target = node / SECRET_FILE
        target.write_bytes(b"")
        target.chmod(0o600)
        target.write_bytes(secret)
    return folder


def start_federation(
    directory: str | os.PathLike[str],
    num_supernodes: int,
    *,
    tls: bool = False,
    auth: bool = False,
    timeout: float = 120.0,
    supernode_args: Iterable[str] = (),
    he_keys: Any = None,
) -> Federation:
    """Start a SuperLink and ``num_supernodes`` SuperNodes on 127.0.0.1.

    Parameters
    ----------
    directory : path
        Folder for logs, PID files, certificates and ``federation.json``.
    num_supernodes : int
        SuperNodes to start; node ``i`` gets ``partition-id=i
        num-partitions=num_supernodes`` and its own ``ledger-dir``.
    tls : bool
        Serve TLS with a CA created in ``directory`` (else plain HTTP).
    auth : bool
        SuperNode authentication: register one key per SuperNode and refuse
        unregistered ones.
    timeout : float
        Seconds to wait for every SuperNode to come online.
    supernode_args : Iterable[str]
        Extra arguments for every ``flower-supernode``.
    he_keys : fedpriv.he.CKKS or None
        Make CKKS keys with these parameters (:func:`make_he_keys`) and give
        every SuperNode its ``he-key-dir``.

    Returns
    -------
    Federation
        Addresses and PIDs (also in ``DIR/federation.json``).

    Raises
    ------
    FederationError
        When a federation started from ``directory`` is still running, or a
        process died or the SuperNodes did not come online in time (then
        everything started is stopped again).
    """
    if num_supernodes < 1:
        raise FederationError(f"num_supernodes={num_supernodes}: must be >= 1")
    if auth and not tls:
        raise FederationError("SuperNode authentication needs TLS (Flower's SuperLink refuses it without): add --tls")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    if _live_pids(directory):
        raise FederationError(f"a federation started from {directory} is still running: stop it first")

    link_port, *node_ports = _free_ports(1 + num_supernodes)
    address = f"{HOST}:{link_port}"
    certificates = make_certificates(directory) if tls else None
    he_key_dir = None
    if he_keys is not None:
        he_key_dir = make_he_keys(directory / "he-keys", num_supernodes=num_supernodes, ckks=he_keys)
    state: dict = {
        "dir": str(directory),
        "address": address,
        "insecure": not tls,
        "root_certificates": str(certificates["ca"]) if certificates else None,
        "superlink_pid": None,
        "auth": auth,
        "supernode_pids": [],
        "supernode_ports": node_ports,
        "start_times": {},
        "he_key_dir": str(he_key_dir) if he_key_dir else None,
    }
    processes: list[tuple[str, subprocess.Popen]] = []
    try:
        link_cmd = [_bin("flower-superlink"), "--host", HOST, "--port", str(link_port),
                    "--disable-runtime-dependency-installation"]
        if certificates:
            link_cmd += ["--ssl-ca-certfile", str(certificates["ca"]), "--ssl-certfile",
                         str(certificates["cert"]), "--ssl-keyfile", str(certificates["key"])]
        else:
            link_cmd += ["--insecure"]
        if auth:
            link_cmd += ["--enable-supernode-auth"]
        link = _spawn("superlink", link_cmd, directory=directory, state=state)
        processes.append(("superlink", link))
        state["superlink_pid"] = link.pid
        _write_state(directory, state)

        deadline = time.monotonic() + timeout
        while not _port_open(HOST, link_port):
            _check_alive(processes, directory)
            if time.monotonic() > deadline:
                raise FederationError(f"the SuperLink did not open {address} within {timeout:.0f}s")
            time.sleep(0.2)

        cli_home = directory / "home" / "cli"
        write_cli_config(cli_home, address=address, insecure=not tls,
                         root_certificates=state["root_certificates"])
        for index, port in enumerate(node_ports):
            node_cmd = [_bin("flower-supernode"), "--superlink", address, "--host", HOST,
                        "--port", str(port),
                        "--node-config",
                        _node_config(directory, index=index, num_supernodes=num_supernodes, he_key_dir=he_key_dir)]
            if certificates:
                node_cmd += ["--root-certificates", str(certificates["ca"])]
            else:
                node_cmd += ["--insecure"]
            if auth:
                private_key, public_key = make_node_key(directory / "keys", f"supernode-{index}")
                registered = _flwr_json(["supernode", "register", str(public_key)], flwr_home=cli_home)
                if not registered.get("success"):
                    raise FederationError(
                        f"could not register the key of supernode-{index}: "
                        f"{registered.get('error-message', registered)}"
                    )
                node_cmd += ["--auth-supernode-private-key", str(private_key)]
            node_cmd += list(supernode_args)
            node = _spawn(f"supernode-{index}", node_cmd, directory=directory, state=state)
            processes.append((f"supernode-{index}", node))
            state["supernode_pids"].append(node.pid)
            _write_state(directory, state)

        online = None
        while online != num_supernodes:
            _check_alive(processes, directory)
            if time.monotonic() > deadline:
                raise FederationError(
                    f"{online or 0} of {num_supernodes} SuperNodes online after {timeout:.0f}s; "
                    f"see the logs in {directory}"
                )
            time.sleep(0.5)
            online = online_supernodes(cli_home)
    except BaseException:
        stop_federation(directory)
        raise
    (directory / ADDRESS_FILE).write_text(address + "\n")
    return load_federation(directory)


def _check_alive(processes: list[tuple[str, subprocess.Popen]], directory: Path) -> None:
    for name, process in processes:
        if process.poll() is not None:
            raise FederationError(
                f"{name} exited with code {process.returncode}; the end of "
                f"{directory / (name + '.log')}:\n{_log_tail(directory / (name + '.log'))}"
            )


def load_federation(directory: str | os.PathLike[str]) -> Federation:
    """The federation recorded in ``DIR/federation.json``."""
    state = json.loads((Path(directory) / STATE_FILE).read_text())
    return Federation(**{key: state[key] for key in Federation.__dataclass_fields__ if key in state})


def _signal_all(pids: Iterable[int], sig: int, *, groups: bool = False) -> None:
    """Send ``sig`` to each PID (or, with ``groups``, to each process group); gone ones are skipped."""
    send = os.killpg if groups else os.kill
    for pid in pids:
        try:
            send(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_federation(directory: str | os.PathLike[str], *, grace_seconds: float = 10.0) -> list[int]:
    """Stop every process that ``start_federation`` started from ``directory``.

    Sends SIGTERM to each recorded process that is still the one started
    (same PID and start time), to its process group (each runs in its own
    session) and to its descendants (Flower's SuperExec, ServerApp and
    ClientApp processes, some of which start sessions of their own); after
    ``grace_seconds`` SIGKILL to whatever is left. Removes the PID files.

    Returns
    -------
    list[int]
        The PIDs that were signalled.
    """
    directory = Path(directory).resolve()
    path = directory / STATE_FILE
    if not path.exists():
        return []
    state = json.loads(path.read_text())
    roots = _live_pids(directory)
    targets = list(dict.fromkeys([*roots, *_descendants(roots)]))
    groups = [pid for pid in roots if _pgid(pid) == pid]
    _signal_all(groups, signal.SIGTERM, groups=True)
    _signal_all(targets, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        for pid in targets:
            _reap(pid)
        if not any(is_running(pid) for pid in targets):
            break
        time.sleep(0.1)
    else:
        # Children started after the first look are caught here too.
        leftovers = [pid for pid in targets if is_running(pid)]
        leftovers += [pid for pid in _descendants(leftovers) if pid not in leftovers]
        _signal_all(groups, signal.SIGKILL, groups=True)
        _signal_all(leftovers, signal.SIGKILL)
        targets += [pid for pid in leftovers if pid not in targets]
        time.sleep(0.2)
    for pid in targets:
        _reap(pid)
    for pid_file in directory.glob("*.pid"):
        pid_file.unlink()
    state["stopped"] = True
    _write_state(directory, state)
    return targets


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def describe(federation: Federation) -> str:
    """What a user needs to know about a started federation, ending with its address."""
    lines = [f"SuperLink (Control, Fleet and Runtime API): {federation.address}"]
    for index, (pid, port) in enumerate(zip(federation.supernode_pids, federation.supernode_ports)):
        lines.append(f"SuperNode {index}: pid {pid}, ClientAppIo port {port}")
    if federation.root_certificates:
        lines.append(f"CA certificate (mode.root_certificates): {federation.root_certificates}")
    lines += [
        f"logs and PID files: {federation.dir}",
        "run an experiment on it with:",
        f"  python scripts/run.py {' '.join([*federation.mode_overrides(), *federation.secure_overrides()])}",
        federation.address,
    ]
    return "\n".join(lines)


def run_foreground(federation: Federation) -> list[int]:
    """Wait for Ctrl-C, SIGTERM or a federation process that exits, then stop everything.

    Returns
    -------
    list[int]
        The PIDs stopped.
    """
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        while not stopping and all(_same_process(pid, asdict(federation)) for pid in federation.pids):
            time.sleep(1.0)
        if not stopping:
            logger.warning("a federation process exited; stopping the rest")
    except KeyboardInterrupt:
        pass
    return stop_federation(federation.dir)
