"""Homomorphic encryption (secure=ckks): parameters, keys, packing, the blind server, the clients, the runs."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from conftest import FakeGrid, arrays_record, run_project_script
from fedpriv.he import CKKS
from fedpriv.he.config import TENSEAL_MISSING
from fedpriv.he.keys import KeyMaterialError, fingerprint, load_public_context, load_secret_context, make_keys
from fedpriv.he.packing import FINGERPRINT, RECORD, decrypt_average, encrypt_weighted, is_encrypted
from strategies import WeightedFedAvg
from strategies.aggregation import weighted_average
from strategies.he_server import EncryptedSum

CKKS_ERROR = 1e-9
"""Bound on the absolute error of a decrypted weighted mean at the default parameters (scale 2^40),
10 clients, values of size <= 10, weights their example counts: measured at most 1.2e-11."""


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("he-keys")
    make_keys(folder, CKKS())
    return folder, load_secret_context(folder), load_public_context(folder)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"poly_modulus_degree": 1000}, "secure.poly_modulus_degree=1000"),
        ({"poly_modulus_degree": 4096}, "secure.coeff_mod_bit_sizes=[60, 40, 40, 60]: TenSEAL refuses"),
        ({"coeff_mod_bit_sizes": [61, 40, 61]}, r"secure.coeff_mod_bit_sizes=61"),
        ({"coeff_mod_bit_sizes": [30, 30]}, "secure.coeff_mod_bit_sizes=[30, 30]: TenSEAL refuses it .*scale out of bounds"),
        ({"global_scale": 2.0**10}, "secure.global_scale=1024.0: values do not survive"),
        ({"global_scale": 3.0e9}, "secure.global_scale=3000000000.0: must be a power of 2"),
        ({"eval_fraction": 0.9}, "secure.eval_fraction=0.9"),
    ],
)
def test_bad_ckks_parameters_are_one_line_naming_the_key(overrides, message):
    # Execute / Assert
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        CKKS(**overrides)


def test_without_tenseal_secure_ckks_says_how_to_install_it(monkeypatch):
    # Prepare: TenSEAL cannot be imported
    monkeypatch.setitem(sys.modules, "tenseal", None)

    # Execute / Assert
    with pytest.raises(ValueError, match=TENSEAL_MISSING.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        CKKS()


def test_the_server_context_holds_no_secret_key_and_shares_the_clients_fingerprint(keys, tmp_path):
    # Prepare
    folder, secret, public = keys
    (tmp_path / "public-context.tenseal").write_bytes((folder / "secret-context.tenseal").read_bytes())

    # Execute / Assert
    assert secret.is_private() and not public.is_private()
    assert fingerprint(secret) == fingerprint(public)
    assert oct((folder / "secret-context.tenseal").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(KeyMaterialError, match="holds a secret key"):
        load_public_context(tmp_path)
    with pytest.raises(KeyMaterialError, match="scripts/he_keys.py"):
        load_secret_context(tmp_path / "missing")


def test_the_decrypted_aggregate_is_the_weighted_average_within_the_ckks_error(keys):
    # Prepare: 10 clients, models of 10,000 values (3 ciphertexts each)
    _, secret, public = keys
    rng = np.random.default_rng(0)
    models = [rng.normal(scale=3.0, size=10_000).clip(-10, 10) for _ in range(10)]
    weights = [float(n) for n in rng.integers(20, 900, size=10)]
    total = EncryptedSum(public)

    # Execute
    for model, weight in zip(models, weights, strict=True):
        total.add(encrypt_weighted(secret, model, weight=weight, slots=CKKS().slots))
    average = decrypt_average(secret, total.record(), length=10_000)

    # Assert
    expected = weighted_average([[m] for m in models], weights)[0]
    assert np.max(np.abs(average - expected)) < CKKS_ERROR
    assert is_encrypted(total.record()) and len(total.record()) == 3


def test_a_model_under_another_key_does_not_decrypt_and_garbage_is_refused(keys, tmp_path):
    # Prepare
    _, secret, public = keys
    make_keys(tmp_path, CKKS())
    other = load_secret_context(tmp_path)
    record = encrypt_weighted(other, np.ones(10), weight=0.5, slots=CKKS().slots)
    garbage = ArrayRecord({"ckks-00000": arrays_record({"x": np.arange(50, dtype=np.uint8)})["x"]})

    # Execute / Assert
    with pytest.raises(ValueError, match="wrong key"):
        decrypt_average(secret, record, length=10)
    with pytest.raises(ValueError, match="not a ciphertext"):
        EncryptedSum(public).add(garbage)


def _global_arrays():
    return {"w": np.zeros((4, 5), dtype=np.float32), "b": np.ones(3, dtype=np.float32)}


def _encrypted_reply(request: Message, secret, *, flat: np.ndarray, num_examples: float) -> Message:
    record = encrypt_weighted(secret, flat, weight=num_examples, slots=CKKS().slots)
    return Message(content=RecordDict({"arrays": record, "metrics": MetricRecord({"epsilon": 1.5, "delta": 1e-5})}), reply_to=request)


def _walk(value, seen=None):
    """Every object reachable from ``value``'s attributes, containers included."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    yield value
    children = []
    if isinstance(value, dict):
        children = [*value.keys(), *value.values()]
    elif isinstance(value, list | tuple | set):
        children = list(value)
    elif hasattr(value, "__dict__") and not isinstance(value, type) and type(value).__module__.split(".")[0] in {
        "strategies", "fedpriv", "flwr"
    }:
        children = list(vars(value).values())
    for child in children:
        yield from _walk(child, seen)


def test_the_blind_server_adds_ciphertexts_and_stores_no_secret_and_no_plaintext_model(keys):
    # Prepare: round 2 of a run, the global model already encrypted
    _, secret, public = keys
    strategy = WeightedFedAvg(min_available_nodes=3)
    strategy.enable_homomorphic_encryption(CKKS(), dimension=23, public_context=public)
    rng = np.random.default_rng(1)
    models = {node: rng.normal(size=23) for node in (1, 2, 3)}
    examples = {1: 100.0, 2: 300.0, 3: 600.0}
    start = encrypt_weighted(secret, np.zeros(23), weight=1.0, slots=CKKS().slots)

    # Execute
    messages = list(strategy.configure_train(2, start, ConfigRecord(), FakeGrid([1, 2, 3])))
    replies = [_encrypted_reply(msg, secret, flat=models[msg.metadata.dst_node_id], num_examples=examples[msg.metadata.dst_node_id]) for msg in messages]
    arrays, metrics = strategy.aggregate_train(2, replies)

    # Assert: the sum decrypts to FedAvg; the server held ciphertexts and a public context only
    expected = weighted_average([[models[n]] for n in (1, 2, 3)], [examples[n] for n in (1, 2, 3)])[0]
    assert np.max(np.abs(decrypt_average(secret, arrays, length=23) - expected)) < CKKS_ERROR
    assert all(msg.content.config_records[RECORD][FINGERPRINT] == fingerprint(public) for msg in messages)
    assert metrics["num_clients"] == 3 and metrics["epsilon_record_max"] == 1.5
    assert strategy.fraction_evaluate == 1.0
    stored = list(_walk(strategy))
    contexts = [obj for obj in stored if hasattr(obj, "is_private") and callable(obj.is_private)]
    assert contexts and not any(context.is_private() for context in contexts)
    floats = [obj for obj in stored if isinstance(obj, np.ndarray) and obj.dtype.kind == "f" and obj.size > 1]
    assert floats == []


def test_a_dp_strategy_and_a_server_step_are_refused_with_ckks():
    # Prepare
    from strategies import DPFedAvg

    dp = DPFedAvg(num_clients=3, sample_rate=1.0, noise_multiplier=1.0, clipping_norm=1.0)

    # Execute / Assert
    with pytest.raises(ValueError, match="cannot read encrypted ones"):
        dp.enable_homomorphic_encryption(CKKS(), dimension=10)
    with pytest.raises(ValueError, match="strategy.server_lr=0.5"):
        WeightedFedAvg(server_lr=0.5).enable_homomorphic_encryption(CKKS(), dimension=10)


def test_a_client_without_the_key_or_with_another_replies_an_error_that_is_counted(keys, tmp_path):
    # Prepare
    from clients import client_app
    from fedpriv.compose import compose_config
    from fedpriv.experiment import load_experiment
    from fedpriv.run_config import flatten

    folder, _, public = keys
    overrides = ["num_clients=3", "secure=ckks", f"secure.key_dir={tmp_path / 'nowhere'}", "client.local_epochs=1"]
    torch.manual_seed(0)
    model = load_experiment(compose_config(overrides)).build_model()
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "config": ConfigRecord({"server-round": 1}),
            RECORD: ConfigRecord({FINGERPRINT: fingerprint(public)}),
        }
    )
    request = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)

    def context(node_config):
        return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=flatten(compose_config(overrides)))

    make_keys(tmp_path / "other", CKKS())

    # Execute
    missing = client_app.train(request, context({"partition-id": 0, "num-partitions": 3}))
    wrong = client_app.train(request, context({"partition-id": 0, "num-partitions": 3, "he-key-dir": str(tmp_path / "other")}))
    right = client_app.train(request, context({"partition-id": 0, "num-partitions": 3, "he-key-dir": str(folder)}))
    strategy = WeightedFedAvg(min_available_nodes=1)
    strategy.enable_homomorphic_encryption(CKKS(), dimension=sum(v.numel() for v in model.state_dict().values()), public_context=public)
    list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), FakeGrid([1])))
    _, metrics = strategy.aggregate_train(1, [missing, wrong, right])

    # Assert
    assert missing.has_error() and "scripts/he_keys.py" in missing.error.reason
    assert wrong.has_error() and "wrong or missing key" in wrong.error.reason
    assert not right.has_error() and is_encrypted(right.content["arrays"])
    assert "metrics" not in right.content.metric_records or "num-examples" not in right.content["metrics"]
    assert metrics["num_rejected"] == 2 and metrics["num_clients"] == 1


def test_secure_ckks_with_server_side_dp_is_refused_in_one_line_with_exit_2(tmp_path):
    # Execute
    result = run_project_script("run.py", "secure=ckks", "strategy=dp_fixed", f"output_dir={tmp_path / 'run'}", cwd=tmp_path)

    # Assert
    assert result.returncode == 2
    assert "cannot read encrypted ones" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "he-keys").exists()


@pytest.mark.slow
def test_a_ckks_simulation_keeps_the_model_encrypted_and_a_key_holder_decrypts_it(tmp_path):
    # Prepare
    out = tmp_path / "run"

    # Execute
    result = run_project_script("run.py", "secure=ckks", "num_clients=3", "num_rounds=2", "client.local_epochs=1", f"output_dir={out}", cwd=tmp_path)
    decrypted = run_project_script("decrypt_model.py", str(out), cwd=tmp_path)

    # Assert: federated evaluation stands in for the server's; only ciphertexts on the server's side
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads((out / "results.json").read_text())
    assert document["privacy"]["secure_aggregation"] == "ckks"
    assert [row["num_clients"] for row in document["rounds"]] == [3, 3]
    assert all(0.3 < row["test_accuracy"] <= 1.0 for row in document["rounds"])
    assert document["rounds"][0]["train_loss"] is None
    encrypted = torch.load(out / "model-encrypted.pt")
    assert encrypted and all(name.startswith("ckks-") and value.dtype == torch.uint8 for name, value in encrypted.items())
    assert decrypted.returncode == 0, decrypted.stderr
    from fedpriv.experiment import load_experiment
    from fedpriv.metrics import dataset_metrics

    experiment = load_experiment(document["config"])
    model = experiment.build_model()
    model.load_state_dict(torch.load(out / "model.pt"))
    splits = experiment.dataset.load()
    assert dataset_metrics(model, splits.test_x, splits.test_y, dataset=experiment.dataset)["test_accuracy"] > 0.5


def test_private_clients_are_not_asked_to_evaluate_and_the_round_line_says_so():
    # Prepare
    from strategies.server_app import round_line

    strategy = WeightedFedAvg()

    # Execute
    strategy.enable_homomorphic_encryption(CKKS(), dimension=10, evaluate=False)
    line = round_line({"round": 1, "test_accuracy": None}, rounds=[{"seconds": None}], total_rounds=2)

    # Assert
    assert strategy.fraction_evaluate == 0.0
    assert "test accuracy none (no client evaluated)" in line
