"""Robust aggregation: against Flower's reference implementations on random inputs, and against poisoning."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FakeGrid, arrays_record, reply
from flwr.app import ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import WeightedFedAvg
from strategies.robust import RobustAggregation, coordinate_median, krum_choice, trimmed_mean

SHAPES = {"w": (3, 2), "b": (2,)}


def random_models(seed: int, count: int) -> list[list[np.ndarray]]:
    """``count`` random float32 models of SHAPES, at different scales."""
    rng = np.random.default_rng(seed)
    return [
        [(rng.standard_normal(shape) * rng.uniform(0.1, 10)).astype(np.float32) for shape in SHAPES.values()]
        for _ in range(count)
    ]


def as_replies(models: list[list[np.ndarray]], counts: list[int]):
    return [
        reply(node_id, dict(zip(SHAPES, model, strict=True)), {"num-examples": n, "train_loss": 1.0})
        for node_id, (model, n) in enumerate(zip(models, counts, strict=True), start=1)
    ]


def aggregate_with(strategy, models, counts):
    """The strategy's aggregate of ``models`` (Flower's strategies consume their replies: fresh ones each).

    Only ours needs to know the model it sent; Flower's would wait for two
    nodes in ``configure_train``.
    """
    if isinstance(strategy, WeightedFedAvg):
        zeros = arrays_record({name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()})
        strategy.configure_train(1, zeros, ConfigRecord(), FakeGrid(range(1, len(models) + 1)))
    arrays, _ = strategy.aggregate_train(1, as_replies(models, counts))
    return [arrays[name].numpy() for name in SHAPES]


models_and_counts = st.integers(1, 9).flatmap(
    lambda n: st.tuples(st.integers(0, 2**32 - 1), st.lists(st.integers(1, 10**4), min_size=n, max_size=n))
)


@settings(max_examples=40, deadline=None)
@given(case=models_and_counts)
def test_median_matches_flowers_on_random_inputs(case):
    from flwr.server.strategy.aggregate import aggregate_median
    from flwr.serverapp.strategy import FedMedian

    # Prepare
    seed, counts = case
    models = random_models(seed, len(counts))

    # Execute
    ours = coordinate_median(models)
    strategy = aggregate_with(WeightedFedAvg(aggregator="median"), models, counts)
    flower = aggregate_with(FedMedian(), models, counts)

    # Assert
    for a, b, c in zip(ours, aggregate_median([(m, n) for m, n in zip(models, counts, strict=True)]), flower, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    for a, b in zip(strategy, flower, strict=True):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=40, deadline=None)
@given(case=models_and_counts, trim_fraction=st.floats(0.0, 0.49))
def test_trimmed_mean_matches_flowers_on_random_inputs(case, trim_fraction):
    from flwr.server.strategy.aggregate import aggregate_trimmed_avg
    from flwr.serverapp.strategy import FedTrimmedAvg

    # Prepare
    seed, counts = case
    models = random_models(seed, len(counts))

    # Execute
    ours = trimmed_mean(models, trim_fraction=trim_fraction)
    legacy = aggregate_trimmed_avg([(m, n) for m, n in zip(models, counts, strict=True)], trim_fraction)
    strategy = aggregate_with(WeightedFedAvg(aggregator="trimmed_mean", trim_fraction=trim_fraction), models, counts)
    flower = aggregate_with(FedTrimmedAvg(beta=trim_fraction), models, counts)

    # Assert: the same values are kept; only the order of the float32 sum may differ
    for a, b, c, d in zip(ours, legacy, strategy, flower, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c, d, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(case=models_and_counts, num_byzantine=st.integers(0, 4))
def test_krum_matches_flowers_on_random_inputs(case, num_byzantine):
    from flwr.server.strategy.aggregate import aggregate_krum
    from flwr.serverapp.strategy import Krum

    # Prepare
    seed, counts = case
    models = random_models(seed, len(counts))

    # Execute
    chosen = krum_choice(models, num_byzantine=num_byzantine)
    legacy = aggregate_krum([(m, n) for m, n in zip(models, counts, strict=True)], num_byzantine, 0)
    strategy = aggregate_with(WeightedFedAvg(aggregator="krum", num_byzantine=num_byzantine), models, counts)
    flower = aggregate_with(Krum(num_malicious_nodes=num_byzantine), models, counts)

    # Assert: the same client's model, exactly, as Flower's legacy function and through the strategy
    for ours, b, c in zip(models[chosen], legacy, strategy, strict=True):
        np.testing.assert_array_equal(ours, b)
        np.testing.assert_array_equal(ours, c)
    # Flower's message-API Krum breaks ties of the score by an unstable sort (and re-averages the
    # model it keeps): it must keep a model of the lowest score, which is ours when there is no tie.
    flat = np.stack([np.concatenate([a.ravel() for a in m]).astype(np.float64) for m in models])
    distances = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    closest = max(1, len(models) - num_byzantine - 2)
    scores = np.array([np.sort(row)[1 : closest + 1].sum() for row in distances])
    kept = int(np.argmin([np.abs(np.concatenate([a.ravel() for a in m]) - np.concatenate([a.ravel() for a in flower])).max()
                          for m in models]))
    assert scores[kept] == pytest.approx(scores.min(), rel=1e-9)
    assert scores[chosen] == scores.min()


def poisoned_round(aggregator: str, **settings) -> tuple[np.ndarray, dict]:
    """Eight honest clients near +1, two sending -10 times that update, through the strategy."""
    rng = np.random.default_rng(7)
    honest = [[np.full(shape, 1.0, np.float32) + 0.05 * rng.standard_normal(shape).astype(np.float32)
               for shape in SHAPES.values()] for _ in range(8)]
    poisoned = [[-10 * layer for layer in honest[i]] for i in range(2)]
    strategy = WeightedFedAvg(aggregator=aggregator, **settings)
    models = poisoned + honest
    arrays = aggregate_with(strategy, models, [100] * len(models))
    return np.concatenate([a.ravel() for a in arrays]), strategy.train_metrics[1]


@pytest.mark.parametrize(
    ("aggregator", "settings"),
    [("median", {}), ("trimmed_mean", {"trim_fraction": 0.2}), ("krum", {"num_byzantine": 2})],
)
def test_two_clients_scaling_their_update_by_minus_ten_move_a_robust_aggregate_little(aggregator, settings):
    # Execute
    mean, _ = poisoned_round("mean")
    robust, metrics = poisoned_round(aggregator, **settings)

    # Assert: the mean is dragged to (8 - 20) / 10 = -1.2; the robust rules stay near the honest +1
    np.testing.assert_allclose(mean, -1.2, atol=0.1)
    np.testing.assert_allclose(robust, 1.0, atol=0.2)
    if aggregator == "krum":
        assert metrics["krum_node_id"] > 2  # an honest node (1 and 2 are the poisoned ones)
    if aggregator == "trimmed_mean":
        assert metrics["trimmed_per_coordinate"] == 4


def test_robust_rules_ignore_num_examples():
    # Prepare: one client claims a huge count
    models = random_models(3, 5)

    # Execute
    equal = aggregate_with(WeightedFedAvg(aggregator="median"), models, [10] * 5)
    claimed = aggregate_with(WeightedFedAvg(aggregator="median"), models, [10, 10, 10, 10, 10**9])

    # Assert
    for a, b in zip(equal, claimed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_combining_writes_into_nothing_it_is_given():
    # Prepare
    models = random_models(5, 4)
    before = [[layer.copy() for layer in model] for model in models]

    # Execute
    for name in ("median", "trimmed_mean", "krum"):
        RobustAggregation(name=name).combine(models, node_ids=[1, 2, 3, 4])

    # Assert
    for model, kept in zip(models, before, strict=True):
        for layer, copy in zip(model, kept, strict=True):
            np.testing.assert_array_equal(layer, copy)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "geomed"}, "strategy.aggregator='geomed': must be one of"),
        ({"trim_fraction": 0.5}, "strategy.trim_fraction=0.5: must be in [0, 0.5)"),
        ({"num_byzantine": -1}, "strategy.num_byzantine=-1: must be an integer in [0, 10000000]"),
        ({"num_byzantine": 1.5}, "strategy.num_byzantine=1.5: must be an integer"),
    ],
)
def test_invalid_settings_name_key_and_value(kwargs, message):
    with pytest.raises(ValueError) as refused:
        RobustAggregation(**kwargs)
    assert str(refused.value).startswith(message)
