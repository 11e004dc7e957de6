"""WeightedFedAvg: equivalence with Flower's FedAvg, reply validation, sampling."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FakeGrid, arrays_record, error_reply, reply
from flwr.app import ConfigRecord, MessageType
from flwr.serverapp.strategy import FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import WeightedFedAvg
from strategies.aggregation import sample_node_ids

GLOBAL = {"w": np.zeros((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}


def configured(strategy: WeightedFedAvg, *, arrays=GLOBAL, nodes=(1, 2, 3)):
    """Run configure_train so the strategy knows the global model it sent."""
    return list(
        strategy.configure_train(1, arrays_record(arrays), ConfigRecord(), FakeGrid(nodes))
    )


def client(node_id: int, scale: float, num_examples=10, **extra_metrics):
    arrays = {name: np.full_like(value, scale) for name, value in GLOBAL.items()}
    return reply(node_id, arrays, {"num-examples": num_examples, "train_loss": scale, **extra_metrics})


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(-1e3, 1e3, allow_nan=False), st.integers(1, 10**6)
        ),
        min_size=1,
        max_size=8,
    )
)
def test_matches_flower_fedavg_on_valid_replies(clients):
    # Prepare
    rng = np.random.default_rng(0)
    replies = []
    for node_id, (scale, n) in enumerate(clients, start=1):
        arrays = {k: (rng.standard_normal(v.shape) * scale).astype(np.float32) for k, v in GLOBAL.items()}
        replies.append(reply(node_id, arrays, {"num-examples": n, "train_loss": abs(scale)}))
    ours = WeightedFedAvg()
    configured(ours, nodes=range(1, len(clients) + 1))
    flower = FedAvg()

    # Execute
    our_arrays, our_metrics = ours.aggregate_train(1, replies)
    their_arrays, their_metrics = flower.aggregate_train(1, replies)

    # Assert
    for name in GLOBAL:
        np.testing.assert_allclose(
            our_arrays[name].numpy(), their_arrays[name].numpy(), rtol=1e-5, atol=1e-3
        )
    assert our_metrics["train_loss"] == pytest.approx(their_metrics["train_loss"], rel=1e-9, abs=1e-9)
    assert our_metrics["num_clients"] == len(clients)
    assert our_metrics["num_rejected"] == 0


def test_server_learning_rate_scales_the_step():
    # Prepare
    strategy = WeightedFedAvg(server_lr=0.5)
    configured(strategy)

    # Execute
    arrays, _ = strategy.aggregate_train(1, [client(1, 2.0), client(2, 4.0)])

    # Assert: average is 3.0, half of the step from 0.0 is 1.5
    np.testing.assert_allclose(arrays["w"].numpy(), 1.5)


def _bad_array(name, value):
    arrays = {k: np.ones_like(v) for k, v in GLOBAL.items()}
    arrays[name] = value
    return arrays


BAD_REPLIES = {
    "nan value": lambda: reply(9, _bad_array("w", np.full((3, 2), np.nan, np.float32)), {"num-examples": 5}),
    "inf value": lambda: reply(9, _bad_array("b", np.array([np.inf, 0], np.float32)), {"num-examples": 5}),
    "missing array": lambda: reply(9, {"w": np.ones((3, 2), np.float32)}, {"num-examples": 5}),
    "extra array": lambda: reply(9, {**_bad_array("b", np.ones(2, np.float32)), "x": np.ones(1, np.float32)}, {"num-examples": 5}),
    "wrong shape": lambda: reply(9, _bad_array("w", np.ones((2, 3), np.float32)), {"num-examples": 5}),
    "wrong dtype": lambda: reply(9, _bad_array("w", np.ones((3, 2), np.float64)), {"num-examples": 5}),
    "no arrays": lambda: reply(9, None, {"num-examples": 5}),
    "missing num-examples": lambda: reply(9, _bad_array("b", np.ones(2, np.float32)), {"train_loss": 1.0}),
    "zero num-examples": lambda: reply(9, _bad_array("b", np.ones(2, np.float32)), {"num-examples": 0}),
    "negative num-examples": lambda: reply(9, _bad_array("b", np.ones(2, np.float32)), {"num-examples": -3}),
    "nan num-examples": lambda: reply(9, _bad_array("b", np.ones(2, np.float32)), {"num-examples": float("nan")}),
    "inf num-examples": lambda: reply(9, _bad_array("b", np.ones(2, np.float32)), {"num-examples": float("inf")}),
    "list num-examples": lambda: reply(9, _bad_array("b", np.ones(2, np.float32)), {"num-examples": [1, 2]}),
    "non-finite metric": lambda: reply(9, _bad_array("b", np.ones(2, np.float32)), {"num-examples": 5, "train_loss": float("nan")}),
    "no metrics": lambda: reply(9, _bad_array("b", np.ones(2, np.float32)), None),
    "error reply": lambda: error_reply(9),
}


def _boolean_num_examples():
    message = reply(9, _bad_array("b", np.ones(2, np.float32)), {"num-examples": 5})
    # MetricRecord refuses bools on assignment; a peer's bytes are not so polite.
    message.content["metrics"].__dict__["_data"]["num-examples"] = True
    return message


BAD_REPLIES["boolean num-examples"] = _boolean_num_examples


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_bad_reply_is_rejected_and_counted(case, caplog):
    # Prepare
    strategy = WeightedFedAvg()
    configured(strategy)
    good = client(1, 2.0)

    # Execute
    arrays, metrics = strategy.aggregate_train(1, [good, BAD_REPLIES[case]()])

    # Assert
    assert metrics["num_clients"] == 1
    assert metrics["num_rejected"] == 1
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)
    assert "rejected reply: node 9" in caplog.text


def test_too_few_valid_replies_keeps_previous_model(caplog):
    # Prepare
    strategy = WeightedFedAvg(min_valid_replies=2)
    configured(strategy)

    # Execute
    arrays, metrics = strategy.aggregate_train(1, [client(1, 2.0), error_reply(2)])

    # Assert
    assert arrays is None
    assert (metrics["num_clients"], metrics["num_rejected"]) == (1, 1)
    assert "keeping the previous model" in caplog.text
    assert strategy.train_metrics[1]["num_rejected"] == 1


def test_configure_train_leaves_callers_config_untouched():
    # Prepare
    strategy = WeightedFedAvg(fraction_train=0.5, min_train_nodes=1, seed=3)
    config = ConfigRecord({"lr": 0.1})

    # Execute
    messages = list(strategy.configure_train(4, arrays_record(GLOBAL), config, FakeGrid(range(10))))

    # Assert
    assert dict(config) == {"lr": 0.1}
    assert len(messages) == 5
    assert all(m.metadata.message_type == MessageType.TRAIN for m in messages)
    assert dict(messages[0].content["config"]) == {"lr": 0.1, "server-round": 4}


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 200),
    fraction=st.floats(0, 1),
    min_nodes=st.integers(0, 20),
    seed=st.integers(0, 2**31),
    server_round=st.integers(1, 1000),
)
def test_sampling_is_reproducible_and_sized(n, fraction, min_nodes, seed, server_round):
    # Prepare
    nodes = list(np.random.default_rng(seed).permutation(np.arange(1000, 1000 + n)))

    # Execute
    first = sample_node_ids(nodes, fraction=fraction, min_nodes=min_nodes, seed=seed, server_round=server_round)
    again = sample_node_ids(reversed(nodes), fraction=fraction, min_nodes=min_nodes, seed=seed, server_round=server_round)

    # Assert
    assert first == again
    assert len(first) == min(n, max(int(fraction * n), min_nodes))
    assert len(set(first)) == len(first) and set(first) <= set(nodes)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction_train": 1.5}, "strategy.fraction_train=1.5"),
        ({"fraction_evaluate": -0.1}, "strategy.fraction_evaluate=-0.1"),
        ({"server_lr": -1.0}, "strategy.server_lr=-1.0"),
        ({"min_valid_replies": 0}, "strategy.min_valid_replies=0"),
        ({"min_train_nodes": True}, "strategy.min_train_nodes=True"),
    ],
)
def test_invalid_settings_name_key_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        WeightedFedAvg(**kwargs)


def test_the_epsilon_of_a_rejected_reply_still_counts_in_epsilon_record_max():
    # Prepare: node 9 trained privately (epsilon 7) but sent a malformed model
    strategy = WeightedFedAvg()
    configured(strategy)
    honest = client(1, 2.0, epsilon=1.5, delta=1e-5)
    wrong_shape = _bad_array("w", np.ones((2, 3), np.float32))
    malformed = reply(9, wrong_shape, {"num-examples": 5, "epsilon": 7.0, "delta": 1e-5})

    # Execute
    _, metrics = strategy.aggregate_train(1, [honest, malformed])

    # Assert
    assert metrics["num_rejected"] == 1
    assert metrics["epsilon_record_max"] == 7.0
    assert strategy.privacy_summary()["epsilon_record_max"] == 7.0


def test_a_decline_carries_its_reason_into_the_log(caplog):
    # Prepare
    from flwr.app import ConfigRecord as Config
    from flwr.app import Message, MetricRecord, RecordDict

    strategy = WeightedFedAvg()
    configured(strategy)
    request = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=2)
    content = {"metrics": MetricRecord({"num-examples": 1, "declined": 1}), "config": Config({"decline-reason": "ledger lost"})}
    decline = Message(content=RecordDict(content), reply_to=request)

    # Execute
    _, metrics = strategy.aggregate_train(1, [client(1, 2.0), decline])

    # Assert
    assert metrics["num_declined"] == 1
    assert "node 2 declined: ledger lost" in caplog.text
