"""End to end through the real Flower simulation runtime (Ray), via scripts/run.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

from fedpriv.compose import compose_config
from fedpriv.experiment import client_examples, load_experiment
from fedpriv.results import ROUND_FIELDS

REPO = Path(__file__).resolve().parents[1]


def run(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "run.py"), f"output_dir={out}", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, out


def test_simulation_writes_the_results_contract(tmp_path):
    # Prepare
    overrides = ["num_clients=3", "num_rounds=2", "client.local_epochs=1"]

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
        assert row["num_clients"] == 3
        assert row["num_rejected"] == 0
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
    for field in ("epsilon_user", "delta_user", "epsilon_record_max", "delta_record"):
        assert final[field] is None
    assert document["timing"]["total_seconds"] > 0

    # Assert: the other artefacts
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert float(rows[1]["test_accuracy"]) == rounds[1]["test_accuracy"]
    for name in ("accuracy.png", "loss.png"):
        assert matplotlib.image.imread(out / name).ndim == 3
    assert not (out / "epsilon.png").exists()
    experiment = load_experiment(expected_config)
    model = experiment.build_model()
    model.load_state_dict(torch.load(out / "model.pt"))
    assert torch.load(out / "checkpoint.pt")["round"] == 2

    # Assert: flwr lines are not printed twice (Hydra's root handler and flwr's own)
    output = result.stdout + result.stderr
    assert output.count("[ROUND 2/2]") == 1


def test_malformed_replies_are_rejected_and_the_run_goes_on(tmp_path):
    # Prepare
    from faulty_training import is_victim

    overrides = ["num_clients=4", "num_rounds=2", "client.local_epochs=1", "client._target_=faulty_training.NaNTraining"]
    experiment = load_experiment(compose_config(overrides))
    victims = sum(
        is_victim(client_examples(experiment, partition_id=i, num_partitions=4)[1]) for i in range(4)
    )
    assert 0 < victims < 4, "pick a seed with some victims and some honest clients"

    # Execute
    _, out = run(tmp_path, *overrides)

    # Assert
    document = json.loads((out / "results.json").read_text())
    assert [row["num_rejected"] for row in document["rounds"]] == [victims, victims]
    assert [row["num_clients"] for row in document["rounds"]] == [4 - victims] * 2
    assert document["final"]["stopped_reason"] == "completed"
    assert document["final"]["test_accuracy"] > 0.3


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


def test_both_dp_layers_report_and_client_budgets_stop_the_run(tmp_path):
    # Prepare: 3 IID clients whose sizes give the same sampling and delta; the
    # record-level budget allows two rounds
    from fedpriv.privacy import compute_epsilon

    base = ["num_clients=3", "num_rounds=4", "strategy=dp_fixed", "client=opacus"]
    experiment = load_experiment(compose_config(base))
    client = experiment.client
    sizes = [len(client_examples(experiment, partition_id=i, num_partitions=3)[1]) for i in range(3)]
    settings = {(client.sampling_for(n), client.target_delta_for(n)) for n in sizes}
    assert len(settings) == 1
    ((sample_rate, steps), delta), = settings
    sigma = client.noise_multiplier
    after = {r: compute_epsilon([(sigma, sample_rate, r * steps)], delta=delta) for r in (1, 2, 3)}
    budget = (after[2] + after[3]) / 2

    # Execute
    _, out = run(tmp_path, *base, f"client.max_epsilon={budget}")

    # Assert
    document = json.loads((out / "results.json").read_text())
    rounds = document["rounds"]
    assert [row["num_clients"] for row in rounds] == [3, 3, 0]
    assert [row["num_declined"] for row in rounds] == [0, 0, 3]
    assert rounds[0]["epsilon_record_max"] == pytest.approx(after[1], rel=1e-6)
    assert rounds[1]["epsilon_record_max"] == pytest.approx(after[2], rel=1e-6)
    assert rounds[2]["epsilon_record_max"] == rounds[1]["epsilon_record_max"] <= budget
    assert all(row["epsilon_user"] is not None for row in rounds)
    assert rounds[0]["epsilon_user"] < rounds[1]["epsilon_user"] < rounds[2]["epsilon_user"]
    final = document["final"]
    assert final["stopped_reason"] == "privacy_budget_exhausted"
    assert final["rounds_completed"] == 3
    assert final["epsilon_record_max"] == rounds[1]["epsilon_record_max"]
    assert final["delta_record"] == delta
    assert final["epsilon_user"] == rounds[2]["epsilon_user"]
    assert final["delta_user"] == 1e-5
    assert (out / "model.pt").exists()
