"""DPFedAvg / AdaptiveDPFedAvg wired into the strategy: sensitivity, noise, accounting, sampling."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FakeGrid, arrays_record, error_reply, pld_epsilon, reply
from flwr.app import ConfigRecord
from flwr.supercore.differential_privacy import compute_stdv
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import AdaptiveDPFedAvg, DPFedAvg, StopRun

SHAPES = {"w": (4, 3), "b": (3,)}
GLOBAL = {name: np.zeros(shape, dtype=np.float32) for name, shape in SHAPES.items()}


def dp_strategy(**overrides) -> DPFedAvg:
    settings_ = {
        "num_clients": 10,
        "sample_rate": 1.0,
        "noise_multiplier": 0.0,
        "clipping_norm": 1.0,
        "sampling_seed": 0,
        "noise_seed": 0,
    } | overrides
    return DPFedAvg(**settings_)


def start_round(strategy, server_round=1, *, arrays=GLOBAL, nodes=range(1, 11)):
    return list(strategy.configure_train(server_round, arrays_record(arrays), ConfigRecord(), FakeGrid(nodes)))


def model_reply(node_id, arrays, num_examples):
    return reply(node_id, arrays, {"num-examples": num_examples, "train_loss": 1.0})


def flat(record) -> np.ndarray:
    return np.concatenate([record[name].numpy().ravel() for name in SHAPES])


client_updates = st.lists(
    st.tuples(
        st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=15, max_size=15),
        st.integers(1, 10**9),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(clients=client_updates, weighted=st.booleans(), removed=st.integers(0, 5))
def test_removing_one_client_moves_the_model_at_most_c_over_d(clients, weighted, removed):
    # Prepare: noise off, so the difference is the sensitivity itself
    removed %= len(clients)
    replies = []
    for node_id, (values, n) in enumerate(clients, start=1):
        vector = np.asarray(values, dtype=np.float32)
        arrays = {"w": vector[:12].reshape(4, 3), "b": vector[12:]}
        replies.append(model_reply(node_id, arrays, n))
    with_all, without_one = dp_strategy(weighted=weighted, weight_cap=50.0), dp_strategy(weighted=weighted, weight_cap=50.0)
    start_round(with_all)
    start_round(without_one)

    # Execute
    full, _ = with_all.aggregate_train(1, replies)
    reduced, _ = without_one.aggregate_train(1, replies[:removed] + replies[removed + 1 :])

    # Assert: float32 outputs, so allow float32 rounding on top of C / D
    bound = with_all.clipping_norm / with_all.denominator
    assert np.linalg.norm(flat(full) - flat(reduced)) <= bound * (1 + 1e-5) + 1e-6


def test_noise_std_matches_the_formula():
    # Prepare: every client returns the global model, so the update is pure noise
    big = {"w": np.zeros((400, 500), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
    strategy = dp_strategy(noise_multiplier=1.3, clipping_norm=0.7, sample_rate=0.5, num_clients=20)
    start_round(strategy, arrays=big, nodes=range(1, 21))
    replies = [model_reply(i, big, 10) for i in range(1, 6)]

    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)

    # Assert: 200,000 samples; the std estimate has relative error ~0.16%, so 2% is loose
    expected = 1.3 * 0.7 / (0.5 * 20)
    assert metrics["noise_std"] == pytest.approx(expected)
    assert np.std(arrays["w"].numpy()) == pytest.approx(expected, rel=0.02)
    assert abs(np.mean(arrays["w"].numpy())) < 0.01 * expected


def test_equal_weights_and_full_participation_match_flowers_fixed_clipping_std():
    # Prepare: Flower's DifferentialPrivacyServerSideFixedClipping adds
    # compute_stdv(z, C, num_sampled) to the unweighted mean of clipped updates.
    strategy = dp_strategy(noise_multiplier=0.8, clipping_norm=2.0, weighted=False)
    start_round(strategy)

    # Execute
    _, metrics = strategy.aggregate_train(1, [model_reply(i, GLOBAL, 5) for i in range(1, 11)])

    # Assert
    assert metrics["noise_std"] == pytest.approx(compute_stdv(0.8, 2.0, 10))



def test_epsilon_user_per_round_matches_dp_accounting_pld():
    # Prepare: 100 clients, q = 0.1, z = 1.0, delta 1e-5
    strategy = dp_strategy(num_clients=100, sample_rate=0.1, noise_multiplier=1.0)
    nodes = range(1, 101)
    epsilons = {}

    # Execute
    for server_round in range(1, 51):
        messages = start_round(strategy, server_round, nodes=nodes)
        replies = [model_reply(m.metadata.dst_node_id, GLOBAL, 10) for m in messages]
        _, metrics = strategy.aggregate_train(server_round, replies)
        epsilons[server_round] = metrics["epsilon_user"]

    # Assert
    for server_round in (1, 10, 50):
        expected = pld_epsilon([(1.0, 0.1, server_round)], delta=1e-5)
        assert epsilons[server_round] == pytest.approx(expected, rel=0.02)
    assert all(epsilons[r] < epsilons[r + 1] for r in range(1, 50))


def test_round_without_valid_replies_still_releases_noise_and_counts():
    # Prepare
    strategy = dp_strategy(noise_multiplier=1.0)
    start_round(strategy)

    # Execute
    arrays, metrics = strategy.aggregate_train(1, [error_reply(1), error_reply(2)])

    # Assert: the exact counts are the operator's; Flower gets only DP outputs.
    assert arrays is not None
    assert np.any(flat(arrays) != 0)
    exact = strategy.train_metrics[1]
    assert exact["num_clients"] == 0 and exact["num_rejected"] == 2
    assert set(metrics) == {"epsilon_user", "clipping_norm", "noise_std", "server_update_norm"}
    assert metrics["epsilon_user"] > 0


def test_poisson_sampling_rate_and_reproducibility():
    # Prepare
    first, second = dp_strategy(sample_rate=0.2, sampling_seed=7), dp_strategy(sample_rate=0.2, sampling_seed=7)
    nodes = range(1, 101)

    # Execute
    sizes = []
    for server_round in range(1, 51):
        a = {m.metadata.dst_node_id for m in start_round(first, server_round, nodes=nodes)}
        b = {m.metadata.dst_node_id for m in start_round(second, server_round, nodes=nodes)}
        assert a == b
        sizes.append(len(a))

    # Assert: mean of 50 Binomial(100, 0.2) draws; std of the mean is 0.57
    assert np.mean(sizes) == pytest.approx(20, abs=2.5)
    assert len(set(sizes)) > 1


def test_budget_stops_before_a_round_that_would_exceed_it():
    # Prepare: z = 1, q = 1 gives epsilon 4.39, 6.58, 8.40 after rounds 1, 2, 3
    strategy = dp_strategy(noise_multiplier=1.0, max_epsilon=7.0)
    for server_round in (1, 2):
        start_round(strategy, server_round)
        strategy.aggregate_train(server_round, [model_reply(1, GLOBAL, 10)])

    # Execute / Assert
    with pytest.raises(StopRun, match="privacy_budget_exhausted") as stop:
        start_round(strategy, 3)
    assert stop.value.reason == "privacy_budget_exhausted"
    assert strategy.epsilon_user <= 7.0
    assert strategy.privacy_summary()["epsilon_user"] == strategy.epsilon_user


def test_adaptive_clipping_calibrates_noise_to_this_rounds_norm_and_tracks_the_quantile():
    # Prepare: update norms 1..10; the median is about 5
    strategy = AdaptiveDPFedAvg(
        num_clients=10, sample_rate=1.0, noise_multiplier=0.0, clipping_norm=0.5,
        target_quantile=0.5, clip_lr=0.2, sampling_seed=0, noise_seed=0,
    )
    norms_used = []

    # Execute
    for server_round in range(1, 201):
        start_round(strategy, server_round)
        replies = []
        for node in range(1, 11):
            arrays = {"w": np.zeros((4, 3), np.float32), "b": np.array([float(node), 0, 0], np.float32)}
            replies.append(model_reply(node, arrays, 10))
        used = strategy.clipping_norm
        _, metrics = strategy.aggregate_train(server_round, replies)
        assert metrics["clipping_norm"] == used
        norms_used.append(used)

    # Assert: oscillates around the median of {1, ..., 10}
    assert 4.0 <= np.mean(norms_used[-50:]) <= 6.5


def test_adaptive_noise_budget_is_split_between_count_and_update():
    # Prepare
    strategy = AdaptiveDPFedAvg(
        num_clients=10, sample_rate=1.0, noise_multiplier=1.0, clipping_norm=1.0,
        clipped_count_stddev=2.0, sampling_seed=0, noise_seed=0,
    )
    start_round(strategy)

    # Execute
    _, metrics = strategy.aggregate_train(1, [model_reply(1, GLOBAL, 10)])

    # Assert: z^-2 = z_update^-2 + (2 sigma_b)^-2, and the total z is accounted
    z_update = (1.0 - 1 / 16) ** -0.5
    assert metrics["noise_std"] == pytest.approx(z_update * 1.0 / 10)
    plain = dp_strategy(noise_multiplier=1.0)
    start_round(plain)
    _, plain_metrics = plain.aggregate_train(1, [model_reply(1, GLOBAL, 10)])
    assert metrics["epsilon_user"] == pytest.approx(plain_metrics["epsilon_user"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sampling": "fixed"}, "strategy.sampling='fixed'"),
        ({"target_delta": 0.2}, r"strategy.target_delta=0.2: must be in \[1e-12, 1/num_clients"),
        ({"sample_rate": 0.0}, "strategy.sample_rate=0.0"),
        ({"noise_multiplier": -1.0}, "strategy.noise_multiplier=-1.0"),
        ({"clipping_norm": 0.0}, "strategy.clipping_norm=0.0"),
        ({"accountant": "gdp"}, "strategy.accountant='gdp'"),
        ({"max_epsilon": -2.0}, "strategy.max_epsilon=-2.0"),
        ({"fraction_evaluate": 0.5}, "strategy.fraction_evaluate=0.5: federated evaluation releases exact"),
        ({"fraction_train": 0.5}, "strategy.fraction_train=0.5: does not apply to DP-FedAvg"),
        ({"min_valid_replies": 2}, "strategy.min_valid_replies=2: does not apply to DP-FedAvg"),
    ],
)
def test_invalid_dp_settings_name_key_and_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        dp_strategy(**overrides)


def test_adaptive_refuses_a_count_noise_that_would_eat_the_budget():
    with pytest.raises(ValueError, match="strategy.clipped_count_stddev=0.4"):
        AdaptiveDPFedAvg(num_clients=10, sample_rate=1.0, noise_multiplier=1.0, clipping_norm=1.0, clipped_count_stddev=0.4)


def test_adaptive_clipping_publishes_the_noised_fraction_and_withholds_the_exact_one():
    # Prepare: three clients, one of them far outside the clipping norm
    strategy = AdaptiveDPFedAvg(
        num_clients=10, sample_rate=1.0, noise_multiplier=1.0, clipping_norm=1.0, sampling_seed=0, noise_seed=0
    )
    start_round(strategy)
    big = {"w": np.full((4, 3), 10.0, np.float32), "b": np.zeros(3, np.float32)}
    replies = [model_reply(1, GLOBAL, 10), model_reply(2, GLOBAL, 10), model_reply(3, big, 10)]

    # Execute
    _, published = strategy.aggregate_train(1, replies)

    # Assert: what Flower logs and the results get is DP output only
    assert set(published) == {
        "epsilon_user", "clipping_norm", "noise_std", "unclipped_fraction_noisy", "server_update_norm"
    }
    exact = strategy.train_metrics[1]
    assert exact["clip_fraction"] == pytest.approx(1 / 3)
    assert exact["num_clients"] == 3 and exact["train_loss"] == 1.0
