"""Server optimizers: the step from a round's aggregate to the next global model.

Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2: the
round's aggregate minus the global model is a pseudo-gradient ``delta`` (the
negative of one), and the server takes one optimizer step with it:

- ``sgd``: ``x + lr * u`` with ``u = momentum * u + delta`` (FedAvgM, Hsu et
  al. 2019; ``momentum=0`` and ``lr=1`` is plain FedAvg);
- ``adam``, ``yogi``, ``adagrad``: ``m = beta1 * m + (1 - beta1) * delta`` and
  ``x + lr * m / (sqrt(v) + tau)``, with ``v = beta2 * v + (1 - beta2) *
  delta^2`` (Adam), ``v - (1 - beta2) * delta^2 * sign(v - delta^2)`` (Yogi)
  or ``v + delta^2`` (Adagrad).

As in the paper there is no bias correction and the moments start at zero;
Flower's ``FedYogi`` and ``FedAdagrad`` compute the same (its ``FedAdagrad``
fixes ``beta1 = 0``), its ``FedAdam`` multiplies ``lr`` by a bias correction.
Pure functions over NumPy arrays: the step reads the global model, the
aggregate and the state, and returns new arrays and a new state; nothing it is
given is written into. Arithmetic is in float64, the state is float64, and the
new model has the global model's dtypes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedpriv.checks import check_choice, check_real

SERVER_OPTIMIZERS = ("sgd", "adam", "yogi", "adagrad")
AUTO_SERVER_LR = "auto"
DEFAULT_SERVER_LR = {"sgd": 1.0, "adam": 0.1, "yogi": 0.01, "adagrad": 0.1}
"""``strategy.server_lr`` when it is ``auto``: plain FedAvg for ``sgd``, Flower's ``eta`` for the others."""

MAX_SERVER_LR = 1e3
# Below 1e-12 a coordinate whose second moment underflows would be divided by
# almost nothing; above 1e6 the step is zero for every model fedpriv trains.
MIN_TAU, MAX_TAU = 1e-12, 1e6


@dataclass(frozen=True)
class OptimizerState:
    """What a server optimizer carries from one round to the next (float64 arrays, one per layer).

    Attributes
    ----------
    m : tuple of numpy.ndarray
        The first moment (``adam``, ``yogi``, ``adagrad``) or the velocity
        (``sgd`` with momentum); empty before the first step and for plain ``sgd``.
    v : tuple of numpy.ndarray
        The second moment (``adam``, ``yogi``, ``adagrad``); empty otherwise.
    """

    m: tuple[np.ndarray, ...] = ()
    v: tuple[np.ndarray, ...] = ()

    def to_checkpoint(self) -> dict[str, list[torch.Tensor]]:
        """The state as tensors, which ``torch.load(weights_only=True)`` reads back bit for bit."""
        return {name: [torch.from_numpy(a.copy()) for a in getattr(self, name)] for name in ("m", "v")}

    @classmethod
    def from_checkpoint(cls, stored: Mapping[str, Any]) -> OptimizerState:
        """The state :meth:`to_checkpoint` wrote (an empty state for ``{}``)."""
        return cls(**{name: tuple(t.numpy().copy() for t in stored.get(name, ())) for name in ("m", "v")})


@dataclass(frozen=True)
class ServerOptimizer:
    """The server's optimizer and its hyperparameters (``strategy.server_optimizer`` and friends).

    Parameters
    ----------
    name : str
        ``sgd``, ``adam``, ``yogi`` or ``adagrad``.
    lr : float
        The server learning rate ``eta``, in ``(0, 1000]``.
    momentum : float
        ``sgd`` only: heavy-ball momentum in ``[0, 1)`` (FedAvgM).
    beta1 : float
        ``adam``, ``yogi``, ``adagrad``: decay of the first moment, in ``[0, 1)``.
    beta2 : float
        ``adam``, ``yogi``: decay of the second moment, in ``[0, 1)``.
    tau : float
        ``adam``, ``yogi``, ``adagrad``: the adaptivity ``tau`` added to
        ``sqrt(v)``, in ``[1e-12, 1e6]``.
    """

    name: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        """Validate the settings.

        Raises
        ------
        ValueError
            ``strategy.<key>=<value>: <rule>`` for the first bad setting.
        """
        check_choice("strategy.server_optimizer", self.name, SERVER_OPTIMIZERS)
        check_real("strategy.server_lr", self.lr, above=0.0, maximum=MAX_SERVER_LR)
        check_real("strategy.server_momentum", self.momentum, minimum=0.0, below=1.0)
        check_real("strategy.beta1", self.beta1, minimum=0.0, below=1.0)
        check_real("strategy.beta2", self.beta2, minimum=0.0, below=1.0)
        check_real("strategy.tau", self.tau, minimum=MIN_TAU, maximum=MAX_TAU)

    @property
    def is_plain_fedavg(self) -> bool:
        """Whether the new global model is the aggregate itself (``sgd``, ``lr`` 1, no momentum)."""
        return self.name == "sgd" and self.lr == 1.0 and self.momentum == 0.0

    def step(
        self, *, global_arrays: Sequence[np.ndarray], aggregate: Sequence[np.ndarray], state: OptimizerState
    ) -> tuple[list[np.ndarray], OptimizerState]:
        """One server step from ``global_arrays`` with the round's ``aggregate``.

        Parameters
        ----------
        global_arrays : sequence of numpy.ndarray
            The model the round's clients received.
        aggregate : sequence of numpy.ndarray
            The round's aggregated model (weighted mean, robust aggregate, or
            under DP the noised mean), shaped like ``global_arrays``.
        state : OptimizerState
            The state after the previous step (empty before the first).

        Returns
        -------
        new_global : list of numpy.ndarray
            The next global model, in the dtypes of ``global_arrays``; with
            :attr:`is_plain_fedavg`, ``aggregate``'s arrays themselves.
        new_state : OptimizerState
            The state after this step.
        """
        if self.is_plain_fedavg:
            return list(aggregate), state
        delta = [a.astype(np.float64) - g for g, a in zip(global_arrays, aggregate, strict=True)]
        if self.name == "sgd" and self.momentum == 0.0:
            return _moved(global_arrays, [self.lr * d for d in delta]), state
        if self.name == "sgd":
            velocity = [self.momentum * u + d for u, d in zip(_or_zeros(state.m, delta), delta, strict=True)]
            return _moved(global_arrays, [self.lr * u for u in velocity]), OptimizerState(m=tuple(velocity))
        m = [self.beta1 * m + (1 - self.beta1) * d for m, d in zip(_or_zeros(state.m, delta), delta, strict=True)]
        v = [self._second_moment(v, d * d) for v, d in zip(_or_zeros(state.v, delta), delta, strict=True)]
        steps = [self.lr * m_k / (np.sqrt(v_k) + self.tau) for m_k, v_k in zip(m, v, strict=True)]
        return _moved(global_arrays, steps), OptimizerState(m=tuple(m), v=tuple(v))

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        if self.name == "adam":
            return self.beta2 * v + (1 - self.beta2) * squared
        if self.name == "yogi":
            return v - (1 - self.beta2) * squared * np.sign(v - squared)
        return v + squared


def _or_zeros(arrays: tuple[np.ndarray, ...], like: list[np.ndarray]) -> list[np.ndarray]:
    """``arrays``, or zeros shaped like ``like`` before the first step."""
    return list(arrays) if arrays else [np.zeros_like(d) for d in like]


def _moved(global_arrays: Sequence[np.ndarray], steps: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``global + step`` layer by layer, computed in float64, in the global model's dtypes."""
    return [(g.astype(np.float64) + s).astype(g.dtype) for g, s in zip(global_arrays, steps, strict=True)]
