"""Resuming a run from its checkpoint: model, rounds, server and client privacy ledgers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FakeGrid, arrays_record, noisy_round, operator_records, reply, run_project_script
from flwr.app import ConfigRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.node_state import node_state_path, restore_node_state, save_node_state
from fedpriv.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    check_resumable,
    config_differences,
    load_checkpoint,
    save_checkpoint,
)
from fedpriv.compose import compose_config
from fedpriv.experiment import load_experiment
from fedpriv.privacy import compute_epsilon
from fedpriv.protocol import ROUND_KEY
from fedpriv.run_config import ConfigError
from strategies import AdaptiveDPFedAvg, WeightedFedAvg

SHAPES = {"w": (4, 3), "b": (3,)}
GLOBAL = {name: np.zeros(shape, dtype=np.float32) for name, shape in SHAPES.items()}
NODES = range(1, 11)


def play_round(strategy, server_round: int, *, rng: np.random.Generator):
    """One round on a fake grid: every sampled node replies with a random model."""
    messages = list(strategy.configure_train(server_round, arrays_record(GLOBAL), ConfigRecord(), FakeGrid(NODES)))
    replies = [
        reply(
            msg.metadata.dst_node_id,
            {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()},
            {"num-examples": 50, "train_loss": 1.0},
        )
        for msg in messages
    ]
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return messages, arrays, metrics


def adaptive(**overrides) -> AdaptiveDPFedAvg:
    return AdaptiveDPFedAvg(
        **{
            "num_clients": 10,
            "sample_rate": 0.5,
            "noise_multiplier": 1.0,
            "clipping_norm": 1.0,
            "sampling_seed": 3,
            "noise_seed": 4,
        }
        | overrides
    )


def test_a_restored_strategy_continues_exactly_like_an_uninterrupted_one():
    # Prepare: one strategy runs 5 rounds; another runs 3, is checkpointed, and a third resumes it
    uninterrupted, interrupted = adaptive(), adaptive()
    for server_round in range(1, 4):
        play_round(uninterrupted, server_round, rng=np.random.default_rng(server_round))
        play_round(interrupted, server_round, rng=np.random.default_rng(server_round))
    state = interrupted.resume_state()
    resumed = adaptive()

    # Execute: Flower's loop counts from 1 again in the resumed process
    resumed.restore(state, completed_rounds=3)
    resumed_rounds = [play_round(resumed, r, rng=np.random.default_rng(r + 3)) for r in (1, 2)]
    uninterrupted_rounds = [play_round(uninterrupted, r, rng=np.random.default_rng(r)) for r in (4, 5)]

    # Assert: same nodes, round keys, models, clipping norms and epsilon
    for (msgs_a, arrays_a, metrics_a), (msgs_b, arrays_b, metrics_b) in zip(
        resumed_rounds, uninterrupted_rounds, strict=True
    ):
        assert [m.metadata.dst_node_id for m in msgs_a] == [m.metadata.dst_node_id for m in msgs_b]
        assert [m.content["config"][ROUND_KEY] for m in msgs_a] == [m.content["config"][ROUND_KEY] for m in msgs_b]
        for name in SHAPES:
            np.testing.assert_array_equal(arrays_a[name].numpy(), arrays_b[name].numpy())
        assert metrics_a["clipping_norm"] == metrics_b["clipping_norm"]
        assert metrics_a["epsilon_user"] == metrics_b["epsilon_user"]
    assert resumed.history == uninterrupted.history
    assert resumed.epsilon_user == pytest.approx(compute_epsilon([(1.0, 0.5, 5)], delta=1e-5, accountant="prv"))


def chained_rounds(strategy, flower_rounds, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rounds that each start from the model the last one made; replies drawn per run round."""
    for flower_round in flower_rounds:
        model = noisy_round(strategy, flower_round, model, rng=np.random.default_rng(strategy.run_round(flower_round)))
    return model


@pytest.mark.parametrize(
    "settings",
    [
        {"server_optimizer": "adam"},
        {"server_optimizer": "sgd", "server_lr": 0.7, "server_momentum": 0.9},
        {"server_optimizer": "yogi", "strategy": "dp", "noise_multiplier": 0.5},
    ],
    ids=["adam", "fedavgm", "dp-fedyogi"],
)
def test_the_server_optimizers_state_survives_a_checkpoint_bit_for_bit(tmp_path, settings):
    # Prepare: 5 rounds in one go; 3 rounds, a checkpoint on disk, and 2 more in a new strategy
    settings = dict(settings)
    dp = settings.pop("strategy", None) == "dp"

    def build():
        if dp:
            return adaptive(**settings)
        return WeightedFedAvg(**settings)

    uninterrupted, interrupted = build(), build()
    expected = chained_rounds(uninterrupted, range(1, 6), GLOBAL)
    model = chained_rounds(interrupted, range(1, 4), GLOBAL)
    save_checkpoint(
        tmp_path / CHECKPOINT_NAME,
        Checkpoint(
            round=3,
            state_dict={name: torch.from_numpy(value) for name, value in model.items()},
            strategy_state=interrupted.resume_state(),
        ),
    )

    # Execute
    stored = load_checkpoint(tmp_path)
    resumed = build()
    resumed.restore(stored.strategy_state, completed_rounds=stored.round)
    final = chained_rounds(resumed, (1, 2), {name: value.numpy() for name, value in stored.state_dict.items()})

    # Assert: the same models and the same optimizer state, bit for bit
    for name in SHAPES:
        np.testing.assert_array_equal(final[name], expected[name])
    pairs = [*zip(resumed.optimizer_state.m, uninterrupted.optimizer_state.m, strict=True),
             *zip(resumed.optimizer_state.v, uninterrupted.optimizer_state.v, strict=True)]
    assert pairs
    for ours, theirs in pairs:
        np.testing.assert_array_equal(ours, theirs)


def test_unseeded_generators_stay_out_of_the_checkpoint():
    # Prepare
    strategy = adaptive(sampling_seed=None, noise_seed=None)
    play_round(strategy, 1, rng=np.random.default_rng(0))

    # Execute
    state = strategy.resume_state()

    # Assert: an OS-seeded generator's state on disk would let a reader recompute later noise
    assert state["rng_states"] == {}
    assert state["history"]["steps"] == [1]


def test_a_dp_strategy_refuses_a_state_without_accountant_history():
    # Prepare: the state of a non-private run
    state = WeightedFedAvg().resume_state()

    # Execute / Assert
    with pytest.raises(ValueError, match="no accountant history"):
        adaptive().restore(state, completed_rounds=2)


def test_record_level_epsilon_before_a_resume_is_not_forgotten():
    # Prepare: clients reported up to 4.2 before the resume; node ids are new now
    strategy = WeightedFedAvg()
    strategy.restore({"epsilon_record_max": 4.2, "delta_record": 1e-5}, completed_rounds=2)
    strategy.configure_train(1, arrays_record(GLOBAL), ConfigRecord(), FakeGrid([7]))
    replies = [reply(7, GLOBAL, {"num-examples": 10, "train_loss": 1.0, "epsilon": 1.0, "delta": 1e-5})]

    # Execute
    _, metrics = strategy.aggregate_train(1, replies)

    # Assert
    assert metrics["epsilon_record_max"] == 4.2
    assert strategy.privacy_summary()["epsilon_record_max"] == 4.2
    assert strategy.train_metrics[3]["epsilon_record_max"] == 4.2


@pytest.mark.parametrize("completed_rounds", [-1, 1.5, True])
def test_restore_refuses_a_bad_round_count(completed_rounds):
    with pytest.raises(ValueError, match="completed_rounds="):
        WeightedFedAvg().restore({}, completed_rounds=completed_rounds)


def test_a_checkpoint_reads_back_what_was_written(tmp_path):
    # Prepare
    checkpoint = Checkpoint(
        round=3,
        state_dict={"w": torch.arange(6.0).reshape(2, 3)},
        rounds=[{"round": r, "test_accuracy": 0.5, "epsilon_user": None} for r in (1, 2, 3)],
        strategy_state={"history": {"noise_multipliers": [1.0], "sample_rates": [0.1], "steps": [3]}},
        ledger_id="abc",
        config={"num_rounds": 5},
    )

    # Execute
    save_checkpoint(tmp_path / CHECKPOINT_NAME, checkpoint)
    loaded = load_checkpoint(tmp_path)

    # Assert
    assert loaded.round == 3 and loaded.ledger_id == "abc" and loaded.config == {"num_rounds": 5}
    assert loaded.rounds == checkpoint.rounds
    assert loaded.strategy_state == checkpoint.strategy_state
    torch.testing.assert_close(loaded.state_dict["w"], checkpoint.state_dict["w"])
    assert not list(tmp_path.glob("*.tmp"))


def test_a_missing_or_foreign_checkpoint_is_one_clear_config_error(tmp_path):
    # Prepare: a model-only checkpoint, as earlier versions wrote
    (tmp_path / "old").mkdir()
    torch.save({"round": 2, "state_dict": {}}, tmp_path / "old" / CHECKPOINT_NAME)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"resume=.*empty: no checkpoint\.pt"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"resume=.*old: checkpoint\.pt has format None"):
        load_checkpoint(tmp_path / "old")


def test_only_run_length_and_connection_may_change_on_resume():
    # Prepare
    stored = compose_config(["strategy=dp_fixed", "num_rounds=2"])
    longer = compose_config(
        ["strategy=dp_fixed", "num_rounds=6", "mode=deployment", "round_timeout=30", "output_dir=/x", "resume=/x"]
    )
    noisier = compose_config(["strategy=dp_fixed", "num_rounds=6", "strategy.noise_multiplier=0.5"])

    # Execute
    allowed, refused = config_differences(stored, longer), config_differences(stored, noisier)

    # Assert
    assert allowed == []
    assert refused == ["strategy.noise-multiplier: 1.0 -> 0.5"]
    checkpoint = Checkpoint(round=2, state_dict={}, config=stored)
    with pytest.raises(ConfigError, match="strategy.noise-multiplier: 1.0 -> 0.5"):
        check_resumable(checkpoint, config=noisier, run_dir="/r")
    with pytest.raises(ConfigError, match="num_rounds=2: the checkpoint in /r already has 2 rounds"):
        check_resumable(checkpoint, config=stored, run_dir="/r")


def test_node_state_lives_on_the_nodes_disk_when_it_has_one(tmp_path):
    # Prepare
    run_config = {"output-dir": str(tmp_path / "run")}

    # Execute
    own = node_state_path(
        node_config={"ledger-dir": str(tmp_path / "node")}, run_config=run_config, ledger_id="L", partition_id=2
    )
    shared = node_state_path(node_config={}, run_config=run_config, ledger_id="L", partition_id=2)
    without_id = node_state_path(node_config={}, run_config=run_config, ledger_id="", partition_id=2)
    without_folder = node_state_path(node_config={}, run_config={"output-dir": ""}, ledger_id="L", partition_id=2)

    # Assert
    assert own == tmp_path / "node" / "L" / "partition-2.json"
    assert shared == tmp_path / "run" / "client-state" / "L" / "partition-2.json"
    assert without_id is None and without_folder is None


@settings(max_examples=30, deadline=None)
@given(
    steps=st.lists(st.integers(1, 10**6), min_size=1, max_size=5),
    noise=st.floats(0.1, 50.0),
)
def test_node_state_round_trips_through_its_file(tmp_path_factory, steps, noise):
    # Prepare
    path = tmp_path_factory.mktemp("ledger") / "L" / "partition-0.json"
    record = {"noise_multipliers": [noise] * len(steps), "sample_rates": [0.01] * len(steps), "steps": steps}
    written = RecordDict({"fedpriv.privacy": ConfigRecord(record)})

    # Execute
    save_node_state(written, path)
    read = RecordDict()
    restored = restore_node_state(read, path)

    # Assert
    assert restored
    assert dict(read.config_records["fedpriv.privacy"]) == record


def test_a_later_round_keeps_its_own_state_and_a_damaged_file_is_refused(tmp_path):
    # Prepare
    path = tmp_path / "partition-0.json"
    save_node_state(RecordDict({"s": ConfigRecord({"steps": [1]})}), path)
    current = RecordDict({"s": ConfigRecord({"steps": [1, 2]})})
    damaged = tmp_path / "damaged.json"
    damaged.write_text("{not json")

    # Execute / Assert
    assert not restore_node_state(current, path)
    assert dict(current.config_records["s"]) == {"steps": [1, 2]}
    with pytest.raises(ValueError, match="damaged.json is damaged"):
        restore_node_state(RecordDict(), damaged)


def run(cwd: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    result = run_project_script("run.py", *overrides, cwd=cwd)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_a_resumed_private_run_keeps_every_round_and_every_epsilon(tmp_path):
    # Prepare: both DP layers, every client in every round (q = 1), so epsilons are known
    out = tmp_path / "run"
    experiment = [
        "client=opacus",
        "client.noise_multiplier=1.0",
        "client.local_epochs=1",
        "client.batch_size=32",
        "strategy=dp_fixed",
        "strategy.sample_rate=1.0",
        "strategy.noise_multiplier=2.0",
        "num_clients=3",
    ]
    run(tmp_path, *experiment, "num_rounds=2", f"output_dir={out}")
    first = json.loads((out / "results.json").read_text())
    ledgers = sorted((out / "client-state").glob("*/partition-*.json"))
    steps_after_two = [sum(json.loads(p.read_text())["config_records"]["fedpriv.privacy"]["steps"]) for p in ledgers]

    # Execute: the server process is gone; a new one goes on for one more round
    run(tmp_path, *experiment, "num_rounds=3", f"resume={out}")

    # Assert: rounds 1-2 kept as they were, round 3 added
    document = json.loads((out / "results.json").read_text())
    rows = document["rounds"]
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert rows[:2] == first["rounds"]
    assert document["final"]["rounds_completed"] == 3
    assert document["timing"]["resumed_from_round"] == 2
    # Assert: the server's accountant went on from 2 releases to 3
    expected_user = [compute_epsilon([(2.0, 1.0, r)], delta=1e-5, accountant="prv") for r in (1, 2, 3)]
    assert [row["epsilon_user"] for row in rows] == pytest.approx(expected_user, rel=1e-9)
    # Assert: each client's ledger went on too (one more round of the same
    # steps after its one count release), so its epsilon grew
    steps_after_three = [sum(json.loads(p.read_text())["config_records"]["fedpriv.privacy"]["steps"]) for p in ledgers]
    assert len(ledgers) == 3
    assert steps_after_three == [(s - 1) * 3 // 2 + 1 for s in steps_after_two]
    _, records = operator_records(out)
    exact = {r["round"]: r for r in records if "round" in r}
    assert exact[3]["epsilon_record_max"] > exact[2]["epsilon_record_max"] > exact[1]["epsilon_record_max"]
    assert all(row["epsilon_record_max"] is None for row in rows)  # client-derived: not published
    assert (out / "model.pt").exists()

    # Execute: the clients' ledgers are lost, and the run is resumed once more
    for ledger in ledgers:
        ledger.unlink()
    run(tmp_path, *experiment, "num_rounds=4", f"resume={out}")

    # Assert: no client restarts from zero: each declines, and the record-level
    # epsilon reported never falls below what was spent
    _, records = operator_records(out)
    exact = {r["round"]: r for r in records if "round" in r}
    assert exact[4]["num_declined"] == 3 and exact[4]["num_clients"] == 0
    assert exact[4]["epsilon_record_max"] == exact[3]["epsilon_record_max"]
    assert not any(ledger.exists() for ledger in ledgers)


@pytest.mark.slow
def test_a_secure_private_run_sums_noisy_client_updates_and_resumes_with_its_skellam_ledger(tmp_path):
    # Prepare: SecAgg+ with distributed DP on top of record-level DP, every client every round
    from fedpriv.privacy.skellam import skellam_epsilon

    out = tmp_path / "run"
    experiment = [
        "secure=secagg",
        "strategy=dp_fixed",
        "strategy.noise_multiplier=2.0",
        "client=opacus",
        "client.noise_multiplier=1.0",
        "client.local_epochs=1",
        "num_clients=3",
    ]
    run(tmp_path, *experiment, "num_rounds=2", f"output_dir={out}")

    # Execute: a new server process goes on for a third round
    run(tmp_path, *experiment, "num_rounds=3", f"resume={out}")

    # Assert: both protections recorded; the client-level epsilon is the distributed
    # Skellam release's, three times; record-level epsilons kept growing
    document = json.loads((out / "results.json").read_text())
    rows = document["rounds"]
    assert document["privacy"]["secure_aggregation"] == "secagg"
    assert document["privacy"]["distributed_noise"] == "skellam"
    assert document["privacy"]["record_level"] is True
    expected = [skellam_epsilon([(2.0, 1.0, r)], delta=1e-5) for r in (1, 2, 3)]
    assert [row["epsilon_user"] for row in rows] == pytest.approx(expected, rel=1e-6)
    assert [row["noise_std"] for row in rows] == pytest.approx([2.0 / 3] * 3, rel=1e-4)
    _, records = operator_records(out)
    exact = {r["round"]: r for r in records if "round" in r}
    assert [exact[r]["num_clients"] for r in (1, 2, 3)] == [3, 3, 3]
    assert exact[3]["epsilon_record_max"] > exact[2]["epsilon_record_max"] > exact[1]["epsilon_record_max"]
    ledgers = sorted((out / "client-state").glob("*/partition-*.json"))
    assert len(ledgers) == 3 and all("fedpriv.secagg" not in p.read_text() for p in ledgers)


def test_resume_with_a_changed_experiment_is_refused_in_one_line(tmp_path):
    # Prepare
    out = tmp_path / "run"
    out.mkdir()
    config = compose_config(["num_rounds=2"])
    save_checkpoint(out / CHECKPOINT_NAME, Checkpoint(round=2, state_dict={}, config=config, ledger_id="L"))

    # Execute
    result = run(tmp_path, "num_rounds=4", "client.lr=0.5", f"resume={out}", check=False)

    # Assert
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"config error: resume={out}: the config differs from the checkpoint's: client.lr: 0.05 -> 0.5"
    ]


def test_a_sweep_cannot_resume(tmp_path):
    # Execute
    result = run(tmp_path, "-m", "seed=0,1", f"resume={tmp_path}", check=False)

    # Assert
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"config error: resume={tmp_path}: a sweep cannot resume (every job would write into that one folder)"
    ]


def test_a_resumed_run_writes_into_the_folder_it_resumes():
    # Prepare
    config = compose_config(["resume=/runs/a", "output_dir=/runs/b"])

    # Execute / Assert
    with pytest.raises(ConfigError, match="output_dir='/runs/b': a resumed run writes into resume='/runs/a'"):
        load_experiment(config)
