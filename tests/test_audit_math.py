"""The audit's pure math: the one-run lower bound, the guessing game, attack scores and ROC."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from fedpriv.audit.lower_bound import epsilon_lower_bound, guess_probability
from fedpriv.audit.membership import loss_threshold_scores, offline_lira_scores, roc_summary
from fedpriv.audit.one_run import audit_scores, make_guesses
from fedpriv.audit.shadow import balanced_halves


def test_all_100_of_100_correct_at_95_percent_gives_about_3_49():
    # Prepare: p^100 = 0.05, so p = 0.05^(1/100) and epsilon = log(p / (1 - p))
    p = 0.05 ** (1 / 100)
    by_hand = math.log(p / (1 - p))

    # Execute
    bound = epsilon_lower_bound(num_guesses=100, num_correct=100, confidence=0.95)

    # Assert
    assert bound == pytest.approx(by_hand, rel=1e-9)
    assert bound == pytest.approx(3.49, abs=0.005)


def test_hand_computed_values_with_mistakes_and_chance():
    # Prepare: 1000 of 1000 at 95%: p = 0.05^(1/1000); 99 of 100: P[Bin >= 99] = p^100 + 100 p^99 (1 - p)
    p_all = 0.05 ** (1 / 1000)

    # Execute
    thousand = epsilon_lower_bound(num_guesses=1000, num_correct=1000, confidence=0.95)
    ninety_nine = epsilon_lower_bound(num_guesses=100, num_correct=99, confidence=0.95)
    chance = epsilon_lower_bound(num_guesses=100, num_correct=50, confidence=0.95)

    # Assert
    assert thousand == pytest.approx(math.log(p_all / (1 - p_all)), rel=1e-9)
    p = 1 / (1 + math.exp(-ninety_nine))
    assert p**100 + 100 * p**99 * (1 - p) == pytest.approx(0.05, rel=1e-6)
    assert chance == 0.0


@settings(max_examples=200, deadline=None)
@given(guesses=st.integers(1, 2000), data=st.data(), confidence=st.floats(0.5, 0.999))
def test_bound_is_monotone_in_correct_guesses_and_exactly_at_the_tail(guesses, data, confidence):
    # Prepare
    correct = data.draw(st.integers(0, guesses - 1))

    # Execute
    lower = epsilon_lower_bound(num_guesses=guesses, num_correct=correct, confidence=confidence)
    higher = epsilon_lower_bound(num_guesses=guesses, num_correct=correct + 1, confidence=confidence)

    # Assert: more correct guesses never prove less; a positive bound sits where the tail is 1 - confidence
    assert 0.0 <= lower <= higher < math.inf
    if higher > 0:
        tail = binom.sf(correct, guesses, guess_probability(higher))
        assert tail == pytest.approx(1 - confidence, rel=1e-6)


@settings(max_examples=100, deadline=None)
@given(guesses=st.integers(1, 500), data=st.data(), low=st.floats(0.5, 0.98), step=st.floats(0.001, 0.019))
def test_bound_grows_with_confidence_lowered(guesses, data, low, step):
    # Prepare
    correct = data.draw(st.integers(0, guesses))

    # Execute
    strict = epsilon_lower_bound(num_guesses=guesses, num_correct=correct, confidence=low + step)
    loose = epsilon_lower_bound(num_guesses=guesses, num_correct=correct, confidence=low)

    # Assert
    assert strict <= loose


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_guesses": 10, "num_correct": 11}, "num_correct=11: must be <= num_guesses=10"),
        ({"num_guesses": -1, "num_correct": 0}, "num_guesses=-1"),
        ({"num_guesses": 10, "num_correct": 5, "confidence": 1.0}, "confidence=1.0"),
        ({"num_guesses": 10, "num_correct": 2.5}, "num_correct=2.5"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        epsilon_lower_bound(**kwargs)


def test_guesses_take_the_top_and_bottom_and_abstain_between():
    # Prepare
    scores = [0.3, 5.0, -2.0, 0.1, 4.0, -1.0]

    # Execute
    guesses = make_guesses(scores, num_positive=2, num_negative=1)

    # Assert
    assert guesses.tolist() == [0, 1, -1, 0, 1, 0]
    assert scores == [0.3, 5.0, -2.0, 0.1, 4.0, -1.0]


def test_perfect_scores_make_every_guess_correct():
    # Prepare: 1000 coins; included canaries score far above excluded ones
    rng = np.random.default_rng(0)
    coins = rng.random(1000) < 0.5
    scores = np.where(coins, 10.0, 0.0) + rng.normal(0, 0.1, 1000)

    # Execute
    result = audit_scores(scores, coins, num_guesses=800, confidence=0.95)

    # Assert
    assert result.correct_guesses == result.num_guesses == 800
    assert result.epsilon_lower_bound == pytest.approx(epsilon_lower_bound(num_guesses=800, num_correct=800))
    assert result.num_included == int(coins.sum())


def test_uninformative_scores_prove_almost_nothing():
    # Prepare
    rng = np.random.default_rng(1)
    coins = rng.random(1000) < 0.5

    # Execute
    result = audit_scores(rng.normal(size=1000), coins, num_guesses=1000, confidence=0.95)

    # Assert
    assert result.epsilon_lower_bound < 0.1


def test_roc_summary_of_perfect_and_random_scores():
    # Prepare
    rng = np.random.default_rng(2)
    is_member = np.arange(4000) < 2000

    # Execute
    perfect = roc_summary(is_member.astype(float), is_member)
    random = roc_summary(rng.normal(size=4000), is_member)

    # Assert
    assert (perfect.auc, perfect.tpr_at_1pct_fpr, perfect.tpr_at_01pct_fpr) == (1.0, 1.0, 1.0)
    assert random.auc == pytest.approx(0.5, abs=0.03)
    assert random.tpr_at_1pct_fpr < 0.03
    assert (random.num_members, random.num_nonmembers) == (2000, 2000)


def test_loss_threshold_scores_are_minus_the_loss():
    assert loss_threshold_scores([0.1, 2.0]).tolist() == [-0.1, -2.0]


def test_offline_lira_calibrates_per_example_difficulty():
    # Prepare: example difficulty varies a lot; membership adds +1 to the target's confidence.
    # Raw confidence barely separates members; calibrated by the out-shadows' mean it does.
    rng = np.random.default_rng(3)
    n, shadows = 2000, 8
    difficulty = rng.normal(0, 5, n)
    is_member = rng.random(n) < 0.5
    shadow_in = balanced_halves(seed=0, num_examples=n, num_shadows=shadows)
    shadow_conf = difficulty + shadow_in * 1.0 + rng.normal(0, 0.3, (shadows, n))
    target = difficulty + is_member * 1.0 + rng.normal(0, 0.3, n)

    # Execute
    raw = roc_summary(target, is_member)
    calibrated = roc_summary(offline_lira_scores(target, shadow_conf, shadow_in), is_member)

    # Assert
    assert raw.auc < 0.65
    assert calibrated.auc > 0.9
    assert calibrated.tpr_at_1pct_fpr > 10 * raw.tpr_at_1pct_fpr


def test_balanced_halves_put_every_example_in_exactly_half_of_the_shadows():
    # Execute
    shadow_in = balanced_halves(seed=4, num_examples=501, num_shadows=6)

    # Assert
    assert shadow_in.shape == (6, 501)
    assert (shadow_in.sum(axis=0) == 3).all()
    assert 200 < shadow_in[0].sum() < 300
    with pytest.raises(ValueError, match="num_shadows=3"):
        balanced_halves(seed=0, num_examples=10, num_shadows=3)


def test_lira_needs_an_out_shadow_for_every_example():
    with pytest.raises(ValueError, match="1 examples have no shadow model"):
        offline_lira_scores([0.0, 0.0], np.zeros((2, 2)), np.array([[True, False], [True, True]]))
