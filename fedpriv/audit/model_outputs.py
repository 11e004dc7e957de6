"""Per-example outputs of a classifier that the attacks score."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[start : start + batch_size]) for start in range(0, len(x), batch_size)])


def per_example_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024) -> np.ndarray:
    """Cross-entropy of ``model`` on each example (the model is put in eval mode).

    Returns
    -------
    numpy.ndarray
        float64, length ``len(y)``.
    """
    logits = _logits(model, x, batch_size=batch_size)
    return functional.cross_entropy(logits, y, reduction="none").double().numpy()


def logit_confidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024) -> np.ndarray:
    """LiRA's ``phi = log(p_y / (1 - p_y))`` of each example.

    Computed as ``z_y - logsumexp_{j != y} z_j`` from the logits ``z``, which
    equals ``log p_y - log(1 - p_y)`` without cancelling to ``inf`` when ``p_y``
    rounds to 1.

    Returns
    -------
    numpy.ndarray
        float64, length ``len(y)``.
    """
    logits = _logits(model, x, batch_size=batch_size).double()
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, y.view(-1, 1), float("-inf"))
    return (true - torch.logsumexp(others, dim=1)).numpy()
