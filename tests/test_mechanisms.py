"""Tests for fedpriv.privacy.mechanisms: sensitivity, clipping, noise, adaptive clip."""

import copy
import math
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedpriv.privacy.mechanisms import (
    ClipStats,
    add_gaussian_noise,
    aggregate_clipped,
    bounded_weight,
    clip_to_norm,
    fixed_denominator,
    l2_norm,
    next_clipping_norm,
    noise_std,
    noisy_unclipped_fraction,
)

SHAPES = [(3,), (2, 2)]
# Float32 outputs round the float64 accumulation once per coordinate, and the
# clipped update itself is rounded to float32, so allow a relative 1e-5.
SENSITIVITY_RTOL = 1e-5
NOISE_STD_RTOL = 0.02


def _update(dtype):
    width = 32 if dtype == np.float32 else 64
    bound = float(dtype(1e12))
    values = st.floats(-bound, bound, width=width)
    return st.tuples(*(hnp.arrays(dtype, shape, elements=values) for shape in SHAPES))


@st.composite
def _rounds(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    updates = draw(st.lists(_update(dtype).map(list), min_size=1, max_size=6))
    num_examples = draw(
        st.lists(
            st.integers(1, 10**9), min_size=len(updates), max_size=len(updates)
        )
    )
    weighted = draw(st.booleans())
    weight_cap = draw(st.floats(1.0, 1e6))
    weights = [
        bounded_weight(n, weight_cap=weight_cap, weighted=weighted)
        for n in num_examples
    ]
    clipping_norm = draw(st.floats(1e-3, 1e3))
    denominator = fixed_denominator(
        sample_rate=draw(st.floats(0.01, 1.0)),
        num_clients=draw(st.integers(len(updates), 1000)),
    )
    return updates, weights, clipping_norm, denominator


@settings(max_examples=200, deadline=None)
@given(round_=_rounds(), data=st.data())
def test_removing_one_client_moves_the_aggregate_by_at_most_c_over_d(round_, data):
    # Prepare
    updates, weights, clipping_norm, denominator = round_
    removed = data.draw(st.integers(0, len(updates) - 1))
    like = [np.zeros_like(array) for array in updates[0]]

    # Execute
    with_all, _ = aggregate_clipped(
        updates, weights, clipping_norm=clipping_norm, denominator=denominator
    )
    without_one, _ = aggregate_clipped(
        updates[:removed] + updates[removed + 1 :],
        weights[:removed] + weights[removed + 1 :],
        clipping_norm=clipping_norm,
        denominator=denominator,
        like=like,
    )

    # Assert
    difference = l2_norm(
        [
            a.astype(np.float64) - b.astype(np.float64)
            for a, b in zip(with_all, without_one)
        ]
    )
    sensitivity = clipping_norm / denominator
    assert difference <= sensitivity * (1 + SENSITIVITY_RTOL * len(updates))


@settings(max_examples=200, deadline=None)
@given(
    update=st.sampled_from([np.float32, np.float64]).flatmap(_update),
    clipping_norm=st.floats(1e-3, 1e3),
)
def test_clipping_never_increases_the_norm(update, clipping_norm):
    # Prepare
    arrays = list(update)
    original = copy.deepcopy(arrays)

    # Execute
    clipped, norm = clip_to_norm(arrays, clipping_norm=clipping_norm)

    # Assert
    assert norm == pytest.approx(l2_norm(original))
    assert l2_norm(clipped) <= min(norm, clipping_norm) * (1 + 1e-6)
    if norm <= clipping_norm:
        assert all(np.array_equal(a, b) for a, b in zip(clipped, original))
    assert all(a.dtype == b.dtype for a, b in zip(clipped, original))
    assert all(np.array_equal(a, b) for a, b in zip(arrays, original))


def test_l2_norm_is_the_norm_of_the_flattened_update():
    # Prepare
    arrays = [np.array([3.0], dtype=np.float32), np.array([[4.0, 12.0]])]

    # Execute
    norm = l2_norm(arrays)

    # Assert
    assert norm == 13.0


def test_clipping_handles_finite_updates_whose_squares_overflow():
    # Prepare
    arrays = [np.full(4, 1e200)]

    # Execute
    clipped, norm = clip_to_norm(arrays, clipping_norm=1.0)

    # Assert
    assert norm == pytest.approx(2e200)
    assert l2_norm(clipped) == pytest.approx(1.0)


def test_clipping_rejects_non_finite_updates():
    # Prepare
    arrays = [np.array([1.0, np.nan])]

    # Execute / Assert
    with pytest.raises(ValueError, match=r"update norm=nan: must be finite"):
        clip_to_norm(arrays, clipping_norm=1.0)


def test_aggregate_reports_clip_statistics_without_mutating_inputs():
    # Prepare
    updates = [
        [np.array([3.0, 4.0], dtype=np.float32)],
        [np.array([0.3, 0.4], dtype=np.float32)],
    ]
    weights = [1.0, 0.5]
    original = copy.deepcopy(updates)

    # Execute
    aggregate, stats = aggregate_clipped(
        updates, weights, clipping_norm=1.0, denominator=2.0
    )

    # Assert
    expected = (np.array([0.6, 0.8]) + 0.5 * np.array([0.3, 0.4])) / 2.0
    np.testing.assert_allclose(aggregate[0], expected, rtol=1e-6)
    assert aggregate[0].dtype == np.float32
    assert stats.norms == pytest.approx((5.0, 0.5))
    assert (stats.num_clipped, stats.clip_fraction) == (1, 0.5)
    assert all(
        np.array_equal(a[0], b[0]) for a, b in zip(updates, original)
    )


def test_aggregate_of_no_updates_is_zeros_like_the_template():
    # Prepare
    like = [np.ones((2, 3), dtype=np.float32), np.ones(4)]

    # Execute
    aggregate, stats = aggregate_clipped(
        [], [], clipping_norm=1.0, denominator=5.0, like=like
    )

    # Assert
    assert [a.shape for a in aggregate] == [(2, 3), (4,)]
    assert [a.dtype for a in aggregate] == [np.float32, np.float64]
    assert all(not a.any() for a in aggregate)
    assert stats == ClipStats(norms=(), num_clipped=0, clip_fraction=0.0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: aggregate_clipped([], [], clipping_norm=1.0, denominator=1.0),
            r"like=None: required when updates is empty",
        ),
        (
            lambda: aggregate_clipped(
                [[np.ones(2)]], [1.5], clipping_norm=1.0, denominator=1.0
            ),
            r"weights\[0\]=1\.5: must be in \(0, 1\]",
        ),
        (
            lambda: aggregate_clipped(
                [[np.ones(2)]], [1.0, 1.0], clipping_norm=1.0, denominator=1.0
            ),
            r"len\(weights\)=2: must equal len\(updates\)=1",
        ),
        (
            lambda: aggregate_clipped(
                [[np.ones(2)], [np.ones(3)]],
                [1.0, 1.0],
                clipping_norm=1.0,
                denominator=1.0,
            ),
            r"updates\[1\] shapes=\[\(3,\)\]: must equal \[\(2,\)\]",
        ),
        (
            lambda: clip_to_norm([np.ones(2)], clipping_norm=0.0),
            r"strategy\.clipping_norm=0\.0: must be > 0",
        ),
        (
            lambda: bounded_weight(10, weight_cap=0, weighted=True),
            r"strategy\.weight_cap=0: must be > 0",
        ),
        (
            lambda: bounded_weight(0, weight_cap=10.0, weighted=False),
            r"num_examples=0: must be > 0",
        ),
        (
            lambda: fixed_denominator(sample_rate=1.5, num_clients=10),
            r"strategy\.sample_rate=1\.5: must be in \(0, 1\]",
        ),
        (
            lambda: fixed_denominator(sample_rate=0.5, num_clients=0),
            r"num_clients=0: must be an integer >= 1",
        ),
        (
            lambda: noise_std(
                noise_multiplier=-1.0, clipping_norm=1.0, denominator=1.0
            ),
            r"strategy\.noise_multiplier=-1\.0: must be >= 0",
        ),
        (
            lambda: add_gaussian_noise(
                [np.ones(2)], std=-0.1, rng=np.random.default_rng(0)
            ),
            r"std=-0\.1: must be >= 0",
        ),
        (
            lambda: next_clipping_norm(
                clipping_norm=1.0,
                unclipped_fraction=0.5,
                target_quantile=1.0,
                clip_lr=0.2,
            ),
            r"strategy\.target_quantile=1\.0: must be in \(0, 1\)",
        ),
        (
            lambda: next_clipping_norm(
                clipping_norm=1.0,
                unclipped_fraction=0.5,
                target_quantile=0.5,
                clip_lr=0.0,
            ),
            r"strategy\.clip_lr=0\.0: must be > 0",
        ),
        (
            lambda: noisy_unclipped_fraction(
                [1.0],
                clipping_norm=1.0,
                count_stddev=-1.0,
                expected_num_clients=1.0,
                rng=np.random.default_rng(0),
            ),
            r"strategy\.clipped_count_stddev=-1\.0: must be >= 0",
        ),
    ],
)
def test_errors_name_the_key_and_the_value(call, message):
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    ("num_examples", "weighted", "expected"),
    [(50, True, 0.5), (10**9, True, 1.0), (1, False, 1.0)],
)
def test_bounded_weight_caps_at_one(num_examples, weighted, expected):
    # Execute
    weight = bounded_weight(num_examples, weight_cap=100.0, weighted=weighted)

    # Assert
    assert weight == expected


def test_fixed_denominator_is_the_expected_number_of_sampled_clients():
    # Execute
    denominator = fixed_denominator(sample_rate=0.1, num_clients=100)

    # Assert
    assert denominator == pytest.approx(10.0)


def test_empirical_noise_std_matches_noise_std_within_two_percent():
    # Prepare
    std = noise_std(
        noise_multiplier=1.1,
        clipping_norm=0.7,
        denominator=fixed_denominator(sample_rate=0.3, num_clients=10),
    )
    arrays = [np.zeros(150_000, dtype=np.float32), np.zeros((500, 100))]
    original = copy.deepcopy(arrays)

    # Execute
    noisy = add_gaussian_noise(arrays, std=std, rng=np.random.default_rng(1234))

    # Assert
    empirical = np.concatenate([a.ravel().astype(np.float64) for a in noisy]).std()
    assert empirical == pytest.approx(std, rel=NOISE_STD_RTOL)
    assert [a.dtype for a in noisy] == [np.float32, np.float64]
    assert all(np.array_equal(a, b) for a, b in zip(arrays, original))


def test_zero_noise_returns_copies():
    # Prepare
    arrays = [np.arange(3.0)]

    # Execute
    noisy = add_gaussian_noise(arrays, std=0.0, rng=np.random.default_rng(0))

    # Assert
    np.testing.assert_array_equal(noisy[0], arrays[0])
    assert noisy[0] is not arrays[0]


def test_unclipped_fraction_without_noise_counts_norms_up_to_c():
    # Prepare
    norms = (0.5, 2.0, 1.0)

    # Execute
    fraction = noisy_unclipped_fraction(
        norms,
        clipping_norm=1.0,
        count_stddev=0.0,
        expected_num_clients=3.0,
        rng=np.random.default_rng(0),
    )

    # Assert
    assert fraction == pytest.approx(2 / 3)


def test_clipping_norm_shrinks_when_too_many_updates_fit():
    # Execute
    shrunk = next_clipping_norm(
        clipping_norm=2.0, unclipped_fraction=0.9, target_quantile=0.5, clip_lr=0.2
    )
    grown = next_clipping_norm(
        clipping_norm=2.0, unclipped_fraction=0.1, target_quantile=0.5, clip_lr=0.2
    )

    # Assert
    assert shrunk == pytest.approx(2.0 * math.exp(-0.08))
    assert grown == pytest.approx(2.0 * math.exp(0.08))


@pytest.mark.parametrize("target_quantile", [0.5, 0.8])
def test_adaptive_clipping_converges_to_the_target_quantile(target_quantile):
    # Prepare: lognormal update norms, 100 clients a round, little count noise.
    rng = np.random.default_rng(7)
    mu, sigma, clients = 0.0, 0.5, 100
    expected = math.exp(mu + sigma * NormalDist().inv_cdf(target_quantile))
    clipping_norm, log_norms = 0.1, []

    # Execute
    for _ in range(300):
        norms = rng.lognormal(mu, sigma, clients)
        fraction = noisy_unclipped_fraction(
            norms,
            clipping_norm=clipping_norm,
            count_stddev=0.5,
            expected_num_clients=clients,
            rng=rng,
        )
        clipping_norm = next_clipping_norm(
            clipping_norm=clipping_norm,
            unclipped_fraction=fraction,
            target_quantile=target_quantile,
            clip_lr=0.2,
        )
        log_norms.append(math.log(clipping_norm))

    # Assert
    assert math.exp(np.mean(log_norms[-100:])) == pytest.approx(expected, rel=0.10)


def test_noise_matches_flower_server_side_fixed_clipping_with_full_participation():
    # Prepare: equal weights and q = 1, Flower's setting.
    from flwr.supercore.differential_privacy import clip_inputs_inplace, compute_stdv

    rng = np.random.default_rng(3)
    num_clients, noise_multiplier, clipping_norm = 8, 1.3, 0.5
    updates = [
        [rng.normal(size=(4, 3)), rng.normal(size=5)] for _ in range(num_clients)
    ]
    flower_clipped = copy.deepcopy(updates)
    for update in flower_clipped:
        clip_inputs_inplace(update, clipping_norm)
    denominator = fixed_denominator(sample_rate=1.0, num_clients=num_clients)

    # Execute
    std = noise_std(
        noise_multiplier=noise_multiplier,
        clipping_norm=clipping_norm,
        denominator=denominator,
    )
    aggregate, _ = aggregate_clipped(
        updates,
        [bounded_weight(1, weight_cap=1.0, weighted=False)] * num_clients,
        clipping_norm=clipping_norm,
        denominator=denominator,
    )

    # Assert
    assert std == compute_stdv(noise_multiplier, clipping_norm, num_clients)
    for layer, flower_layers in zip(aggregate, zip(*flower_clipped)):
        np.testing.assert_allclose(layer, np.mean(flower_layers, axis=0), rtol=1e-12)
