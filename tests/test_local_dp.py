"""Local DP: the mechanisms, their accounting against dp-accounting, and the local-DP client."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
import torch
from conftest import pld_epsilon
from flwr.app import RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from clients.local_dp import LocalDPTraining
from clients.node_state import restore_node_state, save_node_state
from clients.privacy_state import STATE_KEY, PrivacyBudgetExhausted
from fedpriv.models import LogisticRegression
from fedpriv.privacy import PrivacyLedger
from fedpriv.privacy.laplace_accounting import laplace_basic_epsilon, laplace_epsilon
from fedpriv.privacy.local_dp import clip_l1, clip_l2, gaussian_mechanism, l1_norm, laplace_mechanism


def reference_laplace_epsilon(history, *, delta):
    """dp-accounting's PLD epsilon of Laplace releases ``(noise_multiplier, 1, steps)``."""
    accountant = dp_accounting.pld.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    for noise_multiplier, _, steps in history:
        accountant.compose(dp_accounting.LaplaceDpEvent(noise_multiplier), steps)
    return accountant.get_epsilon(delta)


# Mechanisms


def test_laplace_noise_has_the_scale_it_claims():
    # Prepare: sensitivity 2 at epsilon 0.5 is scale 4
    values = [np.zeros(20_000), np.zeros((100, 100))]

    # Execute
    noisy = laplace_mechanism(values, l1_sensitivity=2.0, epsilon=0.5, rng=np.random.default_rng(1))

    # Assert: a Kolmogorov-Smirnov fit to Laplace(0, 4), and not to Laplace(0, 3.6)
    draws = np.concatenate([array.ravel() for array in noisy])
    assert stats.kstest(draws, stats.laplace(scale=4.0).cdf).pvalue > 1e-3
    assert stats.kstest(draws, stats.laplace(scale=3.6).cdf).pvalue < 1e-6
    assert [array.shape for array in noisy] == [(20_000,), (100, 100)]


def test_gaussian_noise_has_the_std_it_claims():
    # Prepare
    values = [np.zeros(40_000, dtype=np.float32)]

    # Execute
    noisy = gaussian_mechanism(values, l2_sensitivity=2.0, noise_multiplier=1.5, rng=np.random.default_rng(2))

    # Assert
    assert noisy[0].dtype == np.float32
    assert stats.kstest(noisy[0], stats.norm(scale=3.0).cdf).pvalue > 1e-3


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda rng: laplace_mechanism([np.zeros(2)], l1_sensitivity=1.0, epsilon=0.0, rng=rng), "epsilon=0.0"),
        (lambda rng: laplace_mechanism([np.zeros(2)], l1_sensitivity=-1.0, epsilon=1.0, rng=rng), "l1_sensitivity=-1.0"),
        (lambda rng: gaussian_mechanism([np.zeros(2)], l2_sensitivity=1.0, noise_multiplier=np.nan, rng=rng), "noise_multiplier=nan"),
        (lambda rng: clip_l1([np.array([np.inf])], max_norm=1.0), "update L1 norm=inf"),
        (lambda rng: clip_l1([np.zeros(2)], max_norm=0), "max_norm=0"),
    ],
)
def test_bad_mechanism_inputs_name_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call(np.random.default_rng(0))


@settings(max_examples=60, deadline=None)
@given(
    update=arrays(np.float32, st.integers(1, 50), elements=st.floats(-1e6, 1e6, width=32)),
    max_norm=st.floats(1e-3, 1e3),
)
def test_an_update_after_l1_clipping_is_within_the_clip_norm(update, max_norm):
    # Execute
    clipped, norm = clip_l1([update, update[:1]], max_norm=max_norm)

    # Assert: within C, unchanged below it, and the input is untouched
    assert l1_norm(clipped) <= max_norm
    if norm <= max_norm * (1 - 1e-5):
        assert np.array_equal(clipped[0], update)
    assert clipped[0].dtype == np.float32 and clipped[0] is not update


def test_l2_clipping_is_the_server_side_clipping():
    clipped, norm = clip_l2([np.array([3.0, 4.0])], max_norm=1.0)
    assert norm == 5.0 and np.allclose(clipped[0], [0.6, 0.8])


# Accounting


def test_composed_laplace_epsilon_equals_dp_accounting_and_basic_composition_adds_up():
    # Prepare: 10 releases at epsilon 0.5, then 40 at epsilon 0.25
    history = [(2.0, 1.0, 10), (4.0, 1.0, 40)]

    # Execute
    epsilon = laplace_epsilon(history, delta=1e-5)
    basic = laplace_basic_epsilon(history)

    # Assert: fixed values, checked against dp-accounting's PLD accountant
    assert basic == pytest.approx(15.0)
    assert epsilon == pytest.approx(reference_laplace_epsilon(history, delta=1e-5), rel=1e-9)
    assert epsilon == pytest.approx(9.934, abs=1e-3)
    assert laplace_epsilon([(2.0, 1.0, 10)], delta=1e-5) == pytest.approx(4.990, abs=1e-3)
    assert laplace_epsilon([(2.0, 1.0, 1)], delta=1e-5) <= 0.5  # never above the pure epsilon


@settings(max_examples=25, deadline=None)
@given(
    history=st.lists(
        st.tuples(st.floats(1e-3, 1e3), st.just(1.0), st.integers(1, 200)), min_size=1, max_size=3
    )
)
def test_the_pld_epsilon_never_exceeds_basic_composition(history):
    # Execute: per-release epsilons up to 1000 (a fixed fine grid would need gigabytes)
    epsilon = laplace_epsilon(history, delta=1e-6)

    # Assert
    assert 0 < epsilon <= laplace_basic_epsilon(history)


def test_a_laplace_history_must_not_be_subsampled():
    with pytest.raises(ValueError, match="sample_rate=0.5"):
        laplace_epsilon([(1.0, 0.5, 3)], delta=1e-5)


def test_the_ledger_composes_laplace_releases_and_round_trips_its_state():
    # Prepare
    ledger = PrivacyLedger(accountant="pld", mechanism="laplace")

    # Execute
    for _ in range(3):
        ledger.record(noise_multiplier=1.0, sample_rate=1.0)
    restored = PrivacyLedger(accountant="pld", mechanism="laplace")
    restored.load_state_dict(ledger.state_dict())

    # Assert
    assert restored.history == [(1.0, 1.0, 3)]
    assert restored.basic_epsilon() == 3.0
    assert restored.epsilon(1e-5) == pytest.approx(reference_laplace_epsilon([(1.0, 1.0, 3)], delta=1e-5))
    with pytest.raises(ValueError, match="accountant='prv'"):
        PrivacyLedger(accountant="prv", mechanism="laplace")


# The client


def _data(n: int = 60, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 4, generator=generator), torch.randint(0, 2, (n,), generator=generator)


def _model() -> LogisticRegression:
    torch.manual_seed(0)
    return LogisticRegression(input_shape=(4,), num_classes=2)


def test_a_client_replies_with_the_received_model_plus_its_noisy_clipped_update():
    # Prepare: a large update, clipped to L1 norm 0.5, at a tiny noise scale (epsilon 1000)
    training = LocalDPTraining(lr=5.0, clipping_norm=0.5, epsilon_per_round=1000.0)
    model, x, y = _model(), *_data()
    received = {name: value.clone() for name, value in model.state_dict().items()}

    # Execute
    outcome = training.fit(model, x, y, seed=None, state=RecordDict())

    # Assert: the update is within C plus the noise (scale 0.001 per coordinate)
    update = [(model.state_dict()[name] - received[name]).numpy() for name in received]
    assert 0.45 < l1_norm(update) <= 0.5 + 10 * 0.001 * sum(u.size for u in update)
    # Assert: weight 1, no loss, and only the accounted privacy in the metrics
    assert outcome.num_examples == 1.0 and outcome.loss is None
    assert set(outcome.metrics) == {"epsilon_local", "delta_local", "epsilon_local_basic"}
    assert outcome.metrics["epsilon_local_basic"] == 1000.0


def test_epsilon_grows_every_round_and_a_client_over_budget_declines_and_releases_nothing():
    # Prepare: epsilon 1 a round, budget 2.5 at delta 1e-5
    training = LocalDPTraining(epsilon_per_round=1.0, max_epsilon=2.5)
    state, (x, y) = RecordDict(), _data()

    # Execute
    epsilons = [training.fit(_model(), x, y, seed=None, state=state).metrics["epsilon_local"] for _ in range(2)]
    before = dict(state[STATE_KEY])
    model = _model()
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(PrivacyBudgetExhausted) as declined:
        training.fit(model, x, y, seed=None, state=state)

    # Assert
    assert epsilons[0] < epsilons[1] <= 2.0
    assert epsilons == pytest.approx([reference_laplace_epsilon([(1.0, 1.0, k)], delta=1e-5) for k in (1, 2)])
    assert dict(state[STATE_KEY]) == before
    assert all(torch.equal(model.state_dict()[name], value) for name, value in weights.items())
    assert declined.value.reply_metrics() == {"epsilon_local": epsilons[1], "delta_local": 1e-5}


def test_the_gaussian_mechanism_is_accounted_like_a_gaussian_release():
    # Prepare
    training = LocalDPTraining(mechanism="gaussian", noise_multiplier=2.0)
    state, (x, y) = RecordDict(), _data()

    # Execute
    metrics = [training.fit(_model(), x, y, seed=None, state=state).metrics for _ in range(3)]

    # Assert: no pure-DP bound, and the PRV epsilon of 3 Gaussian releases
    assert "epsilon_local_basic" not in metrics[-1]
    assert metrics[-1]["epsilon_local"] == pytest.approx(pld_epsilon([(2.0, 1.0, 3)], delta=1e-5), abs=0.02)


def test_a_resumed_client_goes_on_from_its_saved_ledger(tmp_path):
    # Prepare: two rounds, the node state saved to disk
    training = LocalDPTraining(epsilon_per_round=0.5)
    state, (x, y) = RecordDict(), _data()
    for _ in range(2):
        training.fit(_model(), x, y, seed=None, state=state)
    save_node_state(state, tmp_path / "partition-0.json")

    # Execute: a new process restores it and trains a third round
    resumed = RecordDict()
    assert restore_node_state(resumed, tmp_path / "partition-0.json")
    metrics = training.fit(_model(), x, y, seed=None, state=resumed).metrics

    # Assert
    assert metrics["epsilon_local_basic"] == pytest.approx(1.5)
    assert resumed[STATE_KEY]["steps"] == [3]


def test_a_ledger_of_another_mechanism_is_refused():
    # Prepare
    state, (x, y) = RecordDict(), _data()
    LocalDPTraining(mechanism="gaussian").fit(_model(), x, y, seed=None, state=state)

    # Execute / Assert
    with pytest.raises(ValueError, match="client.mechanism='laplace'"):
        LocalDPTraining(mechanism="laplace").fit(_model(), x, y, seed=None, state=state)


def test_private_noise_differs_between_runs_and_a_seed_replays_it():
    # Prepare
    training, (x, y) = LocalDPTraining(), _data()

    def weights(seed):
        model = _model()
        training.fit(model, x, y, seed=seed, state=RecordDict())
        return model.state_dict()["linear.weight"]

    # Execute / Assert
    assert not torch.equal(weights(None), weights(None))
    assert torch.equal(weights(7), weights(7))


def test_local_dp_under_server_dp_needs_equal_weights():
    # Prepare
    from fedpriv.compose import compose_config
    from fedpriv.experiment import load_experiment
    from fedpriv.run_config import ConfigError

    base = ["client=local_dp", "strategy=dp_fixed"]

    # Execute / Assert: bounded weights would shrink every weight-1 update by weight_cap
    with pytest.raises(ConfigError, match="strategy.weighted=True: local-DP clients reply with weight 1"):
        load_experiment(compose_config(base))
    assert load_experiment(compose_config([*base, "strategy.weighted=false"])).client.privacy_level == "local"
