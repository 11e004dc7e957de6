"""The one-run audit at the aggregation level: canary clients in DPFedAvg, record canaries, config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import FakeGrid, arrays_record, reply
from flwr.app import ConfigRecord, RecordDict

from clients.opacus_training import OpacusTraining
from fedpriv.audit import CanaryAudit, NoAudit
from fedpriv.audit.canaries import (
    CanaryClients,
    alignment_scores,
    canary_coins,
    canary_direction,
    canary_records,
    flatten_floating,
    sampled_canaries,
    split_like,
)
from fedpriv.audit.one_run import audit_scores
from fedpriv.compose import compose_config
from fedpriv.experiment import load_experiment
from fedpriv.models import MLP
from fedpriv.run_config import ConfigError
from strategies import DPFedAvg

# 20,010 coordinates: canary directions are then nearly orthogonal to each other.
SHAPES = {"w": (100, 200), "b": (10,)}
NUM_CLIENTS = 10
ROUNDS = 5
CANARIES = 1000


def run_audited_rounds(*, noise_multiplier: float, seed: int = 0) -> tuple[float, float]:
    """ROUNDS rounds of DPFedAvg with canary clients; returns (lower bound, claimed epsilon).

    Real clients send small random updates (q = 1, C = 1), so the canaries compete
    with real traffic, the noise and each other, as in a run.
    """
    canaries = CanaryClients(seed=seed, num_canaries=CANARIES)
    strategy = DPFedAvg(
        num_clients=NUM_CLIENTS, sample_rate=1.0, noise_multiplier=noise_multiplier, clipping_norm=1.0,
        sampling_seed=seed, noise_seed=seed, extra_updates=canaries,
    )
    rng = np.random.default_rng(seed)
    initial = {name: np.zeros(shape, dtype=np.float32) for name, shape in SHAPES.items()}
    current = initial
    for server_round in range(1, ROUNDS + 1):
        messages = strategy.configure_train(
            server_round, arrays_record(current), ConfigRecord(), FakeGrid(range(1, NUM_CLIENTS + 1))
        )
        replies = [
            reply(
                m.metadata.dst_node_id,
                {name: value + rng.normal(0, 0.003, value.shape).astype(np.float32) for name, value in current.items()},
                {"num-examples": 100, "train_loss": 1.0},
            )
            for m in messages
        ]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert strategy.train_metrics[server_round]["num_canaries"] == int(canaries.coins.sum())
        current = {name: arrays[name].numpy() for name in SHAPES}
    scores = alignment_scores(
        seed=seed, num_canaries=CANARIES, initial=list(initial.values()), final=list(current.values())
    )
    result = audit_scores(scores, canaries.coins, num_guesses=800, confidence=0.95)
    return result.epsilon_lower_bound, strategy.epsilon_user


def test_without_noise_the_audit_detects_the_leak_and_with_noise_respects_the_claim():
    # Execute
    leaked, not_claimed = run_audited_rounds(noise_multiplier=0.0)
    bounded, claimed = run_audited_rounds(noise_multiplier=4.0)

    # Assert: no noise, every guess right: 800 of 800 proves epsilon >= 5.59, more than
    # twice what the private setting claims; with noise the bound stays below the claim
    assert not_claimed == math.inf
    assert leaked == pytest.approx(5.59, abs=0.01)
    assert leaked > 2 * claimed
    assert 0.0 <= bounded <= claimed


def test_canary_updates_enter_the_clipped_sum_before_noise():
    # Prepare: clients send the global model back (zero update), no noise, q = 1
    canaries = CanaryClients(seed=3, num_canaries=20)
    strategy = DPFedAvg(
        num_clients=4, sample_rate=1.0, noise_multiplier=0.0, clipping_norm=0.5,
        sampling_seed=0, noise_seed=0, extra_updates=canaries,
    )
    zeros = {name: np.zeros(shape, dtype=np.float32) for name, shape in SHAPES.items()}
    messages = strategy.configure_train(1, arrays_record(zeros), ConfigRecord(), FakeGrid(range(1, 5)))
    replies = [reply(m.metadata.dst_node_id, zeros, {"num-examples": 100}) for m in messages]

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: the model moved by sum_i 0.5 u_i / D over the included canaries, none clipped
    dimension = 20010
    expected = sum(
        0.5 * canary_direction(seed=3, index=i, dimension=dimension) for i in np.flatnonzero(canaries.coins)
    ) / strategy.denominator
    moved = flatten_floating([arrays[name].numpy() for name in SHAPES])
    np.testing.assert_allclose(moved, expected, atol=1e-6)
    exact = strategy.train_metrics[1]
    assert exact["num_canaries"] == canaries.coins.sum()
    assert exact["clip_fraction"] == 0.0


def test_included_canaries_are_poisson_sampled_like_clients_and_excluded_never():
    # Prepare
    coins = canary_coins(seed=5, num_canaries=4000)

    # Execute
    rounds = [sampled_canaries(seed=5, coins=coins, sample_rate=0.25, server_round=r) for r in range(1, 21)]

    # Assert
    assert all(coins[i] for chosen in rounds for i in chosen)
    rate = sum(map(len, rounds)) / (20 * coins.sum())
    assert rate == pytest.approx(0.25, abs=0.01)
    assert rounds[0] == sampled_canaries(seed=5, coins=coins, sample_rate=0.25, server_round=1)
    assert 0.47 < coins.mean() < 0.53


def test_split_like_inverts_flatten_and_leaves_integer_buffers_alone():
    # Prepare
    like = [np.zeros((2, 3), np.float32), np.zeros(4, np.int64), np.zeros(5, np.float64)]
    vector = np.arange(11, dtype=np.float64)

    # Execute
    pieces = split_like(vector, like)

    # Assert
    assert [p.dtype for p in pieces] == [np.float32, np.int64, np.float64]
    assert not pieces[1].any()
    np.testing.assert_array_equal(flatten_floating(pieces), vector)


def test_record_canaries_go_to_client_i_mod_n_when_included():
    # Prepare
    audit = CanaryAudit(num_canaries=50, level="record", seed=7)
    coins = canary_coins(seed=7, num_canaries=50)
    canary_x, canary_y = canary_records(seed=7, num_canaries=50, input_shape=(1, 8, 8), num_classes=10)
    x, y = torch.zeros(6, 1, 8, 8), torch.zeros(6, dtype=torch.long)

    # Execute
    data = [
        audit.client_data(x, y, partition_id=p, num_partitions=4, input_shape=(1, 8, 8), num_classes=10)
        for p in range(4)
    ]

    # Assert
    for p, (client_x, client_y) in enumerate(data):
        mine = [i for i in range(50) if coins[i] and i % 4 == p]
        assert torch.equal(client_x[6:], canary_x[mine]) and torch.equal(client_y[6:], canary_y[mine])
        assert torch.equal(client_x[:6], x)
    assert sum(len(cy) - 6 for _, cy in data) == coins.sum()
    assert len(y) == 6
    where = {"partition_id": 0, "num_partitions": 4, "input_shape": (1, 8, 8), "num_classes": 10}
    assert NoAudit().client_data(x, y, **where) == (x, y)
    assert CanaryAudit(level="client").client_data(x, y, **where) == (x, y)


def test_report_without_noise_claims_nothing():
    # Prepare: a model moved along the included canaries' directions (what a run without noise does)
    audit = CanaryAudit(num_canaries=100, seed=1)
    model = MLP(input_shape=(1, 8, 8), num_classes=10, hidden_sizes=(16,))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    like = [v.numpy() for v in initial.values()]
    dimension = flatten_floating(like).size
    included = np.flatnonzero(canary_coins(seed=1, num_canaries=100))
    push = sum(canary_direction(seed=1, index=i, dimension=dimension) for i in included)
    final = {k: torch.from_numpy(a) + v for (k, v), a in zip(initial.items(), split_like(push, like))}

    # Execute
    section = audit.report(
        initial_state=initial, final_state=final, model=model, input_shape=(1, 8, 8), num_classes=10,
        privacy={"epsilon_user": math.inf, "delta_user": 1e-5},
    )

    # Assert
    assert section["claimed_epsilon"] is None and section["private"] is False
    assert section["correct_guesses"] == section["num_guesses"] == 80
    assert section["epsilon_lower_bound"] > 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_canaries": 1}, "audit.num_canaries=1"),
        ({"confidence": 1.5}, "audit.confidence=1.5"),
        ({"guess_fraction": 0.0}, "audit.guess_fraction=0.0"),
        ({"level": "user"}, "audit.level='user'"),
        ({"seed": -1}, "audit.seed=-1"),
    ],
)
def test_bad_audit_settings_name_key_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        CanaryAudit(**kwargs)


def test_client_canaries_need_a_dp_fedavg_strategy():
    # Prepare
    refused = compose_config(["audit=canary"])
    accepted = [["audit=canary", "strategy=dp_fixed"], ["audit=canary", "strategy=dp_adaptive"],
                ["audit=canary", "audit.level=record", "client=opacus"]]

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"audit\.level='client'.*strategy=dp_fixed or dp_adaptive"):
        load_experiment(refused)
    for overrides in accepted:
        assert isinstance(load_experiment(compose_config(overrides)).audit, CanaryAudit)
    assert isinstance(load_experiment(compose_config()).audit, NoAudit)


def test_opacus_without_noise_trains_and_reports_no_epsilon():
    # Prepare
    torch.manual_seed(0)
    model = MLP(input_shape=(1, 8, 8), num_classes=10, hidden_sizes=(8,))
    x, y = torch.rand(40, 1, 8, 8), torch.randint(0, 10, (40,))

    # Execute
    outcome = OpacusTraining(noise_multiplier=0.0, batch_size=10).fit(model, x, y, seed=0, state=RecordDict())

    # Assert
    assert "epsilon" not in outcome.metrics and "delta" not in outcome.metrics
    assert outcome.metrics["noise_multiplier"] == 0.0
    assert outcome.loss is None
    with pytest.raises(ValueError, match="client.noise_multiplier=-1.0"):
        OpacusTraining(noise_multiplier=-1.0)
