"""Plain PyTorch training and evaluation over in-memory tensors.

Batches are slices of tensors already in memory: no ``DataLoader`` and no
per-item collation, which would dominate the cost of the small models here.
"""

from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adam")


class SGD:
    """Stochastic gradient descent with momentum and weight decay, without ``torch.optim``.

    The update of ``torch.optim.SGD`` (no dampening, no Nesterov) on CPU, step
    for step and bit for bit. ``torch.optim``'s optimizers import
    ``torch._dynamo`` when first used, 1.4 s of CPU that every fresh
    ``flwr-clientapp`` process of a deployment would pay for each message.

    Parameters
    ----------
    params : Iterable[torch.Tensor]
        The tensors to train.
    lr : float
        Step size.
    momentum : float
        Momentum factor (0: none).
    weight_decay : float
        L2 penalty factor (0: none).
    """

    def __init__(self, params, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("SGD got an empty parameter list")
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self._buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (``set_to_none``, as ``torch.optim``) or set them to zero."""
        for param in self.params:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """Take one step along the current gradients (parameters without one stay)."""
        for index, param in enumerate(self.params):
            if param.grad is None:
                continue
            grad = param.grad
            if self.weight_decay:
                grad = grad.add(param, alpha=self.weight_decay)
            if self.momentum:
                buffer = self._buffers[index]
                if buffer is None:
                    buffer = self._buffers[index] = torch.clone(grad).detach()
                else:
                    buffer.mul_(self.momentum).add_(grad)
                grad = buffer
            param.add_(grad, alpha=-self.lr)


def make_optimizer(name: str, params, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    """Build the optimizer of plain local training by name (``sgd``: :class:`SGD`, or ``adam``)."""
    if name == "sgd":
        return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return make_torch_optimizer(name, params, lr=lr, weight_decay=weight_decay)


def make_torch_optimizer(
    name: str, params, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Build a ``torch.optim`` optimizer by name (``sgd`` or ``adam``); Opacus wraps one of these."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"client.optimizer={name!r}: must be one of {list(OPTIMIZERS)}")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """``model``'s parameters that training updates, in order."""
    return [param for param in model.parameters() if param.requires_grad]


def anchor_copies(model: nn.Module) -> list[torch.Tensor]:
    """Detached copies of ``model``'s trainable parameters: the ``w_global`` of a proximal term."""
    return [param.detach().clone() for param in trainable_parameters(model)]


@torch.no_grad()
def proximal_gradients(model: nn.Module, anchors: list[torch.Tensor], *, mu: float) -> list[torch.Tensor]:
    """The gradient of ``mu / 2 * ||w - w_global||^2``: ``mu * (w - w_global)`` per trainable parameter.

    ``anchors`` are :func:`anchor_copies` of the model the round started from
    (FedProx, Li et al. 2020). New tensors; the model is not touched.
    """
    return [mu * (param - anchor) for param, anchor in zip(trainable_parameters(model), anchors, strict=True)]


def train_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    optimizer,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    proximal_mu: float = 0.0,
) -> float:
    """Train ``model`` in place with shuffled mini-batches.

    ``model``, ``x`` and ``y`` are on one device; ``generator`` may be on
    another (the CPU), so that the batches do not depend on the device.
    With ``proximal_mu > 0`` every step adds the gradient of FedProx's
    proximal term ``mu / 2 * ||w - w_start||^2`` (``w_start``: the model on
    entry, the round's global model) to the loss gradient.

    Returns
    -------
    float
        Mean training loss over all examples seen (the data's loss, without
        the proximal term).
    """
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    anchors = anchor_copies(model) if proximal_mu else []
    total, seen = 0.0, 0
    for _ in range(epochs):
        # Drawn on the generator's device (the CPU), used on the data's.
        order = torch.randperm(len(y), generator=generator).to(y.device)
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            if proximal_mu:
                extras = proximal_gradients(model, anchors, mu=proximal_mu)
                for param, extra in zip(trainable_parameters(model), extras, strict=True):
                    param.grad.add_(extra)
            optimizer.step()
            total += loss.item() * len(batch)
            seen += len(batch)
    return total / max(seen, 1)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``model`` on ``x``, in eval mode, ``batch_size`` examples at a time."""
    model.eval()
    return torch.cat([model(x[start : start + batch_size]) for start in range(0, max(len(x), 1), batch_size)])


@torch.no_grad()
def loss_and_accuracy(logits: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``logits`` for labels ``y`` (summed batch by batch)."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        chunk, target = logits[start : start + batch_size], y[start : start + batch_size]
        loss += loss_fn(chunk, target).item()
        correct += (chunk.argmax(dim=1) == target).sum().item()
    count = max(len(y), 1)
    return loss / count, correct / count


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024
) -> tuple[float, float]:
    """Return mean cross-entropy loss and accuracy of ``model`` on ``(x, y)``."""
    return loss_and_accuracy(predict(model, x, batch_size=batch_size), y, batch_size=batch_size)
