"""Membership inference on a finished run's global model (what ``scripts/audit.py`` runs).

Members are the examples the clients trained on (the union of their
partitions, without audit canaries); non-members are the server's held-out
test split, which no client ever saw. Both come from the same distribution,
so an AUC above 0.5 measures what the model leaks about its training data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedpriv.experiment import Experiment, client_examples

from .membership import loss_threshold_scores, offline_lira_scores, roc_summary
from .model_outputs import logit_confidence, per_example_loss
from .shadow import balanced_halves, shadow_confidences

LOSS_METHOD = "loss_threshold (Yeom et al. 2018)"
LIRA_METHOD = "offline_lira_fixed_variance (Carlini et al. 2022)"


def _members(experiment: Experiment) -> tuple[torch.Tensor, torch.Tensor]:
    num_clients = experiment.settings.num_clients
    parts = [client_examples(experiment, partition_id=i, num_partitions=num_clients) for i in range(num_clients)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def _summary(method: str, scores: np.ndarray, is_member: np.ndarray) -> dict[str, Any]:
    roc = roc_summary(scores, is_member)
    return {
        "method": method,
        "auc": roc.auc,
        "tpr_at_1pct_fpr": roc.tpr_at_1pct_fpr,
        "tpr_at_0.1pct_fpr": roc.tpr_at_01pct_fpr,
        "num_members": roc.num_members,
        "num_nonmembers": roc.num_nonmembers,
    }


def membership_inference(
    experiment: Experiment,
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_shadows: int,
    shadow_epochs: int,
    shadow_lr: float,
    seed: int,
) -> dict[str, Any]:
    """Run the loss-threshold attack and offline LiRA against the global model.

    Parameters
    ----------
    experiment : Experiment
        The finished run's experiment (rebuilt from its ``results.json`` config).
    state_dict : Mapping[str, torch.Tensor]
        The global model to attack (``model.pt``).
    num_shadows : int
        Shadow models for LiRA, even and ``>= 2``.
    shadow_epochs : int
        Epochs of centralised training per shadow model, ``>= 1``.
    shadow_lr : float
        Learning rate of the shadows (optimizer, momentum and batch size are
        the client's).
    seed : int
        Seed of the shadows' data halves, initialisation and batch order.

    Returns
    -------
    dict[str, Any]
        ``{"loss_threshold": {...}, "lira": {...}, "shadow_models": K,
        "shadow_epochs": E}``; each attack holds ``method``, ``auc``,
        ``tpr_at_1pct_fpr``, ``tpr_at_0.1pct_fpr``, ``num_members`` and
        ``num_nonmembers``.
    """
    if isinstance(shadow_epochs, bool) or not isinstance(shadow_epochs, int) or shadow_epochs < 1:
        raise ValueError(f"shadow_epochs={shadow_epochs!r}: must be an integer >= 1")
    splits = experiment.dataset.load()
    member_x, member_y = _members(experiment)
    x = torch.cat([member_x, splits.test_x])
    y = torch.cat([member_y, splits.test_y])
    is_member = np.arange(len(y)) < len(member_y)

    target = experiment.build_model()
    target.load_state_dict(dict(state_dict))
    shadow_in = balanced_halves(seed=seed, num_examples=len(y), num_shadows=num_shadows)
    client = experiment.client
    shadows = shadow_confidences(
        build_model=experiment.build_model,
        x=x,
        y=y,
        shadow_in=shadow_in,
        epochs=shadow_epochs,
        batch_size=client.batch_size,
        optimizer=client.optimizer,
        lr=shadow_lr,
        momentum=client.momentum,
        seed=seed,
    )
    lira = offline_lira_scores(logit_confidence(target, x, y), shadows, shadow_in)
    return {
        "loss_threshold": _summary(LOSS_METHOD, loss_threshold_scores(per_example_loss(target, x, y)), is_member),
        "lira": _summary(LIRA_METHOD, lira, is_member),
        "shadow_models": num_shadows,
        "shadow_epochs": shadow_epochs,
    }
