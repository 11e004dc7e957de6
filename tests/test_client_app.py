"""The ClientApp's handlers, called directly with Flower messages and contexts."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from clients import client_app
from fedpriv.compose import compose_config
from fedpriv.experiment import load_experiment
from fedpriv.run_config import flatten


def context_for(overrides, *, partition_id=0, num_partitions=3) -> Context:
    run_config = flatten(compose_config(overrides))
    return Context(
        run_id=1,
        node_id=partition_id + 1,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=run_config,
    )


def request(overrides, *, message_type=MessageType.TRAIN) -> Message:
    model = load_experiment(compose_config(overrides)).build_model()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})})
    return Message(content=content, message_type=message_type, dst_node_id=1)


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


def test_evaluate_replies_with_loss_accuracy_and_num_examples():
    # Prepare
    overrides = ["num_clients=3"]

    # Execute
    answer = client_app.evaluate(request(overrides, message_type=MessageType.EVALUATE), context_for(overrides))

    # Assert
    metrics = answer.content["metrics"]
    assert set(metrics) == {"num-examples", "eval_loss", "eval_accuracy"}
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
