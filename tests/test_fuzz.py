"""A standing fuzz suite: hostile client replies and careless configs.

Bad replies are thrown at every strategy's ``aggregate_train``: the round must
complete with the valid replies only. Bad config values are tried on every
key of every group option, in-process: each is either refused in one line
naming the key, or on the short list of values that are meaningful there.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from conftest import FakeGrid, arrays_record, reply
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpriv.compose import compose_config
from fedpriv.experiment import build_run_components, load_experiment
from fedpriv.run_config import ConfigError
from strategies import AdaptiveDPFedAvg, DPFedAvg, StopRun, WeightedFedAvg

GLOBAL = {"w": np.zeros((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}


def fedavg() -> WeightedFedAvg:
    return WeightedFedAvg()


def dp_fixed() -> DPFedAvg:
    return DPFedAvg(num_clients=10, sample_rate=1.0, noise_multiplier=0.0, clipping_norm=100.0, weighted=False)


def dp_adaptive() -> AdaptiveDPFedAvg:
    return AdaptiveDPFedAvg(num_clients=10, sample_rate=1.0, noise_multiplier=0.0, clipping_norm=100.0)


STRATEGIES = {"fedavg": fedavg, "dp_fixed": dp_fixed, "dp_adaptive": dp_adaptive}


def start(strategy, nodes=range(1, 11)) -> None:
    strategy.configure_train(1, arrays_record(GLOBAL), ConfigRecord(), FakeGrid(nodes))


def npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=value.dtype == object)
    return buffer.getvalue()


def raw_reply(node_id: int, arrays: dict[str, Array], metrics: dict) -> Message:
    """A reply whose arrays are given as Flower ``Array`` objects, bytes and all."""
    request = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node_id)
    record = ArrayRecord()
    for name, array in arrays.items():
        record[name] = array
    return Message(content=RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=request)


def good_arrays(scale: float) -> dict[str, Array]:
    return {name: Array(np.full_like(value, scale)) for name, value in GLOBAL.items()}


def corrupt(kind: str, payload: bytes) -> dict[str, Array]:
    """Valid arrays except for ``w``, corrupted as ``kind`` says."""
    arrays = good_arrays(1.0)
    declared = {"dtype": "float32", "shape": (3, 2), "stype": "numpy.ndarray"}
    if kind == "empty bytes":
        arrays["w"] = Array(**declared, data=b"")
    elif kind == "random bytes":
        arrays["w"] = Array(**declared, data=payload)
    elif kind == "huge declared shape":
        arrays["w"] = Array(dtype="float32", shape=(999_999_999_999,), stype="numpy.ndarray", data=npy(np.ones(6, np.float32)))
    elif kind == "huge header shape":
        header = npy(np.ones(1, np.float32)).replace(b"(1,)", b"(999999999999,)")
        arrays["w"] = Array(**declared, data=header)
    elif kind == "header of another shape":
        arrays["w"] = Array(**declared, data=npy(np.ones((2, 3), np.float32)))
    elif kind == "header of another dtype":
        arrays["w"] = Array(**declared, data=npy(np.ones((3, 2), np.float64)))
    elif kind == "truncated data":
        arrays["w"] = Array(**declared, data=npy(np.ones((3, 2), np.float32))[:-5])
    elif kind == "pickled object":
        arrays["w"] = Array(**declared, data=npy(np.array([None] * 6, dtype=object).reshape(3, 2)))
    elif kind == "other stype":
        arrays["w"] = Array(dtype="float32", shape=(3, 2), stype="torch.tensor", data=npy(np.ones((3, 2), np.float32)))
    return arrays


CORRUPTIONS = [
    "empty bytes",
    "random bytes",
    "huge declared shape",
    "huge header shape",
    "header of another shape",
    "header of another dtype",
    "truncated data",
    "pickled object",
    "other stype",
]
BAD_WEIGHTS = [0, -3, 0.5, 5e-324, math.nan, math.inf, -math.inf]

reply_plans = st.lists(
    st.one_of(
        st.tuples(st.just("valid"), st.floats(-10, 10), st.integers(1, 10**6)),
        st.tuples(st.sampled_from(CORRUPTIONS), st.binary(max_size=64), st.integers(1, 100)),
        st.tuples(st.just("bad weight"), st.sampled_from(BAD_WEIGHTS), st.integers(1, 100)),
        st.tuples(st.just("bad metric"), st.sampled_from([math.nan, math.inf, -math.inf]), st.integers(1, 100)),
    ),
    min_size=1,
    max_size=8,
)


def build_replies(plan) -> tuple[list[Message], list[tuple[float, int]]]:
    replies, valid = [], []
    for node_id, (kind, value, weight) in enumerate(plan, start=1):
        if kind == "valid":
            replies.append(raw_reply(node_id, good_arrays(value), {"num-examples": weight}))
            valid.append((value, weight))
        elif kind == "bad weight":
            replies.append(raw_reply(node_id, good_arrays(1.0), {"num-examples": value}))
        elif kind == "bad metric":
            replies.append(raw_reply(node_id, good_arrays(1.0), {"num-examples": weight, "train_loss": value}))
        else:
            replies.append(raw_reply(node_id, corrupt(kind, value), {"num-examples": weight}))
    return replies, valid


@pytest.mark.parametrize("name", STRATEGIES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=reply_plans)
def test_any_mix_of_hostile_replies_leaves_a_round_of_the_valid_ones(name, plan):
    # Prepare
    strategy = STRATEGIES[name]()
    start(strategy)
    replies, valid = build_replies(plan)

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert
    exact = strategy.train_metrics[1]
    assert exact["num_clients"] == len(valid)
    assert exact["num_rejected"] == len(plan) - len(valid)
    if name == "fedavg" and valid:
        expected = sum(Fraction(v) * w for v, w in valid) / sum(w for _, w in valid)
        np.testing.assert_allclose(arrays["w"].numpy(), float(expected), rtol=1e-6, atol=1e-6)
    if name == "fedavg" and not valid:
        assert arrays is None


@pytest.mark.parametrize("kind", ["empty bytes", "huge declared shape", "huge header shape"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_the_replies_that_crashed_aggregation_are_rejected(name, kind):
    # Prepare
    strategy = STRATEGIES[name]()
    start(strategy)
    replies = [raw_reply(1, good_arrays(2.0), {"num-examples": 10}), raw_reply(2, corrupt(kind, b""), {"num-examples": 10})]

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert
    assert (strategy.train_metrics[1]["num_clients"], strategy.train_metrics[1]["num_rejected"]) == (1, 1)
    assert arrays is not None


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_subnormal_weight_is_rejected_and_dp_aggregation_goes_on(name):
    # Prepare
    strategy = STRATEGIES[name]()
    start(strategy)
    replies = [reply(1, {k: np.full_like(v, 2.0) for k, v in GLOBAL.items()}, {"num-examples": 10}),
               reply(2, {k: np.full_like(v, 4.0) for k, v in GLOBAL.items()}, {"num-examples": 5e-324})]

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert
    assert strategy.train_metrics[1]["num_rejected"] == 1
    assert np.all(np.isfinite(arrays["w"].numpy()))


def test_huge_weights_average_exactly_like_rational_arithmetic():
    # Prepare: weights whose plain sum overflows a float
    weights = [1e308, 1e308, float(2**63), 1.0]
    values = [2.0, 4.0, 8.0, 16.0]
    strategy = WeightedFedAvg()
    start(strategy)
    replies = [
        reply(i + 1, {k: np.full_like(v, value) for k, v in GLOBAL.items()}, {"num-examples": weight, "train_loss": value})
        for i, (weight, value) in enumerate(zip(weights, values, strict=True))
    ]

    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)

    # Assert
    exact = sum(Fraction(w) * Fraction(v) for w, v in zip(weights, values, strict=True)) / sum(map(Fraction, weights))
    np.testing.assert_allclose(arrays["w"].numpy(), float(exact), rtol=1e-6)
    assert float(exact) == pytest.approx(3.0)
    assert metrics["train_loss"] == pytest.approx(float(exact))


def test_a_non_finite_aggregate_keeps_the_previous_model_and_stops_the_run_after_the_limit():
    # Prepare: a server step that overflows float32
    strategy = WeightedFedAvg(server_lr=1000.0, max_diverged_rounds=2)
    huge = {k: np.full_like(v, 3e38) for k, v in GLOBAL.items()}
    sent = []

    # Execute
    for server_round in (1, 2):
        messages = list(strategy.configure_train(server_round, arrays_record(GLOBAL), ConfigRecord(), FakeGrid([1])))
        sent.append(messages[0].content["arrays"]["w"].numpy())
        arrays, metrics = strategy.aggregate_train(server_round, [reply(1, huge, {"num-examples": 1})])
        assert arrays is None and metrics["diverged"] == 1

    # Assert
    with pytest.raises(StopRun) as stopped:
        strategy.configure_train(3, arrays_record(GLOBAL), ConfigRecord(), FakeGrid([1]))
    assert stopped.value.reason == "diverged"
    assert all(np.all(np.isfinite(w)) for w in sent)


def test_a_model_rejected_after_evaluation_is_replaced_by_the_previous_one_next_round():
    # Prepare
    strategy = WeightedFedAvg()
    strategy.configure_train(1, arrays_record(GLOBAL), ConfigRecord(), FakeGrid([1]))
    strategy.aggregate_train(1, [reply(1, {k: np.full_like(v, 1e30) for k, v in GLOBAL.items()}, {"num-examples": 1})])

    # Execute: the ServerApp found the new model's loss non-finite
    strategy.reject_model(1, reason="the server's test loss is nan")
    bad = arrays_record({k: np.full_like(v, 1e30) for k, v in GLOBAL.items()})
    messages = list(strategy.configure_train(2, bad, ConfigRecord(), FakeGrid([1])))

    # Assert
    np.testing.assert_array_equal(messages[0].content["arrays"]["w"].numpy(), GLOBAL["w"])
    assert strategy.train_metrics[1]["diverged"] == 1


# Config fuzzing: every key of these group options, with each bad value.
BASES = {
    "fedavg": [],
    "dp_fixed": ["strategy=dp_fixed"],
    "dp_adaptive": ["strategy=dp_adaptive"],
    "opacus": ["client=opacus"],
    "local_dp": ["client=local_dp", "dataset=breast_cancer", "model=logreg"],
    "mnist": ["dataset=mnist", "model=cnn28"],
    "cifar10": ["dataset=cifar10", "model=cnn32"],
    "breast_cancer": ["dataset=breast_cancer", "model=logreg"],
    "heart_disease": ["dataset=heart_disease", "partition=natural", "num_clients=4"],
    "german_credit": ["dataset=german_credit"],
    "csv": ["dataset=csv", "dataset.path=patients.csv", "dataset.silo_column=site", "dataset.feature_columns=[age]"],
    "dirichlet": ["partition=dirichlet"],
    "pathological": ["partition=pathological"],
    "deployment": ["mode=deployment", "mode.insecure=true"],
    "canary": ["strategy=dp_fixed", "audit=canary"],
}
BAD_VALUES = {"text": "abc", "negative": -1, "zero": 0, "nan": math.nan, "inf": math.inf, "huge": 1e300, "tiny": 1e-300, "bool": True}
# The bad values that are meaningful for a key (everything else must be refused).
ACCEPTED = {
    "audit.confidence": {"tiny"},
    "audit.guess_fraction": {"tiny"},
    "audit.seed": {"zero"},
    "client.lr": {"tiny"},
    "client.max_epsilon": {"huge", "tiny"},
    "client.max_grad_norm": {"tiny"},
    "client.momentum": {"zero", "tiny"},
    "client.noise_multiplier": {"zero"},
    "client.proximal_mu": {"zero", "tiny"},
    "client.weight_decay": {"zero", "tiny"},
    "dataset.download": {"bool"},
    "dataset.max_test_examples": {"zero"},
    "dataset.max_train_examples": {"zero"},
    "dataset.root": {"text"},
    "dataset.seed": {"zero"},
    "dataset.test_fraction": {"tiny"},  # refused when the data is loaded: an empty test side
    "mode.client_num_gpus": {"zero"},
    "mode.insecure": {"bool"},
    "mode.stream": {"bool"},
    "mode.verbose": {"bool"},
    "output_dir": {"text"},
    "partition.alpha": {"huge", "tiny"},  # tiny is refused when the partition is drawn
    "seed": {"zero"},
    "seeded_noise": {"bool"},
    "verbose": {"bool"},
    "strategy.beta1": {"zero", "tiny"},
    "strategy.beta2": {"zero", "tiny"},
    "strategy.clip_lr": {"tiny"},
    "strategy.clipping_norm": {"tiny"},
    "strategy.fraction_evaluate": {"zero", "tiny"},
    "strategy.fraction_train": {"zero", "tiny"},
    "strategy.max_epsilon": {"huge", "tiny"},
    "strategy.min_available_nodes": {"zero"},
    "strategy.min_evaluate_nodes": {"zero"},
    "strategy.min_train_nodes": {"zero"},
    "strategy.node_wait_seconds": {"zero", "tiny"},
    "strategy.noise_multiplier": {"zero"},
    "strategy.noise_seed": {"zero"},
    "strategy.num_byzantine": {"zero"},
    "strategy.sampling_seed": {"zero"},
    "strategy.seed": {"zero"},
    "strategy.server_lr": {"tiny"},
    "strategy.server_momentum": {"zero", "tiny"},
    "strategy.target_quantile": {"tiny"},
    "strategy.trim_fraction": {"zero", "tiny"},
    "strategy.weight_cap": {"tiny"},
    "strategy.weighted": {"bool"},
}
# With DP on either side, federated evaluation at any rate is refused.
PRIVATE_BASES = {"dp_fixed", "dp_adaptive", "opacus", "canary", "local_dp"}
REFUSED_WHEN_PRIVATE = {("strategy.fraction_evaluate", "tiny")}
# Opacus takes noise_multiplier=0 (audits); local DP always adds noise.
# A csv dataset is read when its model is built (its width is the file's), so an empty test side fails then.
REFUSED_IN_BASE = {"local_dp": {("client.noise_multiplier", "zero")}, "csv": {("dataset.test_fraction", "tiny")}}


def _keys(config, prefix=()):
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):
            yield from _keys(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _validate(config) -> None:
    """What scripts/run.py builds before a run, minus loading data."""
    build_run_components(load_experiment(config), mode_config=config["mode"])


@pytest.mark.parametrize("base", BASES)
def test_every_config_key_refuses_bad_values_in_one_line_naming_the_key(base, tmp_path, monkeypatch):
    # Prepare: the csv base reads its header (a model needs its input width)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "patients.csv").write_text("age,site,label\n40,A,1\n50,A,0\n60,A,1\n45,A,0\n70,A,1\n")
    composed = compose_config(BASES[base])
    outcomes = {}

    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in _keys(composed):
            key = ".".join(path)
            for label, bad in BAD_VALUES.items():
                config = copy.deepcopy(composed)
                node = config
                for part in path[:-1]:
                    node = node[part]
                node[path[-1]] = bad
                try:
                    _validate(config)
                    outcomes[(key, label)] = "accepted"
                except ConfigError as error:
                    message = str(error)
                    outcomes[(key, label)] = "refused" if "\n" not in message and path[-1] in message else message

    # Assert
    def expected(case) -> str:
        if base in PRIVATE_BASES and case in REFUSED_WHEN_PRIVATE or case in REFUSED_IN_BASE.get(base, set()):
            return "refused"
        return "accepted" if case[1] in ACCEPTED.get(case[0], set()) else "refused"

    unexpected = {case: outcome for case, outcome in outcomes.items() if outcome != expected(case)}
    assert unexpected == {}
