"""The ClientApp's handlers, called directly with Flower messages and contexts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from clients import client_app
from clients.privacy_state import STATE_KEY
from fedpriv.compose import compose_config
from fedpriv.experiment import client_examples, load_experiment
from fedpriv.protocol import DECLINE_REASON_KEY, DECLINED_KEY, RESUMED_KEY
from fedpriv.run_config import flatten

PRIVATE = ["num_clients=3", "client=opacus"]
# What a record-level private client may send besides its model: its noisy
# size and values computed from it and from public config.
PRIVATE_REPLY_KEYS = {"num-examples", "epsilon", "delta", "noise_multiplier", "sample_rate", "steps"}


def context_for(overrides, *, partition_id=0, num_partitions=3) -> Context:
    run_config = flatten(compose_config(overrides))
    return Context(
        run_id=1,
        node_id=partition_id + 1,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=run_config,
    )


def request(overrides, *, message_type=MessageType.TRAIN, config=None) -> Message:
    torch.manual_seed(0)
    model = load_experiment(compose_config(overrides)).build_model()
    round_config = ConfigRecord({"server-round": 1, **(config or {})})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": round_config})
    return Message(content=content, message_type=message_type, dst_node_id=1)


def _arrays(answer: Message) -> list[np.ndarray]:
    return [array.numpy() for array in answer.content["arrays"].values()]


def test_train_replies_with_the_model_num_examples_and_loss():
    # Prepare
    overrides = ["num_clients=3", "client.local_epochs=1"]

    # Execute
    answer = client_app.train(request(overrides), context_for(overrides))

    # Assert
    assert not answer.has_error()
    metrics = answer.content["metrics"]
    assert metrics["num-examples"] > 0
    assert metrics["train_loss"] > 0
    sent = request(overrides).content["arrays"]
    assert list(answer.content["arrays"].keys()) == list(sent.keys())


@pytest.mark.parametrize(
    ("overrides", "binary"),
    [(["num_clients=3"], set()), (["dataset=german_credit", "num_clients=3"], {"eval_auc", "eval_balanced_accuracy", "eval_cost"})],
)
def test_evaluate_replies_with_loss_accuracy_num_examples_and_binary_metrics(overrides, binary):
    # Execute
    answer = client_app.evaluate(request(overrides, message_type=MessageType.EVALUATE), context_for(overrides))

    # Assert
    metrics = answer.content["metrics"]
    assert set(metrics) == {"num-examples", "eval_loss", "eval_accuracy", *binary}
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0


def test_a_client_whose_data_fails_to_load_replies_with_an_error(tmp_path):
    # Prepare: the model is built for MNIST, but no MNIST files are on disk
    overrides = ["num_clients=3", "dataset=mnist", "model=cnn28", f"dataset.root={tmp_path}"]

    # Execute
    answer = client_app.train(request(overrides), context_for(overrides))

    # Assert
    assert answer.has_error()
    assert answer.error.code == client_app.DATA_ERROR
    assert "client data could not be loaded" in answer.error.reason
    assert "dataset.root" in answer.error.reason


def test_a_private_client_does_not_quote_its_data_in_an_error_reply(tmp_path):
    # Prepare: a CSV whose bad cell is a record's value; the server knows only the path
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text("age,site,outcome\n" + "".join(f"{40 + i},{'AB'[i % 2]},{i % 3 % 2}\n" for i in range(20)))
    bad.write_text(good.read_text().replace("\n51,", "\nsecret-51,"))
    settings = ["dataset=csv", "dataset.label_column=outcome", "dataset.silo_column=site", "num_clients=2"]

    # Execute: the server's model has the file's width; the client reads its bad copy
    answers = {
        client: client_app.train(
            request([*settings, f"dataset.path={good}", f"client={client}"]),
            context_for([*settings, f"dataset.path={bad}", f"client={client}"]),
        )
        for client in ("plain", "opacus", "local_dp")
    }

    # Assert: a plain client says what is wrong (nothing of it is private); private ones do not
    assert "'secret-51' in row" in answers.pop("plain").error.reason
    for answer in answers.values():
        assert answer.error.code == client_app.DATA_ERROR
        assert answer.error.reason == (
            "client data could not be loaded: ValueError (a private client keeps the details in its own log)"
        )


def test_a_private_reply_carries_no_loss_and_no_exact_count():
    # Prepare
    context = context_for(PRIVATE)
    experiment = load_experiment(compose_config(PRIVATE))
    x, _ = client_examples(experiment, partition_id=0, num_partitions=3)

    # Execute
    answer = client_app.train(request(PRIVATE), context)

    # Assert
    metrics = answer.content["metrics"]
    assert set(metrics) == PRIVATE_REPLY_KEYS
    assert metrics["num-examples"] == context.state[STATE_KEY]["noisy_count"] != len(x)
    assert context.state[STATE_KEY]["steps"][0] == 1  # the count release is in the ledger


def test_the_replay_attack_on_a_default_private_client_fails():
    # Prepare: the attacker knows the published seed and every record, and
    # replays the client's training with the seed the client used to derive.
    victim_context = context_for(PRIVATE)
    released = _arrays(client_app.train(request(PRIVATE), victim_context))
    seeded = PRIVATE + ["seeded_noise=true"]

    # Execute: with the seed from the config, as training was seeded before.
    replays = [_arrays(client_app.train(request(seeded), context_for(seeded))) for _ in range(2)]

    # Assert: a seeded replay is reproducible, yet matches nothing the client released.
    assert all(np.array_equal(a, b) for a, b in zip(*replays, strict=True))
    assert not any(np.array_equal(a, b) for a, b in zip(released, replays[0], strict=True))


def test_two_private_runs_differ_and_two_plain_runs_are_identical():
    # Prepare
    plain = ["num_clients=3", "client.local_epochs=1"]

    # Execute
    private_runs = [_arrays(client_app.train(request(PRIVATE), context_for(PRIVATE))) for _ in range(2)]
    plain_runs = [_arrays(client_app.train(request(plain), context_for(plain))) for _ in range(2)]

    # Assert
    assert not any(np.array_equal(a, b) for a, b in zip(*private_runs, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(*plain_runs, strict=True))


def test_a_private_client_without_its_ledger_in_a_resumed_run_declines(tmp_path):
    # Prepare: a resumed run (after round 2) whose ledger folder holds nothing.
    overrides = PRIVATE + [f"output_dir={tmp_path}"]
    resumed = request(overrides, config={RESUMED_KEY: 2, "privacy-ledger-id": "lost"})

    # Execute
    answer = client_app.train(resumed, context_for(overrides))

    # Assert
    assert not answer.has_error()
    assert answer.content["metrics"][DECLINED_KEY] == 1
    assert "arrays" not in answer.content
    assert "without this client's privacy ledger" in answer.content["config"][DECLINE_REASON_KEY]


def test_a_private_client_refuses_federated_evaluation():
    # Execute
    answer = client_app.evaluate(request(PRIVATE, message_type=MessageType.EVALUATE), context_for(PRIVATE))

    # Assert
    assert answer.has_error()
    assert answer.error.code == client_app.EVALUATE_REFUSED


def test_a_secure_runs_client_answers_every_secagg_stage_and_never_sends_its_model(tmp_path):
    # Prepare: three record-level private clients of a secure run, their ledgers on disk.
    from fedpriv.secagg import messages as m
    from fedpriv.secagg.config import SecAggPlus
    from fedpriv.secagg.encoding import WeightedEncoding
    from strategies.secagg_server import SecAggPlusRound, parse_setup_reply

    overrides = ["num_clients=3", "secure=secagg", "client=opacus", "client.local_epochs=1", f"output_dir={tmp_path}"]
    contexts = {node: context_for(overrides, partition_id=node - 1) for node in (1, 2, 3)}
    sent = request(overrides, config={"privacy-ledger-id": "L"})
    dimension = sum(array.numpy().size for array in sent.content["arrays"].values())
    encoding = WeightedEncoding(clipping_range=8.0, quantization_range=2**22, max_weight=1000.0)
    round_ = SecAggPlusRound(config=SecAggPlus(), node_ids=[1, 2, 3], server_round=1, length=encoding.length(dimension))
    setup_record = ConfigRecord({**round_.setup_record(), **m.encoding_to_record(encoding)})

    def to_node(message: Message, node: int) -> Message:
        return Message(content=message.content, message_type=MessageType.TRAIN, dst_node_id=node)

    replies = []

    def exchange(messages, timeout):
        answers = [client_app.train(msg, contexts[msg.metadata.dst_node_id]) for msg in messages]
        replies.extend(answers)
        return answers

    # Execute
    with_setup = RecordDict({**dict(sent.content), m.RECORD: setup_record})
    setup = [
        client_app.train(Message(content=with_setup, message_type=MessageType.TRAIN, dst_node_id=n), contexts[n])
        for n in (1, 2, 3)
    ]
    keys = {}
    for answer in setup:
        node, pair, spent = parse_setup_reply(answer)
        keys[node] = pair
    outcome = round_.finish(exchange, public_keys=keys)
    plain = client_app.train(to_node(sent, 1), contexts[1])

    # Assert: the sum of three weights and updates, no array but masked ones, no secret on disk.
    assert outcome.refused == "" and outcome.survivors == 3
    assert 0 < outcome.total[0] <= 3 * 2**22
    assert all(set(a.content.metric_records.get("metrics", {})) <= {"epsilon", "delta"} for a in setup)
    assert all(not a.content.array_records for a in setup)
    assert all(set(a.content.array_records) <= {m.MASKED} for a in replies)
    assert plain.has_error() and "only through SecAgg+" in plain.error.reason
    ledger = (tmp_path / "client-state" / "L" / "partition-0.json").read_text()
    assert STATE_KEY in ledger and m.RECORD not in ledger
    assert m.RECORD not in contexts[1].state.config_records


def _dp_setup_message(overrides, *, variance_factor: float = 1.0):
    from fedpriv.secagg import messages as m
    from fedpriv.secagg.config import SecAggPlus
    from fedpriv.secagg.encoding import DistributedDPEncoding, plan_distributed_noise
    from strategies.secagg_server import SecAggPlusRound

    sent = request(overrides)
    dimension = sum(array.numpy().size for array in sent.content["arrays"].values())
    plan = plan_distributed_noise(
        clipping_norm=1.0, noise_multiplier=1.0, max_clients=3, dimension=dimension, modulus=2**32, dropout_tolerance=0.2
    )
    encoding = DistributedDPEncoding(
        clipping_norm=1.0, weighted=True, weight_cap=100.0, scale=plan.scale,
        variance_per_client=plan.variance_per_client(3) * variance_factor,
    )
    round_ = SecAggPlusRound(config=SecAggPlus(), node_ids=[1, 2, 3], server_round=1, length=encoding.length(dimension))
    record = ConfigRecord({**round_.setup_record(), **m.encoding_to_record(encoding)})
    return Message(content=RecordDict({**dict(sent.content), m.RECORD: record}), message_type=MessageType.TRAIN, dst_node_id=1)


def test_a_secure_dp_client_draws_fresh_noise_and_refuses_less_than_the_config_implies():
    # Prepare: a plain client (its training is seeded from the config) in a secure DP run
    from fedpriv.secagg import messages as m

    overrides = ["num_clients=3", "secure=secagg", "strategy=dp_fixed", "strategy.noise_multiplier=1.0",
                 "strategy.clipping_norm=1.0", "client.local_epochs=1"]
    contexts = [context_for(overrides) for _ in range(3)]

    # Execute: the same round twice, then a server asking for a tenth of the noise
    first = client_app.train(_dp_setup_message(overrides), contexts[0])
    second = client_app.train(_dp_setup_message(overrides), contexts[1])
    cheap = client_app.train(_dp_setup_message(overrides, variance_factor=0.1), contexts[2])

    # Assert: identical training, different noise: nobody can replay it from the config
    inputs = [c.state.array_records[m.INPUT_RECORD]["input"].numpy() for c in contexts[:2]]
    assert not first.has_error() and not second.has_error()
    assert not np.array_equal(inputs[0], inputs[1])
    assert cheap.has_error() and "below the" in cheap.error.reason
