"""The reference points of a federated run: the same model on the pooled data, and on each client's data alone.

Pooling is what the federation's members cannot do, so the pooled model is
the upper reference; each client alone is the lower one. Both train the
run's model with the run's optimizer settings, without privacy, for the same
budget of epochs as a client's whole run (``num_rounds * local_epochs``), and
are scored on the server's test split with the run's own metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedpriv.experiment import Experiment, client_examples
from fedpriv.metrics import dataset_metrics
from fedpriv.training import make_optimizer, train_epochs


def reference_points(experiment: Experiment) -> list[dict[str, Any]]:
    """Train the pooled and the per-client references of ``experiment``.

    Returns
    -------
    list of dict
        ``{"reference": "pooled" | "client <i> alone", "examples": n, **metrics}``,
        the pooled one first, then one per client (a silo under ``partition=natural``).
    """
    settings = experiment.settings
    client = experiment.client
    splits = experiment.dataset.load()
    clients = [
        client_examples(experiment, partition_id=i, num_partitions=settings.num_clients)
        for i in range(settings.num_clients)
    ]
    parties = [("pooled", experiment.dataset.local_features(splits.train_x), splits.train_y)]
    parties += [(f"client {i} alone", x, y) for i, (x, y) in enumerate(clients)]
    rows = []
    for number, (name, x, y) in enumerate(parties):
        model = experiment.build_model()
        seed = int(np.random.SeedSequence([settings.seed, number]).generate_state(1)[0])
        optimizer = make_optimizer(
            client.optimizer, model.parameters(), lr=client.lr, momentum=client.momentum, weight_decay=client.weight_decay
        )
        train_epochs(
            model,
            x,
            y,
            optimizer=optimizer,
            epochs=settings.num_rounds * client.local_epochs,
            batch_size=client.batch_size,
            generator=torch.Generator().manual_seed(seed),
        )
        scores = dataset_metrics(model, splits.test_x, splits.test_y, dataset=experiment.dataset)
        rows.append({"reference": name, "examples": len(y), **scores})
    return rows
