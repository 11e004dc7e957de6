"""Compressed updates: unbiased quantization, top-k with error feedback, decoding on the server, runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FakeGrid, arrays_record, run_project_script
from fedpriv.compression import PAYLOAD, CompressionError, Quantize, TopK
from strategies import DPFedAvg, WeightedFedAvg

GLOBAL = {"w": np.zeros((6, 7), dtype=np.float32), "b": np.ones(5, dtype=np.float32)}


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantization_is_unbiased_and_takes_bits_per_value_plus_a_scale_per_block(bits):
    # Prepare
    rng = np.random.default_rng(bits)
    update = rng.normal(scale=0.3, size=(40, 10))
    quantize = Quantize(bits=bits, block_size=64)
    draws = 4000

    # Execute
    decoded = np.stack([quantize.decode("w", quantize.encode("w", update, rng=rng), shape=update.shape) for _ in range(draws)])
    payload = quantize.encode("w", update, rng=rng)

    # Assert: each coordinate's mean within 5 standard errors of the value (a z-test; the
    # block maxima are exact, up to their float32 scale)
    standard_error = decoded.std(axis=0) / np.sqrt(draws)
    assert np.all(np.abs(decoded.mean(axis=0) - update) <= 5 * standard_error + 1e-6)
    assert payload["w#codes"].dtype == np.uint8 and payload["w#codes"].size == -(-400 * bits // 8)
    assert payload["w#scale"].dtype == np.float32 and payload["w#scale"].size == 7


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 500), fraction=st.floats(0.001, 1.0), seed=st.integers(0, 2**16))
def test_topk_keeps_exactly_k_entries_the_largest_and_leaves_the_rest_as_residual(size, fraction, seed):
    # Prepare
    update = np.random.default_rng(seed).normal(size=size)
    topk = TopK(fraction=fraction)

    # Execute
    payload, residual = topk.encode("w", update)
    sent = topk.decode("w", payload, shape=(size,))

    # Assert
    k = topk.k(size)
    assert np.count_nonzero(payload["w#value"]) <= k and payload["w#index"].size == k
    assert np.min(np.abs(update[payload["w#index"]])) >= np.max(np.abs(np.delete(update, payload["w#index"])), initial=0)
    assert np.allclose(sent + residual, update, atol=1e-6)


def test_error_feedback_sends_over_rounds_what_one_round_left_out():
    # Prepare: the same update three times, 10% sent each round
    update = np.random.default_rng(3).normal(size=100)
    topk = TopK(fraction=0.1)
    residual = np.zeros(100)
    sent = np.zeros(100)

    # Execute
    for _ in range(3):
        payload, residual = topk.encode("w", update + residual)
        sent += topk.decode("w", payload, shape=(100,))

    # Assert: everything is accounted for, and more than one round's top 10 went out
    assert np.allclose(sent + residual, 3 * update, atol=1e-5)
    assert np.count_nonzero(sent) > 10


def _reply(node_id: int, payload: dict[str, np.ndarray], num_examples: float = 10.0) -> Message:
    request = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node_id)
    record = ArrayRecord({name: Array(value) for name, value in payload.items()})
    return Message(content=RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": num_examples})}), reply_to=request)


def _encode(compression, updates: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The payload of a client whose update is ``updates`` (flattened in the model's order)."""
    flat = np.concatenate([value.ravel() for value in updates.values()])
    if isinstance(compression, TopK):
        return compression.encode(PAYLOAD, flat)[0]
    return compression.encode(PAYLOAD, flat, rng=np.random.default_rng(0))


@pytest.mark.parametrize("compression", [Quantize(bits=8, block_size=16), TopK(fraction=1.0)])
def test_the_server_decodes_compressed_replies_and_rejects_malformed_ones(compression):
    # Prepare: two honest clients and four broken payloads
    strategy = WeightedFedAvg(min_available_nodes=2)
    strategy.enable_compression(compression)
    list(strategy.configure_train(1, arrays_record(GLOBAL), ConfigRecord(), FakeGrid([1, 2, 3, 4, 5, 6])))
    updates = {name: np.full(value.shape, 0.25) for name, value in GLOBAL.items()}
    good = _encode(compression, updates)
    first = next(iter(good))
    missing = {k: v for k, v in good.items() if k != first}
    wrong_dtype = {**good, first: good[first].astype(np.float64)}
    key = "update#index" if isinstance(compression, TopK) else "update#scale"
    broken = {**good, key: np.full_like(good[key], -1 if isinstance(compression, TopK) else np.nan)}
    extra = {**good, "z": np.zeros(3, dtype=np.float32)}
    replies = [_reply(1, good), _reply(2, good), _reply(3, missing), _reply(4, wrong_dtype), _reply(5, broken), _reply(6, extra)]

    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)

    # Assert
    assert metrics["num_clients"] == 2 and metrics["num_rejected"] == 4
    for name, value in GLOBAL.items():
        assert np.allclose(arrays[name].numpy(), value + 0.25, atol=1e-2)


def test_malformed_payloads_name_what_is_wrong():
    # Execute / Assert
    with pytest.raises(CompressionError, match="distinct"):
        TopK(fraction=0.5).decode("w", {"w#index": np.array([1, 1], dtype=np.int32), "w#value": np.ones(2, np.float32)}, shape=(4,))
    with pytest.raises(CompressionError, match="'w#scale' missing"):
        Quantize(bits=4, block_size=8).decode("w", {"w#codes": np.zeros(2, np.uint8)}, shape=(4,))


def test_dp_fedavg_clips_the_decoded_update_so_its_sensitivity_is_unchanged():
    # Prepare: one client's update of norm 100, compressed
    strategy = DPFedAvg(num_clients=1, sample_rate=1.0, noise_multiplier=0.0, clipping_norm=1.0, weighted=False)
    strategy.enable_compression(Quantize(bits=8, block_size=16))
    list(strategy.configure_train(1, arrays_record(GLOBAL), ConfigRecord(), FakeGrid([1])))
    updates = {name: np.full(value.shape, 100 / np.sqrt(47)) for name, value in GLOBAL.items()}

    # Execute
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _encode(Quantize(bits=8, block_size=16), updates))])

    # Assert
    moved = np.sqrt(sum(np.sum((arrays[n].numpy() - v) ** 2) for n, v in GLOBAL.items()))
    assert moved == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [["compression=quantize", "secure=secagg"], ["compression=topk", "secure=ckks"]],
)
def test_compression_with_secure_aggregation_or_encryption_is_one_line_and_exit_2(tmp_path, overrides):
    # Execute
    result = run_project_script("run.py", *overrides, f"output_dir={tmp_path / 'run'}", cwd=tmp_path)

    # Assert
    assert result.returncode == 2
    assert "encodes updates itself" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_quantized_and_topk_simulations_send_fewer_bytes_up_and_still_learn(tmp_path):
    # Execute: 8-bit quantization and 10% top-k, private clients for the first
    runs = {}
    for name, overrides in {
        "quantize": ["compression=quantize", "compression.bits=8", "client=opacus"],
        "topk": ["compression=topk", "compression.fraction=0.1"],
    }.items():
        out = tmp_path / name
        result = run_project_script(
            "run.py", *overrides, "num_clients=3", "num_rounds=2", "client.local_epochs=1", f"output_dir={out}", cwd=tmp_path
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs[name] = json.loads((out / "results.json").read_text())

    # Assert: a float32 model of 9,610 values is 38 KB per client; the replies are far smaller
    for name, ceiling in (("quantize", 0.26), ("topk", 0.21)):
        rows = runs[name]["rounds"]
        assert [row["num_clients"] for row in rows] == [3, 3] and all(row["num_rejected"] == 0 for row in rows)
        assert rows[-1]["bytes_up"] / 3 < ceiling * 4 * 9610 + 2000
        assert runs[name]["final"]["test_accuracy"] > 0.2
    assert runs["quantize"]["final"]["epsilon_record_max"] is not None
