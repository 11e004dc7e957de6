"""Test metrics the server reports: accuracy for every task, and what binary tasks' users read.

ROC AUC and balanced accuracy (for imbalanced outcomes such as heart disease or
credit default), and a misclassification cost where the data set documents a
cost matrix. Pure functions over arrays, plus :func:`evaluation_metrics` for a model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from fedpriv.training import loss_and_accuracy, predict


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for the positive class 1 (ties count one half).

    The Mann-Whitney statistic over average ranks. ``None`` when ``labels`` has
    only one class, where the AUC is undefined.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    positives = int(np.sum(labels == 1))
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return None
    # Imported here: scipy.stats costs 0.5 s, paid by every fresh ClientApp process otherwise.
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def balanced_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in ``labels`` of the fraction of that class predicted right."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    recalls = [float(np.mean(predictions[labels == c] == c)) for c in np.unique(labels)]
    return float(np.mean(recalls)) if recalls else 0.0


def misclassification_cost(
    predictions: np.ndarray, labels: np.ndarray, *, false_positive: float, false_negative: float
) -> float:
    """Mean cost per example: ``false_positive`` for a 0 predicted 1, ``false_negative`` for a 1 predicted 0."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if labels.size == 0:
        return 0.0
    fp = np.sum((predictions == 1) & (labels == 0))
    fn = np.sum((predictions == 0) & (labels == 1))
    return float((false_positive * fp + false_negative * fn) / labels.size)


def evaluation_metrics(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_classes: int, costs: tuple[float, float] | None = None
) -> dict[str, float | None]:
    """``test_loss`` and ``test_accuracy``; for two classes also ``test_auc`` and ``test_balanced_accuracy``.

    ``model``, ``x`` and ``y`` may be on any one device. With ``costs`` (false positive,
    false negative), also ``test_cost``, the mean misclassification cost.
    """
    # One forward pass, on the device of the model and ``x``, serves every metric;
    # the rest is cheap, and the binary metrics need NumPy arrays.
    logits, y = predict(model, x).cpu(), y.cpu()
    loss, accuracy = loss_and_accuracy(logits, y)
    metrics: dict[str, float | None] = {"test_loss": loss, "test_accuracy": accuracy}
    if num_classes != 2:
        return metrics
    logits = logits.double()
    labels = y.numpy()
    predictions = logits.argmax(dim=1).numpy()
    # The positive class's log-odds ranks examples as its probability does, without overflow.
    score = (logits[:, 1] - logits[:, 0]).numpy()
    metrics["test_auc"] = roc_auc(score, labels) if np.all(np.isfinite(score)) else None
    metrics["test_balanced_accuracy"] = balanced_accuracy(predictions, labels)
    if costs is not None:
        metrics["test_cost"] = misclassification_cost(
            predictions, labels, false_positive=costs[0], false_negative=costs[1]
        )
    return metrics


def dataset_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, dataset: Any) -> dict[str, float | None]:
    """:func:`evaluation_metrics` with the task's classes and, where it documents one, its cost matrix."""
    return evaluation_metrics(model, x, y, num_classes=dataset.num_classes, costs=getattr(dataset, "costs", None))
