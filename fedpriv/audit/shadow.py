"""Shadow models for the calibrated membership attack (offline LiRA).

Each shadow model is trained from scratch, centrally and without privacy, on a
random half of the candidate examples (members and non-members of the target
run pooled), the way Carlini et al. (2022) train theirs. The halves are
balanced: every example is in exactly half of the shadows, so each example
has ``K / 2`` shadows that never saw it. Centralised training for
``num_rounds * local_epochs`` epochs exposes a shadow to its data as often as
FedAvg exposed the global model to the clients' data; it ignores the
federation and any DP noise, which shifts the shadows' confidences but not
which examples are hard, and that is what the calibration uses.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral

import numpy as np
import torch
from torch import nn

from fedpriv.training import make_optimizer, train_epochs

from .model_outputs import logit_confidence


def balanced_halves(*, seed: int, num_examples: int, num_shadows: int) -> np.ndarray:
    """Which shadow trains on which example: each example in exactly half of them.

    Parameters
    ----------
    seed : int
        Seed of the assignment.
    num_examples : int
        ``n >= 1``.
    num_shadows : int
        ``K``, even and ``>= 2``.

    Returns
    -------
    numpy.ndarray
        Boolean ``[K, n]``; column ``j`` has ``K / 2`` entries ``True``.
    """
    for key, value, minimum in (("num_examples", num_examples, 1), ("num_shadows", num_shadows, 2)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
            raise ValueError(f"{key}={value!r}: must be an integer >= {minimum}")
    if num_shadows % 2:
        raise ValueError(f"num_shadows={num_shadows}: must be even (each example in exactly half)")
    rng = np.random.default_rng(seed)
    # Rank a random key per (shadow, example) column-wise: the K/2 smallest are "in".
    ranks = np.argsort(np.argsort(rng.random((num_shadows, num_examples)), axis=0), axis=0)
    return ranks < num_shadows // 2


def shadow_confidences(
    *,
    build_model: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    shadow_in: np.ndarray,
    epochs: int,
    batch_size: int,
    optimizer: str,
    lr: float,
    momentum: float,
    seed: int,
) -> np.ndarray:
    """Train one shadow model per row of ``shadow_in`` and return ``phi`` of all examples.

    Parameters
    ----------
    build_model : callable
        Returns a freshly initialised model of the target's architecture.
    x, y : torch.Tensor
        All candidate examples; left untouched.
    shadow_in : numpy.ndarray
        Boolean ``[K, n]``, e.g. :func:`balanced_halves`.
    epochs, batch_size : int
        Training length and mini-batch size of every shadow.
    optimizer : str
        ``sgd`` or ``adam``.
    lr, momentum : float
        Optimizer settings.
    seed : int
        Seeds initialisation and batch order; shadow ``k`` uses ``seed + k``.

    Returns
    -------
    numpy.ndarray
        float64 ``[K, n]``, the logit-scaled confidence of shadow ``k`` on example ``j``.
    """
    rows = []
    for index, members in enumerate(np.asarray(shadow_in, dtype=bool)):
        torch.manual_seed(seed + index)
        model = build_model()
        chosen = torch.from_numpy(np.flatnonzero(members))
        train_epochs(
            model,
            x[chosen],
            y[chosen],
            optimizer=make_optimizer(optimizer, model.parameters(), lr=lr, momentum=momentum),
            epochs=epochs,
            batch_size=batch_size,
            generator=torch.Generator().manual_seed(seed + index),
        )
        rows.append(logit_confidence(model, x, y))
    return np.stack(rows)
