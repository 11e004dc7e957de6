"""Secure aggregation: masks, the protocol with dropouts, encodings, distributed noise and its accounting."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from flwr.app import ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from conftest import arrays_record
from fedpriv.privacy.skellam import (
    SKELLAM_ORDERS,
    gaussian_dominating_noise_multiplier,
    poisson_subsampled_rdp,
    sample_skellam,
    skellam_epsilon,
    skellam_rdp,
    skellam_tail,
)
from fedpriv.secagg import client as secagg_client
from fedpriv.secagg import messages as m
from fedpriv.secagg.config import SecAggPlus
from fedpriv.secagg.encoding import WRAP_PROBABILITY, DistributedDPEncoding, WeightedEncoding, plan_distributed_noise
from fedpriv.secagg.masking import centered, expand_mask, mask_input
from secagg_clients import SecAggGrid
from strategies import DPFedAvg, WeightedFedAvg
from strategies.aggregation import weighted_average
from strategies.secagg_server import SecAggPlusRound, ring_neighbours

MODULUS = 2**32


def _set_up(inputs, *, drop=None, config=None, server_round=7):
    """The in-memory clients, the server's round and the public keys of the clients that answered the setup."""
    grid = SecAggGrid(inputs, drop=drop)
    round_ = SecAggPlusRound(
        config=config or SecAggPlus(), node_ids=inputs, server_round=server_round, length=len(next(iter(inputs.values())))
    )
    record = ConfigRecord(round_.setup_record())
    keys = {}
    for node in inputs:
        if node in (drop or {}).get(m.SETUP, set()):
            continue
        answer = grid.answer(node, m.SETUP, record)[m.RECORD]
        keys[node] = (answer[m.PUBLIC_KEY_1], answer[m.PUBLIC_KEY_2])
    return grid, round_, keys


def _protocol(inputs, *, drop=None, config=None):
    grid, round_, keys = _set_up(inputs, drop=drop, config=config)
    return round_.finish(grid.exchange, public_keys=keys)


def _inputs(num_nodes, length, seed=0):
    rng = np.random.default_rng(seed)
    return {node: rng.integers(-(2**20), 2**20, length) for node in range(101, 101 + num_nodes)}


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"num_shares": 2}, "secure.num_shares=2"),
        ({"num_shares": 1.5}, "secure.num_shares=1.5"),
        ({"num_shares": 5, "reconstruction_threshold": 5}, "secure.reconstruction_threshold=5"),
        ({"reconstruction_threshold": 0.0}, "secure.reconstruction_threshold=0.0"),
        ({"modulus_range": 3 * 2**20}, "secure.modulus_range=3145728"),
        ({"modulus_range": 2**33}, "secure.modulus_range=8589934592"),
        ({"quantization_range": 2**31}, "secure.modulus_range=4294967296"),
        ({"timeout": 0}, "secure.timeout=0"),
        ({"dropout_tolerance": 0.95}, "secure.dropout_tolerance=0.95"),
        ({"clipping_range": float("nan")}, "secure.clipping_range=nan"),
    ],
)
def test_bad_secure_settings_name_the_key(overrides, key):
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=key.replace(".", r"\.").replace("[", r"\[")):
        SecAggPlus(**overrides)


@pytest.mark.parametrize(
    ("num_shares", "threshold", "sampled", "expected"),
    [(1.0, 0.6, 10, (10, 6)), (0.5, 0.6, 10, (5, 3)), (4, 2, 10, (5, 2)), (5, 3, 3, (3, 3)), (0.1, 0.5, 10, (10, 5))],
)
def test_round_plan_follows_flowers_rules(num_shares, threshold, sampled, expected):
    # Execute
    plan = SecAggPlus(num_shares=num_shares, reconstruction_threshold=threshold).plan(sampled)

    # Assert
    assert (plan.num_shares, plan.threshold) == expected


@pytest.mark.parametrize(("nodes", "shares"), [(10, 5), (7, 7), (8, 8), (9, 3)])
def test_ring_neighbourhoods_are_symmetric_and_of_the_planned_size(nodes, shares):
    # Execute
    near = ring_neighbours(range(nodes), num_shares=shares, rng=np.random.default_rng(0))

    # Assert
    assert all(len(peers) == shares and node in peers for node, peers in near.items())
    assert all(node in near[peer] for node, peers in near.items() for peer in peers)


# --- masks ----------------------------------------------------------------------------------------


def test_a_masked_vector_alone_is_indistinguishable_from_uniform_while_the_sum_is_exact():
    # Prepare: a structured input (a sparse, small update) that is nothing like uniform.
    inputs = {node: np.zeros(20_000, dtype=np.int64) for node in range(1, 6)}
    inputs[3][::7] = 12345
    grid, round_, keys = _set_up(inputs)
    seen = []
    exchange = grid.exchange

    def spying_exchange(messages, timeout):
        replies = exchange(messages, timeout)
        seen.extend(r.content.array_records[m.MASKED][m.MASKED].numpy() for r in replies if m.MASKED in r.content.array_records)
        return replies

    # Execute
    outcome = round_.finish(spying_exchange, public_keys=keys)

    # Assert: the server's inputs look uniform in their top and bottom bits, the sum is exact.
    for masked in seen:
        for bins in (masked >> 26, masked & 63):
            _, p_value = stats.chisquare(np.bincount(bins.astype(np.int64), minlength=64))
            assert p_value > 1e-4
    assert np.array_equal(outcome.total, sum(inputs.values()))


def test_masks_are_fixed_by_their_seed_and_cancel_in_pairs():
    # Prepare
    seed_a, seed_b = bytes(range(32)), bytes(range(1, 33))
    values = np.arange(-5, 5)

    # Execute
    one = expand_mask(seed_a, length=1000, modulus=2**16, nonce=b"0123456789abcdef")
    again = expand_mask(seed_a, length=1000, modulus=2**16, nonce=b"0123456789abcdef")
    other = expand_mask(seed_b, length=1000, modulus=2**16, nonce=b"0123456789abcdef")
    low = mask_input(values, own_id=1, self_seed=seed_a, peer_seeds={2: seed_b}, modulus=MODULUS)
    high = mask_input(values, own_id=2, self_seed=seed_a, peer_seeds={1: seed_b}, modulus=MODULUS)
    self_mask = expand_mask(seed_a, length=10, modulus=MODULUS, nonce=b"fedpriv-self-msk")

    # Assert
    assert np.array_equal(one, again) and not np.array_equal(one, other)
    assert one.min() >= 0 and one.max() < 2**16
    assert np.array_equal(centered(low + high - 2 * self_mask, modulus=MODULUS), 2 * values)


# --- the protocol -------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(num_nodes=st.integers(3, 8), length=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_the_unmasked_sum_equals_the_plain_sum(num_nodes, length, seed):
    # Prepare
    inputs = _inputs(num_nodes, length, seed)

    # Execute
    outcome = _protocol(inputs)

    # Assert
    assert outcome.refused == "" and outcome.survivors == num_nodes
    assert np.array_equal(outcome.total, sum(inputs.values()))


@pytest.mark.parametrize("stage", [m.SETUP, m.SHARE_KEYS, m.COLLECT_MASKED, m.UNMASK])
def test_a_client_dropping_at_any_stage_leaves_the_sum_of_those_whose_input_arrived(stage):
    # Prepare
    inputs = _inputs(6, 500)
    dropped = {103, 105}

    # Execute
    outcome = _protocol(inputs, drop={stage: dropped}, config=SecAggPlus(reconstruction_threshold=0.5))

    # Assert: a client that sent its masked input (dropping only at unmask) stays in the sum.
    in_sum = set(inputs) if stage == m.UNMASK else set(inputs) - dropped
    assert outcome.refused == ""
    assert outcome.survivors == len(in_sum)
    assert np.array_equal(outcome.total, sum(inputs[node] for node in in_sum))


@pytest.mark.parametrize("stage", [m.SETUP, m.SHARE_KEYS, m.COLLECT_MASKED, m.UNMASK])
def test_too_few_survivors_refuse_the_round_cleanly(stage):
    # Prepare: 6 clients, threshold 4, three drop.
    inputs = _inputs(6, 50)

    # Execute
    outcome = _protocol(inputs, drop={stage: {101, 102, 103}}, config=SecAggPlus(reconstruction_threshold=4, num_shares=5))

    # Assert
    assert outcome.total is None and "fewer than" in outcome.refused


def test_sparse_neighbourhoods_recover_dropped_clients_from_their_neighbours():
    # Prepare: 9 clients, 5 neighbours each, threshold 3.
    inputs = _inputs(9, 200, seed=3)

    # Execute
    outcome = _protocol(inputs, drop={m.COLLECT_MASKED: {104}}, config=SecAggPlus(num_shares=5, reconstruction_threshold=3))

    # Assert
    assert np.array_equal(outcome.total, sum(v for node, v in inputs.items() if node != 104))


def _stage_state(num_nodes=4):
    grid, _, keys = _set_up(_inputs(num_nodes, 10), server_round=2)
    return grid, keys


def test_a_client_never_gives_both_shares_of_one_node_nor_answers_another_round():
    # Prepare: run up to the masking stage by hand.
    grid, keys = _stage_state()
    nodes = sorted(keys)
    share = {
        m.ROUND: 2,
        m.NODE_IDS: nodes,
        m.PUBLIC_KEYS_1: [keys[n][0] for n in nodes],
        m.PUBLIC_KEYS_2: [keys[n][1] for n in nodes],
    }
    state, _ = secagg_client.share_keys(grid.states[nodes[0]], share)

    # Execute / Assert
    with pytest.raises(ValueError, match="also listed as active"):
        secagg_client.unmask({**state, "masked-with": nodes[1:]}, {m.ROUND: 2, m.ACTIVE: nodes, m.DEAD: nodes[1:2]})
    with pytest.raises(ValueError, match="round"):
        secagg_client.unmask(state, {m.ROUND: 3, m.ACTIVE: nodes, m.DEAD: []})
    with pytest.raises(ValueError, match="own public keys"):
        secagg_client.share_keys(grid.states[nodes[0]], {**share, m.PUBLIC_KEYS_1: list(reversed(share[m.PUBLIC_KEYS_1]))})


# --- encodings and the strategies -------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 999), min_size=2, max_size=6),
    scale=st.floats(1e-4, 1.0),
    seed=st.integers(0, 2**16),
)
def test_secure_fedavg_equals_weighted_fedavg_within_the_stated_quantization_error(sizes, scale, seed):
    # Prepare
    rng = np.random.default_rng(seed)
    updates = {node: rng.normal(scale=scale, size=40) for node in range(1, len(sizes) + 1)}
    examples = dict(zip(updates, sizes, strict=True))
    config = SecAggPlus(clipping_range=8.0, quantization_range=2**22, max_weight=1000.0)
    encoding = WeightedEncoding(clipping_range=8.0, quantization_range=2**22, max_weight=1000.0)
    grid = SecAggGrid(updates)
    grid.encoded = {node: encoding.encode(updates[node], num_examples=examples[node], rng=rng) for node in updates}
    round_ = SecAggPlusRound(config=config, node_ids=updates, server_round=1, length=encoding.length(40))
    record = ConfigRecord(round_.setup_record())
    keys = {}
    for node in updates:
        grid.states[node], answer = secagg_client.setup(node_id=node, config=record)
        keys[node] = (answer[m.PUBLIC_KEY_1], answer[m.PUBLIC_KEY_2])

    # Execute
    outcome = round_.finish(grid.exchange, public_keys=keys)
    secure = encoding.decode(outcome.total)

    # Assert: less than one quantization level per client, over the summed weights.
    quantized = {node: max(round(n / 1000 * 2**22), 1) / 2**22 for node, n in examples.items()}
    plain = weighted_average([[updates[n]] for n in updates], [quantized[n] for n in updates])[0]
    bound = len(sizes) * (16.0 / 2**22) / sum(quantized.values())
    assert np.max(np.abs(secure - plain)) <= bound
    assert encoding.clipped_values(outcome.total) == 0


def test_values_beyond_the_clipping_range_are_clipped_and_counted():
    # Prepare: one client's weighted update has 3 values beyond clipping_range=1
    encoding = WeightedEncoding(clipping_range=1.0, quantization_range=2**20, max_weight=1.0)
    update = np.array([0.5, 2.0, -3.0, 1.5, 0.0])

    # Execute
    encoded = encoding.encode(update, num_examples=1.0, rng=np.random.default_rng(0))

    # Assert
    assert encoding.clipped_values(encoded) == 3
    assert encoding.decode(encoded) == pytest.approx([0.5, 1.0, -1.0, 1.0, 0.0], abs=2 / 2**20)


def _secure_round(strategy, grid, global_arrays, server_round=1):
    messages = list(strategy.configure_train(server_round, arrays_record(global_arrays), ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    return strategy.aggregate_train(server_round, replies)


def test_weighted_fedavg_with_secagg_gives_fedavgs_model_and_never_sees_an_update():
    # Prepare
    global_arrays = {"w": np.zeros((3, 4), dtype=np.float32), "b": np.ones(2, dtype=np.float32)}
    rng = np.random.default_rng(1)
    updates = {node: rng.normal(scale=0.1, size=14) for node in range(1, 5)}
    examples = {1: 125, 2: 250, 3: 500, 4: 125}
    strategy = WeightedFedAvg(min_available_nodes=4)
    strategy.enable_secure_aggregation(SecAggPlus())
    grid = SecAggGrid(updates, num_examples=examples)

    # Execute
    arrays, metrics = _secure_round(strategy, grid, global_arrays)

    # Assert
    flat = np.concatenate([arrays["w"].numpy().ravel(), arrays["b"].numpy().ravel()])
    expected = np.concatenate([np.zeros(12), np.ones(2)]) + weighted_average(
        [[updates[n]] for n in updates], [examples[n] for n in updates]
    )[0]
    assert np.max(np.abs(flat - expected)) < 1e-5
    assert metrics["num_clients"] == 4 and metrics["secagg_refused"] == 0 and metrics["secagg_clipped_values"] == 0
    setup = [msg for msg in grid.sent if msg.content.config_records[m.RECORD][m.STAGE] == m.SETUP]
    assert len(setup) == 4 and all("arrays" in msg.content.array_records for msg in setup)


def _dp_strategy(num_clients, **kwargs):
    strategy = DPFedAvg(
        num_clients=num_clients,
        sample_rate=1.0,
        noise_multiplier=kwargs.pop("noise_multiplier", 1.0),
        clipping_norm=1.0,
        weighted=False,
        min_available_nodes=num_clients,
        **kwargs,
    )
    strategy.enable_secure_aggregation(SecAggPlus(dropout_tolerance=0.2), dimension=20)
    return strategy


def test_dp_fedavg_with_secagg_clips_on_clients_and_accounts_the_distributed_skellam_noise():
    # Prepare
    global_arrays = {"w": np.zeros(20, dtype=np.float32)}
    updates = {node: np.full(20, 0.5 * node) for node in range(1, 11)}
    quiet = _dp_strategy(10, noise_multiplier=0.0)
    noisy = _dp_strategy(10)

    # Execute
    clean, _ = _secure_round(quiet, SecAggGrid(updates, num_examples=dict.fromkeys(updates, 50)), global_arrays)
    _, metrics = _secure_round(noisy, SecAggGrid(updates, num_examples=dict.fromkeys(updates, 50)), global_arrays)

    # Assert: each update clipped to norm 1 on its client, averaged over D = 10.
    clipped = sum(u * min(1.0, 1.0 / np.linalg.norm(u)) for u in updates.values()) / 10
    assert np.max(np.abs(clean["w"].numpy() - clipped)) < 1e-5
    assert metrics["noise_std"] == pytest.approx(0.1, rel=1e-4)
    assert noisy.ledger.mechanism == "skellam"
    assert metrics["epsilon_user"] == pytest.approx(skellam_epsilon([(1.0, 1.0, 1)], delta=1e-5), rel=1e-6)


def test_too_many_dropouts_under_dp_refuse_the_round_before_unmasking_and_spend_nothing():
    # Prepare: tolerance 0.2 of 10 needs 8 masked inputs; 3 clients vanish.
    global_arrays = {"w": np.zeros(20, dtype=np.float32)}
    updates = {node: np.full(20, 0.1) for node in range(1, 11)}
    strategy = _dp_strategy(10)
    grid = SecAggGrid(updates, num_examples=dict.fromkeys(updates, 50), drop={m.COLLECT_MASKED: {1, 2, 3}})

    # Execute
    arrays, published = _secure_round(strategy, grid, global_arrays)

    # Assert: the refusal is for the operator; the published round holds no epsilon.
    assert arrays is None and strategy.train_metrics[1]["secagg_refused"] == 1
    assert "secagg_refused" not in published and "epsilon_user" not in published
    assert strategy.ledger.releases == 0 and strategy.epsilon_user == 0.0
    assert not any(msg.content.config_records[m.RECORD][m.STAGE] == m.UNMASK for msg in grid.sent)


def test_secure_aggregation_is_refused_by_adaptive_clipping_and_client_canaries():
    # Prepare
    from fedpriv.audit.canaries import CanaryClients
    from strategies import AdaptiveDPFedAvg

    adaptive = AdaptiveDPFedAvg(num_clients=4, sample_rate=1.0, noise_multiplier=1.0, clipping_norm=1.0)
    canaries = DPFedAvg(
        num_clients=4, sample_rate=1.0, noise_multiplier=1.0, clipping_norm=1.0, extra_updates=CanaryClients(seed=0, num_canaries=4)
    )

    # Execute / Assert
    with pytest.raises(ValueError, match="adaptive clipping"):
        adaptive.enable_secure_aggregation(SecAggPlus())
    with pytest.raises(ValueError, match="audit=canary"):
        canaries.enable_secure_aggregation(SecAggPlus())


# --- distributed noise -------------------------------------------------------------------------


@pytest.mark.parametrize("survivors", [10, 8])
def test_the_summed_noise_has_the_variance_the_shares_add_up_to(survivors):
    # Prepare: 10 sampled, noise shares for 8 required; `survivors` of them add theirs.
    plan = plan_distributed_noise(
        clipping_norm=1.0, noise_multiplier=1.0, max_clients=10, dimension=50_000, modulus=MODULUS, dropout_tolerance=0.2
    )
    encoding = DistributedDPEncoding(
        clipping_norm=1.0, weighted=False, weight_cap=1.0, scale=plan.scale, variance_per_client=plan.variance_per_client(10)
    )
    rng = np.random.default_rng(5)

    # Execute
    total = sum(np.mod(encoding.encode(np.zeros(50_000), num_examples=1, rng=rng), MODULUS) for _ in range(survivors))
    noise = encoding.decode(centered(total, modulus=MODULUS))

    # Assert: sample variance within 4 standard errors of survivors * share (a chi-square test).
    expected = survivors * plan.variance_per_client(10) / plan.scale**2
    standard_error = expected * math.sqrt(2 / (noise.size - 1))
    assert abs(np.var(noise, ddof=1) - expected) < 4 * standard_error
    assert (survivors >= plan.required_survivors(10)) == (expected >= plan.noise_std**2 * (1 - 1e-12))


def test_skellam_noise_sums_to_skellam_and_its_tail_bound_holds():
    # Prepare
    rng = np.random.default_rng(0)

    # Execute
    parts = sum(sample_skellam(2.0, size=200_000, rng=rng) for _ in range(5))
    direct = sample_skellam(10.0, size=200_000, rng=rng)
    tail = np.mean(np.abs(direct) >= 12)

    # Assert
    assert stats.ks_2samp(parts, direct).pvalue > 1e-3
    assert tail <= skellam_tail(variance=10.0, threshold=12)


def test_the_grid_keeps_every_coordinate_of_the_worst_sum_inside_the_modulus():
    # Prepare / Execute
    plan = plan_distributed_noise(
        clipping_norm=2.0, noise_multiplier=3.0, max_clients=200, dimension=10**6, modulus=MODULUS, dropout_tolerance=0.5
    )

    # Assert: 200 clients at full norm plus the noise bound stay below modulus / 2, and the bound holds.
    units = plan.scale * 2.0
    assert 200 * (units + 1) + plan.noise_bound < MODULUS / 2
    assert 10**6 * skellam_tail(variance=plan.variance / 0.5, threshold=plan.noise_bound) <= WRAP_PROBABILITY
    with pytest.raises(ValueError, match="secure.modulus_range=65536"):
        plan_distributed_noise(
            clipping_norm=1.0, noise_multiplier=1.0, max_clients=200, dimension=100, modulus=2**16, dropout_tolerance=0.0
        )


# --- accounting against dp-accounting ----------------------------------------------------------


def _dp_accounting_rdp(noise_multiplier, sample_rate, steps, delta=1e-5):
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    ("noise_multiplier", "sample_rate", "steps", "ours", "reference", "ratio"),
    [
        # dp-accounting's RDP accountant on the Gaussian with the same noise multiplier: the
        # Skellam sum's continuous limit. At q = 1 only the order grid differs; with sampling the
        # bound that holds for any mechanism costs the stated ratio.
        (1.0, 1.0, 10, 19.802, 19.054, 1.05),
        (1.0, 0.1, 100, 9.823, 7.904, 1.25),
        (2.0, 0.01, 1000, 0.9032, 0.6862, 1.32),
    ],
)
def test_skellam_epsilon_next_to_dp_accountings_gaussian(noise_multiplier, sample_rate, steps, ours, reference, ratio):
    # Execute
    epsilon = skellam_epsilon([(noise_multiplier, sample_rate, steps)], delta=1e-5)
    gaussian = _dp_accounting_rdp(noise_multiplier, sample_rate, steps)

    # Assert
    assert epsilon == pytest.approx(ours, abs=2e-3)
    assert gaussian == pytest.approx(reference, abs=2e-3)
    assert gaussian <= epsilon <= ratio * gaussian


def test_skellam_rdp_approaches_the_gaussians_and_is_folded_into_a_dominating_noise_multiplier():
    # Prepare
    orders = np.asarray(SKELLAM_ORDERS, dtype=float)

    # Execute
    coarse = gaussian_dominating_noise_multiplier(variance=10.0**2, l1_sensitivity=10.0, l2_sensitivity=10.0)
    fine = gaussian_dominating_noise_multiplier(variance=(2.0**24) ** 2, l1_sensitivity=2.0**24 * 300, l2_sensitivity=2.0**24)
    rdp = skellam_rdp(SKELLAM_ORDERS, variance=100.0, l1_sensitivity=10.0, l2_sensitivity=10.0)

    # Assert
    assert coarse < 1.0 and fine == pytest.approx(1.0, rel=1e-9)
    assert np.all(orders / (2 * coarse**2) >= rdp * (1 - 1e-12))
    assert np.array_equal(poisson_subsampled_rdp(SKELLAM_ORDERS, rdp, sample_rate=1.0), rdp)
    assert np.all(poisson_subsampled_rdp(SKELLAM_ORDERS, rdp, sample_rate=0.1) <= rdp)
