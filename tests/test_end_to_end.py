"""End to end through the real Flower simulation runtime (Ray), via scripts/run.py."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import matplotlib.image
import pytest
import torch

from conftest import operator_records, run_project_script

from fedpriv.compose import compose_config
from fedpriv.experiment import client_examples, load_experiment
from fedpriv.publication import OPERATOR_FILE
from fedpriv.results import ROUND_FIELDS



def run(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "run"
    result = run_project_script("run.py", f"output_dir={out}", *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, out


def test_simulation_writes_the_results_contract_and_rejects_malformed_replies(tmp_path):
    # Prepare: some clients reply with NaN weights; the run must go on without them
    from faulty_training import is_victim

    overrides = ["num_clients=4", "num_rounds=2", "client.local_epochs=1", "client._target_=faulty_training.NaNTraining"]
    experiment = load_experiment(compose_config(overrides))
    victims = sum(
        is_victim(client_examples(experiment, partition_id=i, num_partitions=4)[1]) for i in range(4)
    )
    assert 0 < victims < 4, "pick a seed with some victims and some honest clients"

    # Execute
    result, out = run(tmp_path, *overrides)

    # Assert: results.json, field by field
    document = json.loads((out / "results.json").read_text())
    assert document["schema"] == 1
    expected_config = compose_config(overrides)
    expected_config["output_dir"] = str(out)
    assert document["config"] == expected_config
    rounds = document["rounds"]
    assert [row["round"] for row in rounds] == [1, 2]
    for row in rounds:
        assert set(ROUND_FIELDS) <= set(row)
        assert row["seconds"] > 0
        assert row["num_clients"] == 4 - victims
        assert row["num_rejected"] == victims
        assert row["train_loss"] > 0
        assert row["test_loss"] > 0
        assert 0.0 <= row["test_accuracy"] <= 1.0
        for field in ("epsilon_user", "epsilon_record_max", "clipping_norm", "noise_std"):
            assert row[field] is None
    assert rounds[1]["test_loss"] < rounds[0]["test_loss"]
    final = document["final"]
    assert final["rounds_completed"] == 2
    assert final["stopped_reason"] == "completed"
    assert final["test_accuracy"] == rounds[-1]["test_accuracy"]
    assert final["test_loss"] == rounds[-1]["test_loss"]
    assert final["test_accuracy"] > 0.3
    for field in ("epsilon_user", "delta_user", "epsilon_record_max", "delta_record"):
        assert final[field] is None
    assert document["timing"]["total_seconds"] > 0
    assert document["privacy"] == {
        "client_level": False, "record_level": False, "local": False, "secure_aggregation": "none",
        "distributed_noise": None, "seeded_noise": False, "guarantee_void": False
    }
    assert not (out / OPERATOR_FILE).exists()

    # Assert: the other artefacts
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert float(rows[1]["test_accuracy"]) == rounds[1]["test_accuracy"]
    for name in ("accuracy.png", "loss.png", "communication.png"):
        assert matplotlib.image.imread(out / name).ndim == 3
    # Assert: bytes on the wire, per round and in total: 4 float32 models down, 4 up
    # (the malformed replies are models too), plus Flower's framing
    model_bytes = 4 * sum(value.numel() for value in torch.load(out / "model.pt").values())
    assert all(4 * model_bytes < row[key] < 4 * model_bytes * 1.1 for row in rounds for key in ("bytes_down", "bytes_up"))
    assert final["bytes_down_total"] == sum(row["bytes_down"] for row in rounds)
    assert final["bytes_up_total"] == sum(row["bytes_up"] for row in rounds)
    assert not (out / "epsilon.png").exists()
    model = load_experiment(expected_config).build_model()
    model.load_state_dict(torch.load(out / "model.pt"))
    assert torch.load(out / "checkpoint.pt")["round"] == 2

    # Assert: a quiet console, one line per round (not twice: Hydra's root
    # handler and flwr's own); Flower's detail is in the run's log file
    output = result.stdout + result.stderr
    assert output.count("round 2/2: test accuracy") == 1 and " MB down, " in output
    assert "[ROUND 2/2]" not in output and "alembic" not in output
    assert (out / "fedpriv.log").read_text().count("[ROUND 2/2]") == 1


def test_server_budget_stops_the_run_cleanly_with_the_model_saved(tmp_path):
    # Prepare: z = 1 and q = 1 spend epsilon 4.39, 6.58, 8.40 in rounds 1, 2, 3
    overrides = [
        "num_clients=3", "num_rounds=5", "client.local_epochs=1",
        "strategy=dp_fixed", "strategy.max_epsilon=7.0", "strategy.noise_multiplier=1.0",
    ]

    # Execute
    _, out = run(tmp_path, *overrides)

    # Assert
    document = json.loads((out / "results.json").read_text())
    final = document["final"]
    assert final["stopped_reason"] == "privacy_budget_exhausted"
    assert "strategy.max_epsilon=7" in final["stopped_detail"]
    assert final["rounds_completed"] == 2
    epsilons = [row["epsilon_user"] for row in document["rounds"]]
    assert epsilons[0] < epsilons[1] <= 7.0
    assert final["epsilon_user"] == epsilons[-1]
    assert final["delta_user"] == 1e-5
    assert all(row["clipping_norm"] == 1.0 and row["noise_std"] > 0 for row in document["rounds"])
    assert (out / "model.pt").exists()
    assert matplotlib.image.imread(out / "epsilon.png").ndim == 3

    # Assert: published means private. No exact client statistic or timing in
    # results.json or metrics.csv; the operator file has them and says what it is.
    assert document["privacy"]["client_level"] is True
    published = {
        "round", "test_loss", "test_accuracy", "epsilon_user", "clipping_norm", "noise_std", "server_update_norm"
    }
    for row in document["rounds"]:
        assert {key for key, value in row.items() if value is not None} == published
    assert document["timing"]["total_seconds"] is None
    with (out / "metrics.csv").open() as handle:
        assert {key for row in csv.DictReader(handle) for key, value in row.items() if value} == published
    warning, records = operator_records(out)
    assert "NOT COVERED BY THE REPORTED EPSILON" in warning and "Do not share" in warning
    exact = [r for r in records if "round" in r]
    assert [r["num_clients"] for r in exact] == [3, 3]
    assert all(r["train_loss"] > 0 and r["seconds"] > 0 and "clip_fraction" in r for r in exact)
    assert records[-1]["final"]["total_seconds"] > 0


def test_both_dp_layers_report_and_client_budgets_stop_the_run(tmp_path):
    # Prepare: 3 IID clients of about 479 examples, batch 32: each releases a
    # noisy size and trains K = ceil(n~ / 32) steps per round at rate 1 / K.
    # The record-level budget allows two rounds whatever K a client gets.
    from fedpriv.privacy import compute_epsilon

    base = ["num_clients=3", "num_rounds=4", "strategy=dp_fixed", "client=opacus"]
    experiment = load_experiment(compose_config(base))
    client = experiment.client
    sizes = [len(client_examples(experiment, partition_id=i, num_partitions=3)[1]) for i in range(3)]
    spread = 6 * client.count_noise_multiplier
    ks = {client.sampling_for(n + d)[1] for n in sizes for d in (-spread, spread)} | {
        client.sampling_for(n)[1] for n in sizes
    }
    count_release = (client.count_noise_multiplier, 1.0, 1)

    def after(rounds: int, k: int) -> float:
        return compute_epsilon([count_release, (client.noise_multiplier, 1 / k, rounds * k)], delta=1e-5)

    budget = (max(after(2, k) for k in ks) + min(after(3, k) for k in ks)) / 2
    assert max(after(2, k) for k in ks) < budget < min(after(3, k) for k in ks)

    # Execute
    _, out = run(tmp_path, *base, f"client.max_epsilon={budget}")

    # Assert: published rows hold client-level DP outputs only
    document = json.loads((out / "results.json").read_text())
    rounds = document["rounds"]
    assert document["privacy"]["client_level"] and document["privacy"]["record_level"]
    assert all(row["epsilon_record_max"] is None and row["num_clients"] is None for row in rounds)
    assert rounds[0]["epsilon_user"] < rounds[1]["epsilon_user"] < rounds[2]["epsilon_user"]
    final = document["final"]
    assert final["stopped_reason"] == "privacy_budget_exhausted"
    assert final["rounds_completed"] == 3
    assert final["epsilon_record_max"] is None and final["delta_record"] is None
    assert final["epsilon_user"] == rounds[2]["epsilon_user"]
    assert final["delta_user"] == 1e-5
    assert (out / "model.pt").exists()

    # Assert: the operator sees the declines and the exact record-level epsilons
    _, records = operator_records(out)
    exact = [r for r in records if "round" in r]
    assert [r["num_clients"] for r in exact] == [3, 3, 0]
    assert [r["num_declined"] for r in exact] == [0, 0, 3]
    assert min(after(1, k) for k in ks) <= exact[0]["epsilon_record_max"] <= max(after(1, k) for k in ks)
    assert exact[2]["epsilon_record_max"] == exact[1]["epsilon_record_max"] <= budget
    assert records[-1]["final"]["epsilon_record_max"] == exact[1]["epsilon_record_max"]
    assert records[-1]["final"]["delta_record"] == 1e-5


def test_a_diverging_run_stops_with_its_last_finite_model_and_a_non_zero_exit(tmp_path):
    # Prepare: every client replies with weights whose loss is not finite
    out = tmp_path / "run"
    overrides = ["num_clients=2", "num_rounds=5", "client._target_=faulty_training.ExplodingTraining"]

    # Execute
    result = run_project_script("run.py", f"output_dir={out}", *overrides, cwd=tmp_path)

    # Assert
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    document = json.loads((out / "results.json").read_text())
    assert document["final"]["stopped_reason"] == "diverged"
    assert document["final"]["rounds_completed"] == 3
    assert [row["diverged"] for row in document["rounds"]] == [1, 1, 1]
    initial = document["rounds"][0]["test_loss"]
    assert all(row["test_loss"] == initial for row in document["rounds"])  # the model never changed
    model = torch.load(out / "model.pt")
    assert all(torch.isfinite(value).all() for value in model.values())


def test_a_config_that_cannot_run_is_refused_before_anything_starts(tmp_path):
    # Prepare: an output folder below a file
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    # Execute
    result = run_project_script("run.py", f"output_dir={blocker}/run", cwd=tmp_path, timeout=120)

    # Assert
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"config error: output_dir='{blocker}/run': {blocker} is a file, not a folder"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_local_dp_run_on_four_hospitals_reports_its_epsilon_and_auc_and_stops_when_every_client_declines(tmp_path):
    # Prepare: one client per hospital; epsilon 1 a round under a budget of 2.5:
    # two rounds, then every client declines
    from fedpriv.privacy.laplace_accounting import laplace_epsilon

    overrides = [
        "client=local_dp", "dataset=heart_disease", "partition=natural", "num_clients=4", "num_rounds=4",
        "client.epsilon_per_round=1.0", "client.max_epsilon=2.5",
    ]
    after = [laplace_epsilon([(1.0, 1.0, k)], delta=1e-5) for k in (1, 2)]

    # Execute
    result, out = run(tmp_path, *overrides)

    # Assert: the local epsilon grows with every round a client released in, by both bounds
    document = json.loads((out / "results.json").read_text())
    assert document["privacy"]["local"] and not document["privacy"]["record_level"]
    rounds = document["rounds"]
    assert [row["epsilon_local_max"] for row in rounds] == pytest.approx([after[0], after[1], after[1]])
    assert [row["epsilon_local_basic_max"] for row in rounds] == [1.0, 2.0, 2.0]
    assert [row["num_clients"] for row in rounds] == [4, 4, 0]
    assert [row["num_declined"] for row in rounds] == [0, 0, 4]
    assert all(0 <= row["test_auc"] <= 1 and 0 <= row["test_balanced_accuracy"] <= 1 for row in rounds)
    assert all(row["train_loss"] is None for row in rounds)  # a local-DP reply carries no loss
    final = document["final"]
    assert final["stopped_reason"] == "privacy_budget_exhausted"
    assert final["epsilon_local_max"] == pytest.approx(after[1])
    assert (final["delta_local"], final["epsilon_local_basic_max"]) == (1e-5, 2.0)
    assert matplotlib.image.imread(out / "epsilon.png").ndim == 3
    # Assert: the console shows both bounds every round and at the end
    output = result.stdout + result.stderr
    assert "round 2/4: test accuracy" in output and "epsilon_local_max 2, epsilon_local_basic_max 2 |" in output
    assert "epsilon_local_max 2 (delta 1e-05), epsilon_local_basic_max 2 (delta 0)" in output


@pytest.mark.parametrize("strategy", ["fedavg", "dp_fixed"])
def test_fedprox_clients_and_a_server_adam_on_label_skewed_clients(tmp_path, strategy):
    # Prepare: the README's command, short; DP-FedAdam's epsilon is DP-FedAvg's (z = 1, q = 1, 2 rounds)
    from fedpriv.privacy import compute_epsilon

    overrides = [
        "client.proximal_mu=0.1", "strategy.server_optimizer=adam", "partition=dirichlet", "partition.alpha=0.1",
        f"strategy={strategy}", "num_rounds=2", "client.local_epochs=1",
    ]

    # Execute
    _, out = run(tmp_path, *overrides)

    # Assert
    document = json.loads((out / "results.json").read_text())
    assert document["final"]["rounds_completed"] == 2
    assert document["config"]["client"]["proximal_mu"] == 0.1
    assert document["config"]["strategy"]["server_optimizer"] == "adam"
    rounds = document["rounds"]
    assert all(row["server_update_norm"] > 0 for row in rounds)
    if strategy == "dp_fixed":
        expected = compute_epsilon([(1.0, 1.0, 2)], delta=1e-5, accountant="prv")
        assert document["final"]["epsilon_user"] == pytest.approx(expected)
        assert rounds[0]["num_clients"] is None  # withheld, as under DP-FedAvg
    else:
        assert rounds[-1]["test_accuracy"] > 0.3
