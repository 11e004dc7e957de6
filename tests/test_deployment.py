"""Deployment: `mode=deployment` against real SuperLink/SuperNode processes on 127.0.0.1.

The local launcher (fedpriv.federation, behind scripts/federation.py) starts the processes; every test
stops them in a `finally` and checks that none of them (nor anything Flower
spawned under them) is left running. Each message starts a `flwr-clientapp`
process that imports torch, and a SuperNode polls every 3 s, so a round takes
about 10 s here.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import run_project_script, stop_and_assert_gone

from fedpriv import federation
from fedpriv.deployment import DeploymentMode
from scripts import bench


def run_experiment(tmp_path: Path, *overrides: str, name: str = "run") -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / name
    return run_project_script("run.py", f"output_dir={out}", *overrides, cwd=tmp_path, timeout=240), out


def assert_completed_rounds(result: subprocess.CompletedProcess, out: Path, *, rounds: int) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads((out / "results.json").read_text())
    assert [row["round"] for row in document["rounds"]] == list(range(1, rounds + 1))
    assert all(row["num_clients"] == 2 and row["num_rejected"] == 0 for row in document["rounds"])
    assert document["final"]["rounds_completed"] == rounds
    assert document["final"]["stopped_reason"] == "completed"
    assert document["config"]["mode"]["_target_"] == "fedpriv.deployment.DeploymentMode"
    if document["config"]["client"]["_target_"] == "clients.OpacusTraining":
        epsilons = [row["epsilon_record_max"] for row in document["rounds"]]
        assert all(e is not None for e in epsilons) and epsilons == sorted(set(epsilons))


# A private config: record-level DP on the clients, so their accountant state
# must persist across the two rounds in the SuperNodes' processes.
EXPERIMENT = ["num_clients=2", "num_rounds=2", "client=opacus"]


@pytest.mark.slow
def test_two_rounds_on_a_local_insecure_federation_then_a_failing_run(tmp_path):
    # Prepare
    directory = tmp_path / "federation"
    fed = federation.start_federation(directory, 2)
    started = fed.pids
    try:
        assert (directory / "address").read_text().strip() == fed.address
        assert all(federation.is_running(pid) for pid in started)

        # Execute
        result, out = run_experiment(tmp_path, *fed.mode_overrides(), *EXPERIMENT)

        # Assert
        assert_completed_rounds(result, out, rounds=2)

        # Execute: a ServerApp that raises (it waits for a third node that never comes);
        # `flwr run --stream` would exit 0 here, the run's status must not
        failing, _ = run_experiment(
            tmp_path,
            *fed.mode_overrides(),
            *EXPERIMENT,
            "strategy.min_available_nodes=3",
            "strategy.node_wait_seconds=1",
            "mode.stream=false",  # the status is polled instead
            name="failing",
        )

        # Assert
        assert failing.returncode == 3, failing.stdout[-2000:] + failing.stderr[-2000:]
        assert "finished:failed" in failing.stdout + failing.stderr

        # Execute: the benchmark's floor, Flower's FedAvg with an echoing ClientApp, on the same federation
        round_seconds = bench.run_trivial_app(
            fed, shapes=[[3, 2], [2]], rounds=2, fast_polling=True, work_dir=tmp_path / "trivial"
        )

        # Assert
        assert len(round_seconds) == 2 and all(seconds > 0 for seconds in round_seconds)
    finally:
        stop_and_assert_gone(directory, started)


@pytest.mark.slow
def test_two_ckks_rounds_with_a_key_on_each_supernode_and_none_on_the_server(tmp_path):
    # Prepare: the launcher makes the keys: a copy of the secret one per SuperNode
    from fedpriv.he import CKKS

    directory = tmp_path / "federation"
    fed = federation.start_federation(directory, 2, he_keys=CKKS())
    started = fed.pids
    try:
        # Execute
        result, out = run_experiment(
            tmp_path, *fed.mode_overrides(), *fed.secure_overrides(), "num_clients=2", "num_rounds=2",
            "client.local_epochs=1",
        )
        decrypted = run_project_script(
            "decrypt_model.py", str(out), "--key-dir", str(directory / "he-keys" / "supernode-0"), cwd=tmp_path
        )

        # Assert: both rounds trained on both nodes and were evaluated by them; the
        # server's folder holds the public context only, and the model as ciphertexts
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        document = json.loads((out / "results.json").read_text())
        assert [(row["num_clients"], row["num_rejected"]) for row in document["rounds"]] == [(2, 0), (2, 0)]
        assert all(row["test_accuracy"] > 0.3 for row in document["rounds"])
        server_keys = sorted(p.name for p in (directory / "he-keys").iterdir() if p.is_file())
        assert server_keys == ["public-context.tenseal"]
        assert (directory / "he-keys" / "supernode-1" / "secret-context.tenseal").is_file()
        assert decrypted.returncode == 0, decrypted.stderr
        assert (out / "model.pt").is_file() and (out / "model-encrypted.pt").is_file()
    finally:
        stop_and_assert_gone(directory, started)


@pytest.mark.slow
def test_two_rounds_of_quantized_then_topk_updates_on_a_local_federation(tmp_path):
    # Prepare
    directory = tmp_path / "federation"
    fed = federation.start_federation(directory, 2)
    started = fed.pids
    try:
        # Execute: 8-bit quantization, then 10% top-k (its residual kept on the nodes between rounds)
        runs = {
            name: run_experiment(tmp_path, *fed.mode_overrides(), "num_clients=2", "num_rounds=2",
                                 "client.local_epochs=1", *overrides, name=name)
            for name, overrides in {
                "quantize": ["compression=quantize", "compression.bits=8"],
                "topk": ["compression=topk", "compression.fraction=0.1"],
            }.items()
        }

        # Assert: every reply decoded, and each far smaller than the 38 KB float32 model
        for name, (result, out) in runs.items():
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            rows = json.loads((out / "results.json").read_text())["rounds"]
            assert [(row["num_clients"], row["num_rejected"]) for row in rows] == [(2, 0), (2, 0)], name
            assert all(row["bytes_up"] / 2 < 0.3 * 4 * 9610 for row in rows), name
    finally:
        stop_and_assert_gone(directory, started)


@pytest.mark.slow
def test_one_round_over_tls_with_supernode_authentication_then_a_resumed_second(tmp_path):
    # Prepare
    directory = tmp_path / "federation"
    fed = federation.start_federation(directory, 2, tls=True, auth=True)
    started = fed.pids
    try:
        assert not fed.insecure and Path(fed.root_certificates).is_file()
        assert fed.auth and sorted(p.name for p in (directory / "keys").glob("*.pub")) == [
            "supernode-0.pub",
            "supernode-1.pub",
        ]

        # Execute
        result, out = run_experiment(tmp_path, *fed.mode_overrides(), *EXPERIMENT, "num_rounds=1")

        # Assert
        assert f"mode.root_certificates={fed.root_certificates}" in fed.mode_overrides()
        assert_completed_rounds(result, out, rounds=1)

        # Execute: a new ServerApp goes on from the checkpoint for a second round
        resumed, _ = run_experiment(tmp_path, *fed.mode_overrides(), *EXPERIMENT, f"resume={out}")

        # Assert: each SuperNode kept its ledger on its own disk, so epsilon went on growing
        assert_completed_rounds(resumed, out, rounds=2)
        ledger_id = torch.load(out / "checkpoint.pt", weights_only=True)["ledger_id"]
        ledgers = sorted(directory.glob(f"ledgers/supernode-*/{ledger_id}/partition-*.json"))
        assert [p.relative_to(directory / "ledgers").parts[0] for p in ledgers] == ["supernode-0", "supernode-1"]
        assert not (out / "client-state").exists()
    finally:
        stop_and_assert_gone(directory, started)


def test_an_unreachable_superlink_fails_the_run(tmp_path):
    # Prepare: a port nobody listens on
    (port,) = federation._free_ports(1)
    mode = DeploymentMode(address=f"127.0.0.1:{port}", insecure=True)

    # Execute / Assert
    with pytest.raises(RuntimeError, match="could not start the run"):
        mode.run(run_config={"num-clients": 2, "num-rounds": 1}, num_supernodes=2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"address": "nohost"}, "mode.address='nohost'"),
        ({"address": "127.0.0.1:70000", "insecure": True}, "port must be in 1..65535"),
        ({"address": "127.0.0.1:9093"}, "mode.root_certificates=null"),
        ({"address": "127.0.0.1:9093", "insecure": True, "root_certificates": "/ca.crt"}, "exactly one"),
        ({"address": "127.0.0.1:9093", "root_certificates": "/no/such/ca.crt"}, "file not found"),
        ({"address": "127.0.0.1:9093", "insecure": True, "timeout_seconds": 0}, "mode.timeout_seconds=0"),
    ],
)
def test_bad_mode_settings_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        DeploymentMode(**overrides)


def test_the_cli_connection_is_written_for_flower(tmp_path):
    # Prepare
    ca = tmp_path / "ca.crt"
    ca.write_text("not checked here")

    # Execute
    secure = tomllib.loads(
        DeploymentMode(address="[::1]:9093", root_certificates=str(ca)).write_flwr_config(tmp_path / "a").read_text()
    )
    insecure = tomllib.loads(
        DeploymentMode(address="localhost:9093", insecure=True).write_flwr_config(tmp_path / "b").read_text()
    )

    # Assert
    assert secure["superlink"]["default"] == "fedpriv"
    assert secure["superlink"]["fedpriv"] == {"address": "[::1]:9093", "root-certificates": str(ca.resolve())}
    assert insecure["superlink"]["fedpriv"] == {"address": "localhost:9093", "insecure": True}


def test_start_refuses_auth_without_tls_and_no_supernodes(tmp_path):
    with pytest.raises(federation.FederationError, match="needs TLS"):
        federation.start_federation(tmp_path, 1, auth=True)
    with pytest.raises(federation.FederationError, match="num_supernodes=0"):
        federation.start_federation(tmp_path, 0)


@pytest.mark.parametrize(
    ("address", "local"),
    [("127.0.0.1:9093", True), ("localhost:9093", True), ("[::1]:9093", True), ("10.0.0.5:9093", False),
     ("superlink.example.org:9093", False)],
)
def test_results_are_local_only_with_a_loopback_superlink(address, local):
    assert DeploymentMode(address=address, insecure=True).results_local is local
