"""The privacy ledger every party keeps: releases in, epsilon out, state to and from records."""

from __future__ import annotations

import inspect

import pytest
from conftest import pld_epsilon
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant

from fedpriv.privacy.ledger import PrivacyLedger


def test_a_count_release_then_dp_sgd_steps_match_pld():
    # Prepare: a client's noisy count, then three rounds of 10 steps
    ledger = PrivacyLedger()
    ledger.record(noise_multiplier=10.0, sample_rate=1.0)

    # Execute
    for _ in range(3):
        ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=10)

    # Assert
    assert ledger.history == [(10.0, 1.0, 1), (1.0, 0.1, 30)]
    assert ledger.releases == 31
    expected = pld_epsilon(ledger.history, delta=1e-5)
    assert ledger.epsilon(1e-5) == pytest.approx(expected, rel=0.02)


def test_after_projects_without_changing_the_ledger():
    # Prepare
    ledger = PrivacyLedger(history=[(1.0, 0.1, 5)])

    # Execute
    projected = ledger.after(noise_multiplier=1.0, sample_rate=0.1, steps=5)

    # Assert
    assert ledger.history == [(1.0, 0.1, 5)]
    assert projected.history == [(1.0, 0.1, 10)]
    assert projected.epsilon(1e-5) > ledger.epsilon(1e-5)


def test_the_budget_check_answers_the_epsilon_only_when_it_would_be_exceeded():
    # Prepare
    ledger = PrivacyLedger(history=[(1.0, 1.0, 2)])
    release = {"noise_multiplier": 1.0, "sample_rate": 1.0}
    next_epsilon = ledger.after(**release).epsilon(1e-5)

    # Execute
    over = ledger.epsilon_if_over(max_epsilon=next_epsilon - 0.01, delta=1e-5, **release)
    within = ledger.epsilon_if_over(max_epsilon=next_epsilon + 0.01, delta=1e-5, **release)
    unlimited = ledger.epsilon_if_over(max_epsilon=None, delta=1e-5, **release)

    # Assert
    assert over == pytest.approx(next_epsilon)
    assert within is None and unlimited is None


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.5, 20.0), st.floats(0.001, 1.0), st.integers(1, 1000)), min_size=1, max_size=5
    )
)
def test_state_round_trips_through_a_record(history):
    # Prepare
    ledger = PrivacyLedger(accountant="rdp", history=history)

    # Execute
    restored = PrivacyLedger(accountant="rdp")
    restored.load_state_dict(ledger.state_dict())

    # Assert
    assert restored.history == ledger.history
    assert restored.epsilon(1e-5) == ledger.epsilon(1e-5)


def test_a_bad_accountant_is_named():
    with pytest.raises(ValueError, match="accountant='gdp'"):
        PrivacyLedger(accountant="gdp")


def test_opacus_prv_domain_hook_is_still_what_fedpriv_overrides():
    # fedpriv.privacy.accounting caches the RDP vectors of Opacus' PRV domain
    # bound by overriding PRVAccountant._get_domain. If Opacus renames it or
    # changes its arguments, the override would silently stop applying.
    parameters = list(inspect.signature(PRVAccountant._get_domain).parameters)

    assert parameters == ["self", "prvs", "num_self_compositions", "eps_error", "delta_error"]


def test_a_budget_check_and_the_release_after_it_compute_epsilon_once(monkeypatch):
    # Prepare: count the accountant's computations
    from fedpriv.privacy import ledger as ledger_module

    calls = []
    compute = ledger_module.compute_epsilon
    monkeypatch.setattr(ledger_module, "compute_epsilon", lambda *a, **k: calls.append(1) or compute(*a, **k))
    ledger = PrivacyLedger(history=[(1.3, 0.07, 11)])
    release = {"noise_multiplier": 1.3, "sample_rate": 0.07, "steps": 5}

    # Execute: as a client does before training and for its reply
    ledger.epsilon_if_over(max_epsilon=1e9, delta=1e-5, **release)
    ledger.record(**release)
    ledger.epsilon(1e-5)

    # Assert
    assert len(calls) == 1
