"""A client training procedure that corrupts its reply, for end-to-end tests.

It is a config ``_target_`` (``client._target_=faulty_training.NaNTraining``)
loaded inside Flower's runtime, so the rejection path is exercised for real.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clients.plain import PlainTraining, TrainOutcome


def is_victim(y: torch.Tensor) -> bool:
    """Whether a client with labels ``y`` corrupts its reply (deterministic per partition)."""
    return int(y[:5].sum()) % 2 == 0


@dataclass(frozen=True)
class NaNTraining(PlainTraining):
    """Plain training, except that victim clients reply with NaN weights."""

    def fit(self, model, x, y, *, seed, state=None, planned_rounds=1) -> TrainOutcome:
        """Train, then poison the weights of victim clients."""
        outcome = super().fit(model, x, y, seed=seed, state=state, planned_rounds=planned_rounds)
        if is_victim(y):
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return outcome


@dataclass(frozen=True)
class ExplodingTraining(PlainTraining):
    """Every client replies with finite weights so large that the model's loss is not finite.

    Each reply passes validation (finite float32 values), so only the server's
    evaluation can tell that the model diverged.
    """

    def fit(self, model, x, y, *, seed, state=None, planned_rounds=1) -> TrainOutcome:
        """Reply with every weight at 1e30."""
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(1e30)
        return TrainOutcome(loss=1.0, num_examples=len(y))
