"""Tests for fedpriv.privacy.accounting, checked against Google's dp_accounting."""

import copy
import math
import subprocess
import sys

import dp_accounting
import numpy as np
import pytest
from conftest import REPO, pld_epsilon
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from fedpriv.privacy.accounting import (
    ACCOUNTANTS,
    adaptive_clipping_noise,
    compute_epsilon,
    history_from_lists,
    history_to_lists,
    make_accountant,
    record_steps,
    solve_noise_multiplier,
)

# Epsilons from dp_accounting 0.6.0's PLD accountant (add/remove-one adjacency,
# value_discretization_interval=1e-4); they are also recomputed live below.
PLD_CASES = {
    "client_level_q0.1_z1.0_100_rounds": ([(1.0, 0.1, 100)], 1e-5, 7.046603),
    "record_level_q0.25_z1.1_50_steps": ([(1.1, 0.25, 50)], 1e-5, 10.796578),
    "record_level_q0.15_z1.5_100_steps": ([(1.5, 0.15, 100)], 1e-5, 5.501502),
    "record_level_q0.2_z1.0_200_steps": ([(1.0, 0.2, 200)], 1e-5, 21.540954),
    "q0.1_z1.2_200_steps_delta1e-3": ([(1.2, 0.1, 200)], 1e-3, 5.085043),
    "mixed_z1.0_then_z2.0": ([(1.0, 0.1, 60), (2.0, 0.1, 40)], 1e-5, 5.778127),
    "full_participation_q1": ([(1.0, 1.0, 10)], 1e-5, 17.856587),
}
PRV_RTOL = 0.02
RDP_MAX_RATIO = 1.25


@pytest.fixture(scope="module")
def live_pld():
    return {
        name: pld_epsilon(history, delta=delta)
        for name, (history, delta, _) in PLD_CASES.items()
    }


@pytest.mark.parametrize("name", PLD_CASES)
def test_live_pld_reproduces_stored_constant(name, live_pld):
    # Prepare
    _, _, stored = PLD_CASES[name]

    # Execute
    live = live_pld[name]

    # Assert
    assert live == pytest.approx(stored, rel=1e-5)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("name", PLD_CASES)
def test_prv_epsilon_matches_pld_within_two_percent(name, live_pld):
    # Prepare
    history, delta, stored = PLD_CASES[name]

    # Execute
    epsilon = compute_epsilon(history, delta=delta, accountant="prv")

    # Assert
    assert epsilon == pytest.approx(stored, rel=PRV_RTOL)
    assert epsilon == pytest.approx(live_pld[name], rel=PRV_RTOL)


@pytest.mark.parametrize("name", PLD_CASES)
def test_rdp_epsilon_is_a_loose_upper_bound_on_pld(name, live_pld):
    # Prepare
    history, delta, stored = PLD_CASES[name]

    # Execute
    epsilon = compute_epsilon(history, delta=delta, accountant="rdp")

    # Assert
    for reference in (stored, live_pld[name]):
        assert reference * 0.999 <= epsilon <= reference * RDP_MAX_RATIO


def test_empty_history_spends_nothing():
    # Prepare
    history = []

    # Execute
    epsilon = compute_epsilon(history, delta=1e-5)

    # Assert
    assert epsilon == 0.0


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_release_without_noise_has_infinite_epsilon(accountant):
    # Prepare
    history = [(1.0, 0.1, 10), (0.0, 0.1, 1)]

    # Execute
    epsilon = compute_epsilon(history, delta=1e-5, accountant=accountant)

    # Assert
    assert epsilon == math.inf


def test_entries_without_releases_are_free():
    # Prepare
    history = [(0.0, 0.1, 0), (0.0, 0.0, 5), (1.0, 0.1, 100)]

    # Execute
    epsilon = compute_epsilon(history, delta=1e-5)

    # Assert
    assert epsilon == compute_epsilon([(1.0, 0.1, 100)], delta=1e-5)


@settings(max_examples=6, deadline=None)
@given(
    noise_multiplier=st.floats(0.8, 3.0),
    sample_rate=st.floats(0.01, 0.5),
    steps=st.integers(1, 120),
    extra_steps=st.integers(1, 30),
    accountant=st.sampled_from(ACCOUNTANTS),
)
def test_more_steps_cost_strictly_more(
    noise_multiplier, sample_rate, steps, extra_steps, accountant
):
    # Prepare
    shorter = [(noise_multiplier, sample_rate, steps)]
    longer = [(noise_multiplier, sample_rate, steps + extra_steps)]

    # Execute
    before = compute_epsilon(shorter, delta=1e-5, accountant=accountant)
    after = compute_epsilon(longer, delta=1e-5, accountant=accountant)

    # Assert
    assert after > before


@pytest.mark.parametrize(
    ("accountant", "history", "target_epsilon"),
    [
        ("prv", (), 7.0),
        ("prv", ((1.0, 0.1, 30),), 5.0),
        ("rdp", (), 2.0),
    ],
)
def test_solved_noise_multiplier_meets_the_budget_tightly(
    accountant, history, target_epsilon
):
    # Prepare
    sample_rate, steps = 0.1, 100

    # Execute
    noise_multiplier = solve_noise_multiplier(
        target_epsilon=target_epsilon,
        delta=1e-5,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
        history=history,
    )
    epsilon = compute_epsilon(
        record_steps(
            history,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
        ),
        delta=1e-5,
        accountant=accountant,
    )

    # Assert
    assert target_epsilon * 0.97 <= epsilon <= target_epsilon


def test_solve_rejects_a_budget_already_spent():
    # Prepare
    history = [(1.0, 0.1, 100)]

    # Execute / Assert
    with pytest.raises(ValueError, match=r"target_epsilon=5\.0: unreachable"):
        solve_noise_multiplier(
            target_epsilon=5.0,
            delta=1e-5,
            sample_rate=0.1,
            steps=10,
            history=history,
        )


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_solve_rejects_a_budget_below_the_accountant_floor():
    # Prepare
    target_epsilon = 1e-3

    # Execute / Assert
    with pytest.raises(ValueError, match=r"target_epsilon=0\.001: unreachable"):
        solve_noise_multiplier(
            target_epsilon=target_epsilon, delta=1e-5, sample_rate=0.1, steps=10
        )


@settings(max_examples=50, deadline=None)
@given(
    history=st.lists(
        st.tuples(
            st.floats(0.0, 100.0),
            st.floats(0.0, 1.0),
            st.integers(0, 10**6),
        ),
        max_size=5,
    )
)
def test_history_round_trips_through_lists(history):
    # Prepare
    original = copy.deepcopy(history)

    # Execute
    lists = history_to_lists(history)
    restored = history_from_lists(lists)

    # Assert
    assert restored == original
    assert history == original
    assert all(isinstance(steps, int) for steps in lists["steps"])


def test_history_from_lists_rejects_unequal_lengths():
    # Prepare
    lists = {"noise_multipliers": [1.0, 2.0], "sample_rates": [0.1], "steps": [3, 4]}

    # Execute / Assert
    with pytest.raises(ValueError, match=r"lengths=.*must all be equal"):
        history_from_lists(lists)


def test_history_from_lists_names_a_missing_key():
    # Prepare
    lists = {"noise_multipliers": [1.0], "steps": [3]}

    # Execute / Assert
    with pytest.raises(ValueError, match=r"sample_rates: missing"):
        history_from_lists(lists)


def test_record_steps_merges_equal_events_like_opacus_without_mutating():
    # Prepare
    history = [(2.0, 0.1, 4), (1.0, 0.1, 5)]
    original = copy.deepcopy(history)
    opacus_accountant = RDPAccountant()
    opacus_accountant.history = copy.deepcopy(history)
    for _ in range(3):
        opacus_accountant.step(noise_multiplier=1.0, sample_rate=0.1)

    # Execute
    merged = record_steps(history, noise_multiplier=1.0, sample_rate=0.1, steps=3)

    # Assert
    assert merged == [(2.0, 0.1, 4), (1.0, 0.1, 8)]
    assert merged == opacus_accountant.history
    assert history == original


def test_record_steps_appends_a_different_event():
    # Prepare
    history = ((1.0, 0.1, 5),)

    # Execute
    extended = record_steps(history, noise_multiplier=1.0, sample_rate=0.2)

    # Assert
    assert extended == [(1.0, 0.1, 5), (1.0, 0.2, 1)]
    assert history == ((1.0, 0.1, 5),)


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_make_accountant_returns_a_fresh_opacus_accountant(name):
    # Execute
    accountant = make_accountant(name)

    # Assert
    assert accountant.mechanism() == name
    assert accountant.history == []


def test_make_accountant_lists_valid_names():
    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"accountant='gdp': must be one of \('prv', 'rdp'\)"
    ):
        make_accountant("gdp")


def test_adaptive_clipping_noise_follows_andrew_et_al():
    # Prepare
    noise_multiplier, clipped_count_stddev = 1.0, 5.0

    # Execute
    update_noise = adaptive_clipping_noise(
        noise_multiplier=noise_multiplier, clipped_count_stddev=clipped_count_stddev
    )

    # Assert
    assert update_noise == pytest.approx((1.0 - 1.0 / 100.0) ** -0.5)
    assert update_noise**-2 + (2 * clipped_count_stddev) ** -2 == pytest.approx(
        noise_multiplier**-2
    )


def test_adaptive_clipping_pair_is_one_gaussian_with_the_total_multiplier():
    # Prepare: the update sum (sensitivity C, noise z_delta * C) and the centred
    # count (sensitivity 1/2, noise sigma_b), each as a unit-sensitivity Gaussian.
    noise_multiplier, clipped_count_stddev = 1.0, 2.0
    update_noise = adaptive_clipping_noise(
        noise_multiplier=noise_multiplier, clipped_count_stddev=clipped_count_stddev
    )
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)

    # Execute
    accountant.compose(
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.GaussianDpEvent(update_noise),
                dp_accounting.GaussianDpEvent(2 * clipped_count_stddev),
            ]
        )
    )
    pair = accountant.get_epsilon(1e-5)

    # Assert
    single = dp_accounting.get_epsilon_gaussian(noise_multiplier, 1e-5)
    assert pair == pytest.approx(single, rel=1e-4)


def test_adaptive_clipping_noise_matches_flower():
    # Prepare
    from flwr.supercore.differential_privacy import compute_adaptive_noise_params

    # Execute
    ours = adaptive_clipping_noise(noise_multiplier=1.2, clipped_count_stddev=3.0)

    # Assert
    _, flower = compute_adaptive_noise_params(1.2, 60, 3.0)
    assert ours == pytest.approx(flower)


def test_adaptive_clipping_noise_without_noise_is_zero():
    # Execute
    update_noise = adaptive_clipping_noise(
        noise_multiplier=0.0, clipped_count_stddev=0.0
    )

    # Assert
    assert update_noise == 0.0


def test_adaptive_clipping_noise_names_the_minimum_count_stddev():
    # Execute / Assert
    with pytest.raises(
        ValueError,
        match=r"strategy\.clipped_count_stddev=0\.5: must be > "
        r"strategy\.noise_multiplier / 2 = 0\.5",
    ):
        adaptive_clipping_noise(noise_multiplier=1.0, clipped_count_stddev=0.5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: compute_epsilon([], delta=0.0), r"delta=0\.0: must be in \(0, 1\)"),
        (lambda: compute_epsilon([], delta=1e-5, accountant="x"), r"accountant='x'"),
        (
            lambda: compute_epsilon([(1.0, 1.5, 3)], delta=1e-5),
            r"history\[0\]\.sample_rate=1\.5: must be in \[0, 1\]",
        ),
        (
            lambda: compute_epsilon([(1.0, 0.1, 2.0)], delta=1e-5),
            r"history\[0\]\.steps=2\.0: must be an integer",
        ),
        (
            lambda: record_steps([], noise_multiplier=-1.0, sample_rate=0.1),
            r"noise_multiplier=-1\.0: must be >= 0",
        ),
        (
            lambda: record_steps([], noise_multiplier=1.0, sample_rate=0.1, steps=0),
            r"steps=0: must be an integer >= 1",
        ),
        (
            lambda: solve_noise_multiplier(
                target_epsilon=-1.0, delta=1e-5, sample_rate=0.1, steps=1
            ),
            r"target_epsilon=-1\.0: must be > 0",
        ),
        (
            lambda: solve_noise_multiplier(
                target_epsilon=1.0, delta=1e-5, sample_rate=0.0, steps=1
            ),
            r"sample_rate=0\.0: must be > 0",
        ),
        (
            lambda: compute_epsilon([(math.nan, 0.1, 3)], delta=1e-5),
            r"history\[0\]\.noise_multiplier=nan: must be finite",
        ),
    ],
)
def test_errors_name_the_key_and_the_value(call, message):
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@pytest.mark.parametrize(
    "history",
    [[(1.0, 0.04, 500)], [(1.0, 0.1, 60), (2.0, 0.1, 40)], [(1.0, 1.0, 10)], [(0.7, 0.3, 7), (1.3, 0.05, 300)]],
)
def test_cached_rdp_gives_opacus_epsilon_bit_for_bit(accountant, history):
    # Prepare: Opacus' own accountant, which recomputes every RDP vector
    stock = make_accountant(accountant)
    stock.history = list(history)
    with np.errstate(divide="ignore"):
        expected = float(stock.get_epsilon(delta=1e-5))

    # Execute: twice, so the second call reads the cache
    first = compute_epsilon(history, delta=1e-5, accountant=accountant)
    second = compute_epsilon(history, delta=1e-5, accountant=accountant)

    # Assert
    assert first == second == expected


def test_the_strategies_and_clients_import_opacus_only_when_an_epsilon_is_asked_for():
    # Prepare: a fresh interpreter, as a run's server and workers are
    code = (
        "import sys; import strategies.server_app, clients.client_app; "
        "before = 'opacus' in sys.modules; "
        "from fedpriv.privacy.accounting import compute_epsilon; "
        "compute_epsilon([(1.0, 0.01, 10)], delta=1e-5); "
        "print(before, 'opacus' in sys.modules)"
    )

    # Execute
    printed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()

    # Assert: a run without DP never pays Opacus' import
    assert printed == ["False", "True"]
