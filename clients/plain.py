"""Non-private local training: plain PyTorch mini-batch SGD or Adam."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fedpriv.checks import check_choice, check_int, check_real
from fedpriv.devices import DEVICES, client_device
from fedpriv.training import OPTIMIZERS, make_optimizer, train_epochs

MAX_LOCAL_EPOCHS = 10_000
MAX_BATCH_SIZE = 10**7
MAX_LR = 1e3
MAX_WEIGHT_DECAY = 1e3
MAX_PROXIMAL_MU = 1e3


def check_training_settings(training) -> None:
    """Validate the settings every local training shares (epochs, batches, optimizer, proximal term, device).

    Raises
    ------
    ValueError
        ``client.<key>=<value>: <rule>`` for the first bad setting.
    """
    check_int("client.local_epochs", training.local_epochs, minimum=1, maximum=MAX_LOCAL_EPOCHS)
    check_int("client.batch_size", training.batch_size, minimum=1, maximum=MAX_BATCH_SIZE)
    check_choice("client.optimizer", training.optimizer, OPTIMIZERS)
    check_real("client.lr", training.lr, above=0.0, maximum=MAX_LR)
    momentum = check_real("client.momentum", training.momentum, minimum=0.0)
    if momentum >= 1:
        raise ValueError(f"client.momentum={training.momentum!r}: must be in [0, 1)")
    check_real("client.weight_decay", training.weight_decay, minimum=0.0, maximum=MAX_WEIGHT_DECAY)
    check_real("client.proximal_mu", training.proximal_mu, minimum=0.0, maximum=MAX_PROXIMAL_MU)
    check_choice("client.device", training.device, DEVICES)


@dataclass(frozen=True)
class TrainOutcome:
    """What one round of local training produced.

    Attributes
    ----------
    loss : float or None
        Mean training loss of the round; ``None`` for private training, whose
        exact loss must not leave the client.
    num_examples : float
        The client's FedAvg weight: its number of training examples, or a
        noisy release of it under record-level DP.
    metrics : dict[str, float]
        Further metrics to reply with (e.g. privacy spent).
    """

    loss: float | None
    num_examples: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PlainTraining:
    """Local training without privacy (``client=plain``).

    Parameters
    ----------
    local_epochs : int
        Passes over the local data per round.
    batch_size : int
        Mini-batch size.
    optimizer : str
        ``sgd`` or ``adam``.
    lr : float
        Learning rate.
    momentum : float
        SGD momentum (ignored by Adam).
    weight_decay : float
        L2 penalty.
    proximal_mu : float
        FedProx (Li et al. 2020): the weight ``mu`` of the proximal term
        ``mu / 2 * ||w - w_global||^2`` added to the local loss, in ``[0,
        1000]``; 0 is plain FedAvg training.
    device : str
        ``auto`` (the GPU Ray assigned to this client, else the CPU), ``cpu``
        or ``cuda``; see :mod:`fedpriv.devices`.
    """

    privacy_level: ClassVar[str | None] = None
    """Which DP the client's replies have: ``None`` (exact statistics: loss, example
    count), ``record`` (DP-SGD) or ``local``; a client with either DP is private and
    sends nothing its epsilon does not cover."""

    local_epochs: int = 5
    batch_size: int = 16
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    device: str = "auto"

    def __post_init__(self) -> None:
        """Validate the settings."""
        check_training_settings(self)

    def fit(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        seed: int,
        state=None,
        planned_rounds: int = 1,
    ) -> TrainOutcome:
        """Train ``model`` in place on ``(x, y)`` for one round, on ``device``.

        The model comes back on the CPU, where its reply is built. ``state``
        (the node's persistent ``RecordDict``) and ``planned_rounds`` matter
        to private training only; plain training ignores them.

        Raises
        ------
        ValueError
            ``device=cuda`` where there is no GPU.
        """
        device = client_device(self.device)
        # The shuffling stays on the CPU generator: the same batches on every device.
        generator = torch.Generator().manual_seed(seed)
        model.to(device)
        try:
            optimizer = make_optimizer(
                self.optimizer,
                model.parameters(),
                lr=self.lr,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
            )
            loss = train_epochs(
                model,
                x.to(device),
                y.to(device),
                optimizer=optimizer,
                epochs=self.local_epochs,
                batch_size=self.batch_size,
                generator=generator,
                proximal_mu=self.proximal_mu,
            )
        finally:
            model.to("cpu")
        return TrainOutcome(loss=loss, num_examples=len(y))
