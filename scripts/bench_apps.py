"""Components that only ``scripts/bench.py`` runs, each on fedpriv's own config.

- ``server_app``: Flower's built-in ``flwr.serverapp.strategy.FedAvg`` with the
  server-side evaluation fedpriv does, writing a small ``results.json``.
- ``client_app``: record-level DP-SGD written the way Flower's Opacus example
  writes it: a new ``PrivacyEngine`` every round (Opacus' defaults, so
  ``grad_sample_mode="hooks"``), so the epsilon it reports covers that round only.
- ``poisoning_client_app``: fedpriv's own ClientApp, except that the nodes of
  the first :data:`POISONED_PARTITIONS` partitions send the received model plus
  :data:`POISON_SCALE` times their update: well-formed, harmful replies for the
  robust-aggregation measurements (section 12). An attack to measure, not a
  product option.

The bench selects the apps with ``+mode.server_app=bench_apps:server_app
+mode.client_app=bench_apps:client_app`` (or ``bench_apps:poisoning_client_app``);
``scripts/`` must then be on ``PYTHONPATH`` so that Ray's workers import this
module. Its scale runs use ``dataset=synthetic`` (:class:`fedpriv.datasets.Synthetic`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clients import client_app as fedpriv_client_app
from fedpriv.experiment import client_examples, experiment_from_run_config
from fedpriv.opacus_logging import opacus_logging_contained
from fedpriv.protocol import WEIGHT_KEY
from fedpriv.training import evaluate

server_app = ServerApp()
client_app = ClientApp()
poisoning_client_app = ClientApp()
POISONED_PARTITIONS = 2
POISON_SCALE = -10.0


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of DP-SGD as in Flower's Opacus example (fresh PrivacyEngine)."""
    with opacus_logging_contained():
        from opacus import PrivacyEngine

    experiment = experiment_from_run_config(context.run_config)
    settings = experiment.client  # an OpacusTraining: the same hyperparameters as fedpriv's
    x, y = client_examples(
        experiment,
        partition_id=int(context.node_config["partition-id"]),
        num_partitions=int(context.node_config["num-partitions"]),
    )
    model = experiment.build_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    loader = DataLoader(TensorDataset(x, y), batch_size=settings.batch_size, shuffle=True)
    privacy_engine = PrivacyEngine(secure_mode=False)
    model, optimizer, loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
    )
    criterion = nn.CrossEntropyLoss()
    model.train()
    total, seen = 0.0, 0
    for _ in range(settings.local_epochs):
        for batch_x, batch_y in loader:
            if len(batch_y) == 0:
                continue  # an empty Poisson batch (rare at these sizes) would fail in hooks mode
            optimizer.zero_grad()
            loss = criterion(model(batch_x), batch_y)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(batch_y), seen + len(batch_y)
    epsilon = privacy_engine.get_epsilon(delta=settings.target_delta_for(len(y)))
    metrics = {WEIGHT_KEY: len(y), "train_loss": total / max(seen, 1), "epsilon": float(epsilon)}
    content = RecordDict(
        {"arrays": ArrayRecord(model._module.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


@poisoning_client_app.train()
def poisoned_train(msg: Message, context: Context) -> Message:
    """fedpriv's training; partitions below :data:`POISONED_PARTITIONS` scale their update by :data:`POISON_SCALE`."""
    answer = fedpriv_client_app.train(msg, context)
    if int(context.node_config["partition-id"]) >= POISONED_PARTITIONS or answer.has_error():
        return answer
    received, trained = msg.content["arrays"], answer.content["arrays"]
    poisoned = ArrayRecord({
        name: Array(received[name].numpy() + POISON_SCALE * (trained[name].numpy() - received[name].numpy()))
        for name in trained
    })
    content = RecordDict({"arrays": poisoned, "metrics": answer.content["metrics"]})
    return Message(content=content, reply_to=msg)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run Flower's FedAvg with server-side evaluation; write ``results.json``."""
    experiment = experiment_from_run_config(context.run_config)
    settings = experiment.settings
    torch.manual_seed(settings.seed)
    model = experiment.build_model()
    splits = experiment.dataset.load()
    rounds: list[dict] = []
    clock = {"start": time.perf_counter(), "last": time.perf_counter()}

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, splits.test_x, splits.test_y)
        now = time.perf_counter()
        if server_round == 0:
            clock.update(start=now, last=now)
        else:
            rounds.append({"round": server_round, "seconds": now - clock["last"], "test_accuracy": accuracy})
            clock["last"] = now
        return MetricRecord({"test_loss": loss, "test_accuracy": accuracy})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=settings.num_clients)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=settings.num_rounds,
        timeout=settings.round_timeout,
        evaluate_fn=evaluate_global,
    )
    # FedAvg reports the example-weighted mean of what the clients sent.
    for row in rounds:
        row["epsilon"] = result.train_metrics_clientapp[row["round"]]["epsilon"]
    document = {
        "rounds": rounds,
        "final": {"test_accuracy": rounds[-1]["test_accuracy"], "epsilon_reported": rounds[-1]["epsilon"]},
        "timing": {"total_seconds": clock["last"] - clock["start"]},
    }
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(document, indent=2) + "\n")
