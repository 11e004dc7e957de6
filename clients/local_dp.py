"""Local differential privacy on the client's update (``client=local_dp``).

Privacy semantics (docs/design.md, section 4): no party is trusted. After plain
local training the client clips its model update (trained minus received
weights) and adds noise before anything leaves; the server, the other clients
and anyone reading the results see only post-processing of that release. The
adjacency is local DP's, any two updates of one client (replace-one), so the
sensitivity is twice the clipping norm:

- ``mechanism=laplace``: L1 clip to ``clipping_norm``, Laplace noise of scale
  ``2 * clipping_norm / epsilon_per_round``; each round is
  ``(epsilon_per_round, 0)``-DP.
- ``mechanism=gaussian``: L2 clip, Gaussian noise of std
  ``noise_multiplier * 2 * clipping_norm``.

Each release is recorded in the client's ledger (the node's persistent state,
saved with the run for resume), and the reply reports the composed epsilon:
basic composition (Laplace) and PLD accounting at ``target_delta``. The reply's
weight is 1 and it carries no loss: nothing else depends on the client's data.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from clients.plain import PlainTraining, TrainOutcome
from clients.privacy_state import PrivacyBudgetExhausted, store_ledger, stored_ledger
from fedpriv.checks import check_choice, check_delta, check_real
from fedpriv.logs import get_logger
from fedpriv.protocol import LOCAL_BASIC_EPSILON_KEY, PRIVACY_REPLY_KEYS

if TYPE_CHECKING:
    from flwr.app import RecordDict

logger = get_logger(__name__)

LOCAL_MECHANISMS = ("laplace", "gaussian")
# Beyond these the noise scale 2 C / epsilon overflows float32 or vanishes below its resolution.
_MIN_CLIPPING_NORM, _MAX_CLIPPING_NORM = 1e-6, 1e6
_MIN_EPSILON_PER_ROUND, _MAX_EPSILON_PER_ROUND = 1e-3, 1e3


@dataclass(frozen=True)
class LocalDPTraining(PlainTraining):
    """Plain local training whose update leaves the client only clipped and noised.

    Parameters
    ----------
    local_epochs, batch_size, optimizer, lr, momentum, weight_decay, proximal_mu
        As for :class:`clients.PlainTraining` (training is plain; the privacy
        comes from clipping and noising the update it produces, whatever the
        loss was).
    mechanism : str
        ``laplace`` (L1 clipping) or ``gaussian`` (L2 clipping).
    clipping_norm : float
        ``C``: the update's L1 (Laplace) or L2 (Gaussian) norm is clipped to it.
    epsilon_per_round : float
        Laplace: each round's release is ``(epsilon_per_round, 0)``-DP; the
        noise scale is ``2 C / epsilon_per_round``.
    noise_multiplier : float
        Gaussian: the noise std is ``noise_multiplier * 2 C``.
    target_delta : float
        The delta at which the PLD epsilon is reported and the budget checked.
    max_epsilon : float or None
        Budget on the PLD epsilon at ``target_delta``: a round that would exceed
        it is declined with :class:`PrivacyBudgetExhausted`, releasing nothing.
    """

    privacy_level: ClassVar[str | None] = "local"
    """Replies are local DP: no exact statistic may leave the client."""

    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.1
    momentum: float = 0.0
    mechanism: str = "laplace"
    clipping_norm: float = 1.0
    epsilon_per_round: float = 1.0
    noise_multiplier: float = 1.0
    target_delta: float = 1e-5
    max_epsilon: float | None = None

    def __post_init__(self) -> None:
        """Validate the settings."""
        super().__post_init__()
        check_choice("client.mechanism", self.mechanism, LOCAL_MECHANISMS)
        check_real("client.clipping_norm", self.clipping_norm, minimum=_MIN_CLIPPING_NORM, maximum=_MAX_CLIPPING_NORM)
        check_real(
            "client.epsilon_per_round",
            self.epsilon_per_round,
            minimum=_MIN_EPSILON_PER_ROUND,
            maximum=_MAX_EPSILON_PER_ROUND,
        )
        check_real("client.noise_multiplier", self.noise_multiplier, minimum=0.01, maximum=1e6)
        check_delta("client.target_delta", self.target_delta)
        if self.max_epsilon is not None:
            check_real("client.max_epsilon", self.max_epsilon, above=0.0)

    @property
    def release_noise_multiplier(self) -> float:
        """One release's noise over its sensitivity ``2 C``, as the ledger records it."""
        return 1.0 / self.epsilon_per_round if self.mechanism == "laplace" else self.noise_multiplier

    def new_ledger(self):
        """An empty :class:`fedpriv.privacy.PrivacyLedger` for this client's mechanism."""
        # fedpriv.privacy imports Opacus (over a second, and logging side effects):
        # only when a client trains, as in clients/opacus_training.py.
        from fedpriv.privacy.ledger import LAPLACE_ACCOUNTANT, PrivacyLedger

        if self.mechanism == "laplace":
            return PrivacyLedger(accountant=LAPLACE_ACCOUNTANT, mechanism="laplace")
        return PrivacyLedger(accountant="prv", mechanism="gaussian")

    def fit(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        seed: int | None,
        state: RecordDict | dict,
        planned_rounds: int = 1,
    ) -> TrainOutcome:
        """Train ``model`` on ``(x, y)``, then replace its weights by received + privatized update.

        Parameters
        ----------
        model : nn.Module
            The global model; on return it holds ``received + noisy clipped update``.
        x, y : torch.Tensor
            The client's examples and labels.
        seed : int or None
            ``None``: batches and noise come from the operating system
            (private). An integer makes them reproducible, which voids the
            guarantee (tests and ``seeded_noise=true`` only).
        state : flwr.app.RecordDict
            The node's persistent state, holding the ledger under ``"fedpriv.privacy"``.
        planned_rounds : int
            Unused (no noise is solved for a target).

        Returns
        -------
        TrainOutcome
            Weight 1, no loss; ``metrics`` holds ``epsilon_local`` (PLD at
            ``target_delta``), ``delta_local`` and, for Laplace,
            ``epsilon_local_basic`` (basic composition, delta 0).

        Raises
        ------
        PrivacyBudgetExhausted
            If this round would exceed ``max_epsilon``: nothing is trained or released.
        ValueError
            If the model holds non-floating-point state, which could not be noised.
        """
        ledger = self.new_ledger()
        record = stored_ledger(state)
        if record is not None:
            if record.get("mechanism") != self.mechanism:
                raise ValueError(
                    f"client.mechanism={self.mechanism!r}: the ledger in the node state holds "
                    f"{record.get('mechanism')!r} releases"
                )
            ledger.load_state_dict(record)
        release = {"noise_multiplier": self.release_noise_multiplier, "sample_rate": 1.0}
        over = ledger.epsilon_if_over(max_epsilon=self.max_epsilon, delta=self.target_delta, **release)
        if over is not None:
            raise PrivacyBudgetExhausted(
                epsilon=ledger.epsilon(self.target_delta),
                projected_epsilon=over,
                delta=self.target_delta,
                max_epsilon=self.max_epsilon,
                level="local",
            )
        received = _float_state(model)
        batch_seed = secrets.randbits(63) if seed is None else seed
        super().fit(model, x, y, seed=batch_seed, state=state, planned_rounds=planned_rounds)
        trained = _float_state(model)
        update = [trained[name] - received[name] for name in received]
        rng = np.random.default_rng(seed)  # None: fresh OS entropy
        noisy = self.privatize(update, rng=rng)
        model.load_state_dict(
            {name: torch.from_numpy(received[name] + delta) for name, delta in zip(received, noisy, strict=True)}
        )
        ledger.record(**release)
        store_ledger(state, {**ledger.state_dict(), "mechanism": self.mechanism})
        epsilon_key, delta_key = PRIVACY_REPLY_KEYS["local"]
        metrics = {epsilon_key: float(ledger.epsilon(self.target_delta)), delta_key: float(self.target_delta)}
        basic = ledger.basic_epsilon()
        if basic is not None:
            metrics[LOCAL_BASIC_EPSILON_KEY] = float(basic)
        return TrainOutcome(loss=None, num_examples=1.0, metrics=metrics)

    def privatize(self, update: list[np.ndarray], *, rng: np.random.Generator) -> list[np.ndarray]:
        """Clip ``update`` and add this client's noise (a new list; ``update`` is untouched)."""
        from fedpriv.privacy.local_dp import clip_l1, clip_l2, gaussian_mechanism, laplace_mechanism

        sensitivity = 2 * self.clipping_norm
        if self.mechanism == "laplace":
            clipped, _ = clip_l1(update, max_norm=self.clipping_norm)
            return laplace_mechanism(clipped, l1_sensitivity=sensitivity, epsilon=self.epsilon_per_round, rng=rng)
        clipped, _ = clip_l2(update, max_norm=self.clipping_norm)
        return gaussian_mechanism(clipped, l2_sensitivity=sensitivity, noise_multiplier=self.noise_multiplier, rng=rng)


def _float_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Copies of the model's state as float arrays; refuses state that noise cannot cover."""
    arrays = {}
    for name, tensor in model.state_dict().items():
        if not torch.is_floating_point(tensor):
            raise ValueError(
                f"model state {name!r} has dtype {tensor.dtype}: local DP noises floating-point state only"
            )
        arrays[name] = tensor.detach().cpu().numpy().copy()
    return arrays
