"""Server optimizers: hand-computed steps, today's server_lr bit for bit, state through a checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import FakeGrid, arrays_record, noisy_round, reply
from flwr.app import ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import DPFedAvg, WeightedFedAvg
from strategies.server_optimizers import DEFAULT_SERVER_LR, OptimizerState, ServerOptimizer

GLOBAL = {"w": np.zeros((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}

X0 = [np.array([0.0, 1.0])]
FIRST_DELTA = np.array([0.2, -0.1])  # the first aggregate is X0 + FIRST_DELTA
SECOND_DELTA = np.array([0.1, 0.1])  # the second is the new model + SECOND_DELTA


def two_steps(optimizer: ServerOptimizer) -> tuple[np.ndarray, np.ndarray, OptimizerState]:
    """Both models after a step with FIRST_DELTA, then one with SECOND_DELTA, and the final state."""
    x1, state = optimizer.step(global_arrays=X0, aggregate=[X0[0] + FIRST_DELTA], state=OptimizerState())
    x2, state = optimizer.step(global_arrays=x1, aggregate=[x1[0] + SECOND_DELTA], state=state)
    return x1[0], x2[0], state


def test_sgd_with_momentum_is_fedavgm_by_hand():
    # Prepare: lr 0.5, momentum 0.9; deltas [2, 0] then [0, 2]
    optimizer = ServerOptimizer(name="sgd", lr=0.5, momentum=0.9)
    x0 = [np.array([1.0, -2.0])]

    # Execute
    x1, state = optimizer.step(global_arrays=x0, aggregate=[np.array([3.0, -2.0])], state=OptimizerState())
    x2, state = optimizer.step(global_arrays=x1, aggregate=[x1[0] + np.array([0.0, 2.0])], state=state)

    # Assert: u1 = [2, 0], x1 = [2, -2]; u2 = 0.9 * [2, 0] + [0, 2] = [1.8, 2], x2 = x1 + 0.5 * u2 = [2.9, -1]
    np.testing.assert_allclose(x1[0], [2.0, -2.0])
    np.testing.assert_allclose(state.m[0], [1.8, 2.0])
    np.testing.assert_allclose(x2[0], [2.9, -1.0])


def test_adam_by_hand():
    # Execute: lr 0.1, beta1 0.9, beta2 0.99, tau 1e-3
    x1, x2, state = two_steps(ServerOptimizer(name="adam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3))

    # Assert: m1 = 0.1 * [0.2, -0.1] = [0.02, -0.01], v1 = 0.01 * [0.04, 0.01] = [4e-4, 1e-4],
    # steps 0.1 * 0.02 / (0.02 + 0.001) = 2/21 and 0.1 * -0.01 / (0.01 + 0.001) = -1/11
    np.testing.assert_allclose(x1, [2 / 21, 1 - 1 / 11])
    # m2 = 0.9 * m1 + 0.1 * [0.1, 0.1] = [0.028, 0.001]; v2 = 0.99 * v1 + 0.01 * [0.01, 0.01] = [4.96e-4, 1.99e-4]
    np.testing.assert_allclose(state.m[0], [0.028, 0.001])
    np.testing.assert_allclose(state.v[0], [4.96e-4, 1.99e-4])
    steps = [0.1 * 0.028 / (math.sqrt(4.96e-4) + 1e-3), 0.1 * 0.001 / (math.sqrt(1.99e-4) + 1e-3)]
    np.testing.assert_allclose(x2, x1 + steps)


def test_yogi_by_hand():
    # Execute
    x1, x2, state = two_steps(ServerOptimizer(name="yogi", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3))

    # Assert: from v0 = 0 the first step is Adam's; then v1 < delta^2, so v2 = v1 + 0.01 * delta^2
    np.testing.assert_allclose(x1, [2 / 21, 1 - 1 / 11])
    np.testing.assert_allclose(state.v[0], [5e-4, 2e-4])
    steps = [0.1 * 0.028 / (math.sqrt(5e-4) + 1e-3), 0.1 * 0.001 / (math.sqrt(2e-4) + 1e-3)]
    np.testing.assert_allclose(x2, x1 + steps)


def test_adagrad_by_hand():
    # Execute
    x1, x2, state = two_steps(ServerOptimizer(name="adagrad", lr=0.1, beta1=0.9, tau=1e-3))

    # Assert: v1 = [0.04, 0.01], steps 0.1 * 0.02 / (0.2 + 0.001) and 0.1 * -0.01 / (0.1 + 0.001);
    # v2 = v1 + [0.01, 0.01]
    np.testing.assert_allclose(x1, [0.002 / 0.201, 1 - 0.001 / 0.101])
    np.testing.assert_allclose(state.v[0], [0.05, 0.02])
    steps = [0.1 * 0.028 / (math.sqrt(0.05) + 1e-3), 0.1 * 0.001 / (math.sqrt(0.02) + 1e-3)]
    np.testing.assert_allclose(x2, x1 + steps)


@settings(max_examples=50, deadline=None)
@given(lr=st.floats(1e-3, 1e3), seed=st.integers(0, 2**32 - 1))
def test_sgd_without_momentum_is_todays_server_lr_bit_for_bit(lr, seed):
    # Prepare: today's step was global + server_lr * (average - global), in float64, cast back
    rng = np.random.default_rng(seed)
    global_arrays = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=4).astype(np.float32)]
    aggregate = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=4).astype(np.float32)]
    today = [
        (g.astype(np.float64) + lr * (t.astype(np.float64) - g)).astype(g.dtype)
        for g, t in zip(global_arrays, aggregate, strict=True)
    ]

    # Execute
    new, state = ServerOptimizer(name="sgd", lr=lr).step(
        global_arrays=global_arrays, aggregate=aggregate, state=OptimizerState()
    )

    # Assert
    for ours, theirs in zip(new, today if lr != 1.0 else aggregate, strict=True):
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, theirs)
    assert state == OptimizerState()


def test_plain_fedavg_returns_the_aggregate_itself():
    aggregate = [np.ones(3, dtype=np.float32)]
    new, _ = ServerOptimizer().step(global_arrays=[np.zeros(3, dtype=np.float32)], aggregate=aggregate, state=OptimizerState())
    assert new[0] is aggregate[0]


@pytest.mark.parametrize("name", ["sgd", "adam", "yogi", "adagrad"])
def test_a_step_writes_into_nothing_it_is_given(name):
    # Prepare
    optimizer = ServerOptimizer(name=name, lr=0.3, momentum=0.5 if name == "sgd" else 0.0)
    global_arrays, aggregate = [np.zeros(4, dtype=np.float32)], [np.ones(4, dtype=np.float32)]
    _, state = optimizer.step(global_arrays=global_arrays, aggregate=aggregate, state=OptimizerState())
    before = [a.copy() for a in (*state.m, *state.v)]

    # Execute
    optimizer.step(global_arrays=global_arrays, aggregate=aggregate, state=state)

    # Assert
    np.testing.assert_array_equal(global_arrays[0], 0.0)
    np.testing.assert_array_equal(aggregate[0], 1.0)
    for kept, now in zip(before, (*state.m, *state.v), strict=True):
        np.testing.assert_array_equal(kept, now)


def test_state_survives_a_torch_checkpoint_bit_for_bit(tmp_path):
    # Prepare: a state with values float32 could not hold
    rng = np.random.default_rng(0)
    state = OptimizerState(m=(rng.normal(size=(3, 2)), rng.normal(size=5)), v=(rng.random(size=(3, 2)), rng.random(size=5)))

    # Execute: the way checkpoints are written and read
    torch.save({"server_optimizer": state.to_checkpoint()}, tmp_path / "state.pt")
    restored = OptimizerState.from_checkpoint(torch.load(tmp_path / "state.pt", weights_only=True)["server_optimizer"])

    # Assert
    for kept, back in zip((*state.m, *state.v), (*restored.m, *restored.v), strict=True):
        assert back.dtype == np.float64
        np.testing.assert_array_equal(kept, back)
    assert OptimizerState.from_checkpoint({}) == OptimizerState()


def test_default_learning_rates_are_plain_fedavg_and_flowers():
    assert DEFAULT_SERVER_LR == {"sgd": 1.0, "adam": 0.1, "yogi": 0.01, "adagrad": 0.1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "rmsprop"}, "strategy.server_optimizer='rmsprop': must be one of"),
        ({"lr": 0.0}, "strategy.server_lr=0.0: must be in (0, 1000]"),
        ({"momentum": 1.0}, "strategy.server_momentum=1.0: must be in [0, 1)"),
        ({"beta1": 1.5}, "strategy.beta1=1.5: must be in [0, 1)"),
        ({"beta2": -0.1}, "strategy.beta2=-0.1: must be in [0, 1)"),
        ({"tau": 0.0}, "strategy.tau=0.0: must be in [1e-12, 1e+06]"),
        ({"beta1": True}, "strategy.beta1=True: must be a number"),
    ],
)
def test_invalid_settings_name_key_and_value(kwargs, message):
    with pytest.raises(ValueError) as refused:
        ServerOptimizer(**kwargs)
    assert str(refused.value).startswith(message)


# --- in the strategy -------------------------------------------------------------------------


def test_the_round_reports_the_norm_of_the_server_update():
    # Prepare: clients average 3.0 everywhere, the model is 0, server_lr 0.5
    strategy = WeightedFedAvg(server_lr=0.5)
    strategy.configure_train(1, arrays_record(GLOBAL), ConfigRecord(), FakeGrid([1, 2]))
    replies = [reply(node, {k: np.full_like(v, value) for k, v in GLOBAL.items()}, {"num-examples": 10})
               for node, value in ((1, 2.0), (2, 4.0))]

    # Execute
    _, metrics = strategy.aggregate_train(1, replies)

    # Assert: 8 values each moved by 1.5
    assert metrics["server_update_norm"] == pytest.approx(1.5 * math.sqrt(8))


def test_a_rejected_model_leaves_the_optimizer_state_as_it_was():
    # Prepare: one accepted Adam round
    strategy = WeightedFedAvg(server_optimizer="adam")
    model = noisy_round(strategy, 1, GLOBAL, rng=np.random.default_rng(1))
    after_first = strategy.optimizer_state
    noisy_round(strategy, 2, model, rng=np.random.default_rng(2))
    assert strategy.optimizer_state is not after_first

    # Execute: the ServerApp found round 2's model non-finite on its test split
    strategy.reject_model(2, reason="the server's test loss is nan")

    # Assert
    assert strategy.optimizer_state is after_first


def test_dp_fedadam_spends_exactly_the_epsilon_of_dp_fedavg():
    # Prepare: the same seeded mechanism, with and without Adam on the noised aggregate
    def run(**optimizer) -> tuple[list[float], list]:
        strategy = DPFedAvg(num_clients=10, sample_rate=0.5, noise_multiplier=1.0, clipping_norm=1.0,
                            sampling_seed=1, noise_seed=2, **optimizer)
        model, epsilons = GLOBAL, []
        for server_round in range(1, 4):
            model = noisy_round(strategy, server_round, model, rng=np.random.default_rng(server_round))
            epsilons.append(strategy.train_metrics[server_round]["epsilon_user"])
        return epsilons, strategy.history

    # Execute
    plain, adam = run(), run(server_optimizer="adam")

    # Assert: the optimizer reads only the release, so the accounting is the same, round by round
    assert plain == adam
