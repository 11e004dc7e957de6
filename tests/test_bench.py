"""The benchmark harness (scripts/bench.py) in its smallest setting, so it cannot rot.

No timing is asserted: only that every figure is produced and well formed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedpriv.compose import compose_config
from fedpriv.experiment import client_examples, load_experiment
from fedpriv.datasets import Synthetic
from fedpriv.run_config import flatten
from scripts import bench, bench_apps

REPO = Path(__file__).resolve().parents[1]
# A child interpreter in which Flower, Ray, Hydra and dp-accounting cannot be
# imported, as on a GPU machine with only torch, Opacus and NumPy.
WITHOUT_FLOWER_AND_RAY = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("flwr", "ray", "hydra", "omegaconf", "dp_accounting"):
                raise ImportError(f"{name} is not installed here")
            return None

    sys.meta_path.insert(0, Blocked())
    """
)


def test_smoke_run_writes_every_section(tmp_path):
    # Prepare
    out = tmp_path / "bench.json"

    # Execute
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )

    # Assert
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["mode"] == "smoke"
    assert document["machine"]["cpu_cores"] >= 1
    overhead = document["overhead"]
    assert overhead["wall_ratio"] > 0
    assert len(overhead["federation_round_seconds"]) == len(overhead["floor_round_seconds"]) == 1
    steps = document["dp_step"]["steps"]
    assert {(row["model"], row["mode"]) for row in steps} == {
        (model, mode) for model in bench.STEP_MODELS for mode in bench.STEP_MODES
    }
    assert all(row["ratio"] > 0 for row in document["dp_step"]["rounds"])
    accounting = document["accounting"]
    for name in ("client_dp_sgd", "server_dp_fedavg"):
        assert accounting[name]["fedpriv_epsilon"] > 0
        assert accounting[name]["pld_epsilon"] > 0
    assert accounting["against_flower"]["flower_epsilon"] > accounting["against_flower"]["fedpriv_epsilon_user"]
    local = accounting["local_dp_against_flower"]["50_rounds"]
    assert local["flower_true_epsilon"] > local["flower_reported_epsilon"] == 1.0
    assert local["fedpriv_pld_epsilon"] < local["fedpriv_basic_epsilon"] == 50.0
    assert document["memory"]["2 clients, section 1"]["peak_pss_mib"] > 0
    assert "| 1 overhead: wall time / compute floor |" in result.stdout


def test_peak_memory_counts_grandchildren(tmp_path):
    # Prepare: a child whose own child holds 200 MiB for a moment
    grandchild = "import time; block = bytearray(200 * 2**20); time.sleep(1.5)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"

    # Execute
    process = subprocess.Popen([sys.executable, "-c", child])
    with bench.PeakMemory(process.pid, interval=0.05) as memory:
        process.wait()

    # Assert
    assert memory.peak_pss_mib > 200
    assert memory.peak_rss_mib >= memory.peak_pss_mib


def test_compute_floor_trains_and_evaluates_every_round_alike_in_one_process_or_two_workers():
    # Prepare
    overrides = ["num_clients=3", "num_rounds=2", "client.local_epochs=1"]

    # Execute
    alone = bench.compute_floor(overrides)
    parallel = bench.compute_floor(overrides, workers=2)

    # Assert
    assert len(alone["round_seconds"]) == len(parallel["round_seconds"]) == 2
    assert alone["setup_seconds"] > 0 and parallel["workers"] == 2
    assert 0.0 <= alone["test_accuracy"] <= 1.0
    assert parallel["test_accuracy"] == alone["test_accuracy"]


def test_the_floor_trains_as_many_clients_at_once_as_the_simulation():
    # Execute / Assert
    cores = os.cpu_count() or 1
    assert bench.simulation_workers(["mode.client_num_cpus=1"]) == max(1, cores)
    assert bench.simulation_workers([f"mode.client_num_cpus={cores}"]) == 1
    with pytest.raises(ValueError, match=rf"^mode.client_num_cpus={cores * 2}.0: more than this machine's {cores} cores"):
        bench.simulation_workers([f"mode.client_num_cpus={cores * 2}"])


# Flower's example makes an engine without secure_mode and trains a first layer
# whose input needs no grad; Opacus warns about both, as expected.
@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")
def test_flower_example_client_reports_only_the_current_round():
    # Prepare: the same node trains twice with the same state
    overrides = ["num_clients=3", "client=opacus", "client.local_epochs=1"]
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config=flatten(compose_config(overrides)),
    )
    model = load_experiment(compose_config(overrides)).build_model()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})})

    # Execute
    first, second = (
        bench_apps.train(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1), context)
        for _ in range(2)
    )

    # Assert: a fresh PrivacyEngine every round, so the epsilon never grows
    epsilons = [reply.content["metrics"]["epsilon"] for reply in (first, second)]
    assert epsilons[0] > 0
    assert epsilons[1] == epsilons[0]
    assert list(first.content["arrays"].keys()) == list(model.state_dict().keys())


def test_scale_overrides_give_every_client_data():
    # Prepare
    overrides = bench.scale_overrides(100, rounds=2)

    # Execute
    experiment = load_experiment(compose_config(overrides))
    sizes = [
        len(client_examples(experiment, partition_id=i, num_partitions=100)[1]) for i in (0, 99)
    ]

    # Assert
    assert isinstance(experiment.dataset, Synthetic)
    assert min(sizes) >= 2
    assert experiment.strategy_config["fraction_train"] * 100 == bench.SAMPLED_PER_ROUND


def test_dp_step_section_runs_without_flower_and_ray(tmp_path):
    # Prepare: scripts/bench.py --smoke --only dp_step, with flwr, ray and the rest unimportable
    out = tmp_path / "bench.json"
    script = WITHOUT_FLOWER_AND_RAY + textwrap.dedent(
        f"""
        import runpy
        sys.argv = ["bench.py", "--smoke", "--only", "dp_step", "--device", "cpu", "--out", {str(out)!r}]
        try:
            runpy.run_path({str(REPO / "scripts" / "bench.py")!r}, run_name="__main__")
        finally:
            loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("flwr", "ray", "hydra", "dp_accounting"))
            print("loaded:", loaded)
        """
    )

    # Execute
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )

    # Assert
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "loaded: []" in result.stdout
    document = json.loads(out.read_text())
    assert document["machine"]["flwr"] is None
    assert document["machine"]["device"] == document["dp_step"]["device"] == "cpu"
    steps = document["dp_step"]["steps"]
    assert {(row["model"], row["mode"], row["batch_size"]) for row in steps} == {
        (model, mode, 64) for model in bench.STEP_MODELS for mode in bench.STEP_MODES
    }
    assert all(row["ratio"] > 0 for row in steps + document["dp_step"]["rounds"])


def test_poisoning_clients_send_minus_ten_times_their_update_and_the_others_train_as_usual():
    # Prepare: plain training is seeded, so fedpriv's own reply is the honest one
    from clients import client_app

    overrides = ["num_clients=10", "client.local_epochs=1"]
    model = load_experiment(compose_config(overrides)).build_model()
    sent = ArrayRecord(model.state_dict())

    def replies(partition_id: int):
        context = Context(run_id=1, node_id=1, node_config={"partition-id": partition_id, "num-partitions": 10},
                          state=RecordDict(), run_config=flatten(compose_config(overrides)))
        content = RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1})})
        return [app(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1), context)
                for app in (client_app.train, bench_apps.poisoned_train)]

    # Execute
    (honest_0, poisoned_0), (honest_5, kept_5) = replies(0), replies(5)

    # Assert
    for name in sent:
        received = sent[name].numpy()
        update = honest_0.content["arrays"][name].numpy() - received
        np.testing.assert_allclose(poisoned_0.content["arrays"][name].numpy(), received - 10 * update, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(kept_5.content["arrays"][name].numpy(), honest_5.content["arrays"][name].numpy())
    assert poisoned_0.content["metrics"]["num-examples"] == honest_0.content["metrics"]["num-examples"]


def test_every_heterogeneity_run_is_a_valid_config(tmp_path):
    # Prepare
    from fedpriv.experiment import build_run_components

    datasets = bench.heterogeneity_datasets(bench.workload_overrides(None))
    configs = [
        [*spec["overrides"], "num_rounds=2", *dp, *extra]
        for spec in datasets.values()
        for extra in bench.HETEROGENEITY_METHODS.values()
        for dp in ([], bench.HETEROGENEITY_DP)
    ]
    configs += [["num_clients=10", *bench.POISONING_TRAINING, *extra] for extra, _ in bench.POISONING_RUNS.values()]

    # Execute / Assert: each builds, strategy included
    for overrides in configs:
        config = compose_config(overrides)
        build_run_components(load_experiment(config), mode_config=config["mode"])

    # Execute: the plot from made-up rows
    runs = {method: {privacy: {"per_round": [0.5, 0.6], "final": 0.6, "epsilon_user": 4.4}
                     for privacy in ("no_dp", "dp")} for method in bench.HETEROGENEITY_METHODS}
    bench._plot_heterogeneity({"heart disease": {"metric": "test_auc", "runs": runs}}, path=tmp_path / "plot.png")

    # Assert
    assert (tmp_path / "plot.png").stat().st_size > 0
