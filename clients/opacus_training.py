"""Record-level DP-SGD local training with Opacus (``client=opacus``).

Privacy semantics (DESIGN.md, section 4): neighbouring datasets differ in one
example of one client. Each round the client runs Opacus DP-SGD with Poisson
sampling of batches; its accountant history lives in the node's persistent
``context.state``, so the reported epsilon composes over every round the client
trained in and over nothing else.

Opacus is imported on the first call that needs it, not when this module is
imported: it costs over a second, and its import installs a handler on the root
logger (``logging.basicConfig``) through which Flower's DEBUG records would be
printed. :func:`fedpriv.opacus_logging.opacus_logging_contained` undoes that.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clients.plain import TrainOutcome
from fedpriv.logs import get_logger
from fedpriv.opacus_logging import opacus_logging_contained
from fedpriv.training import OPTIMIZERS, evaluate, make_optimizer

logger = get_logger(__name__)

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")
"""Opacus per-sample-gradient implementations that train fedpriv's models."""

STATE_KEY = "fedpriv.privacy"
"""Key of the ``ConfigRecord`` in the node state that holds the accountant history."""

DEFAULT_TARGET_DELTA = 1e-5
"""Upper end of the default ``target_delta``; see :class:`OpacusTraining`."""

# Opacus warns on every PrivacyEngine without secure_mode (a documented choice
# here) and on every backward through a first layer whose input needs no grad.
_IGNORED_WARNINGS = (
    "Secure RNG turned off",
    "Full backward hook is firing when gradients are computed with respect to module outputs",
)
# Opacus logs this when a pass starts with an empty Poisson batch, which
# _stage_empty_batch handles.
_IGNORED_LOG_PREFIX = "First batch is empty"


class PrivacyBudgetExhausted(RuntimeError):
    """Training this round would take the client past its record-level budget.

    Raised before any training, with the node state unchanged.

    Parameters
    ----------
    epsilon : float
        Epsilon the client has spent so far.
    projected_epsilon : float
        Epsilon the client would reach by training this round.
    delta : float
        The client's target delta.
    max_epsilon : float
        The client's budget.
    """

    def __init__(
        self, *, epsilon: float, projected_epsilon: float, delta: float, max_epsilon: float
    ) -> None:
        super().__init__(
            f"client.max_epsilon={max_epsilon}: training this round would reach "
            f"epsilon={projected_epsilon:.4g} (delta={delta:.3g}); spent so far "
            f"epsilon={epsilon:.4g}"
        )
        self.epsilon = epsilon
        self.projected_epsilon = projected_epsilon
        self.delta = delta
        self.max_epsilon = max_epsilon


@contextlib.contextmanager
def _opacus_chatter_silenced() -> Iterator[None]:
    """Drop Opacus' warnings and log records about what this module handles."""
    data_loader_logger = logging.getLogger("opacus.data_loader")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_IGNORED_LOG_PREFIX)

    data_loader_logger.addFilter(keep)
    try:
        with warnings.catch_warnings():
            for message in _IGNORED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        data_loader_logger.removeFilter(keep)


def _accounting():
    """``fedpriv.privacy.accounting``, which imports Opacus."""
    with opacus_logging_contained():
        from fedpriv.privacy import accounting
    return accounting


def _fail(key: str, value: object, rule: str) -> ValueError:
    return ValueError(f"client.{key}={value!r}: {rule}")


def _check_int(key: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise _fail(key, value, "must be an integer")
    if value < minimum:
        raise _fail(key, value, f"must be >= {minimum}")


def _check_positive(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise _fail(key, value, "must be a finite number")
    if value <= 0:
        raise _fail(key, value, "must be > 0")


def _check_non_negative(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise _fail(key, value, "must be a finite number")
    if value < 0:
        raise _fail(key, value, "must be >= 0")


def _check_model(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the layers Opacus cannot train privately."""
    with opacus_logging_contained():
        from opacus.utils.module_utils import trainable_modules
        from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return
    layers = [
        f"{name} ({type(module).__name__})"
        for name, module in trainable_modules(model)
        if ModuleValidator.validate(module, strict=False)
    ]
    reason = str(errors[0]).split(". ")[0]
    raise ValueError(f"model: layers {', '.join(layers)} not supported by Opacus: {reason}")


def _stage_empty_batch(optimizer, *, ghost: bool) -> None:
    """Make the next ``optimizer.step()`` release pure noise for an empty batch.

    An empty Poisson batch is still a release (noise only) and is accounted for,
    but ``ew`` and ``functorch`` cannot run a forward pass on zero examples, so
    the (zero) gradient is staged directly.
    """
    for param in optimizer.params:
        if ghost:
            param.grad = torch.zeros_like(param)
        else:
            param.grad_sample = param.new_zeros((0, *param.shape))


@dataclass(frozen=True)
class OpacusTraining:
    """Record-level DP-SGD local training with Opacus (``client=opacus``).

    Batches are Poisson-sampled with rate ``sample_rate = 1 / ceil(n /
    batch_size)`` for a client with ``n`` examples, which is ``batch_size / n``
    when ``batch_size`` divides ``n`` and otherwise rounds the expected batch size
    down to ``n * sample_rate``: this is the rate Opacus' ``make_private`` samples
    and accounts with. An epoch is the number of batches Opacus' sampler draws
    per pass, ``int(1 / sample_rate)``.

    Parameters
    ----------
    local_epochs : int
        Passes over the local data per round.
    batch_size : int
        Expected batch size under Poisson sampling (see above).
    optimizer : str
        ``sgd`` or ``adam``.
    lr : float
        Learning rate.
    momentum : float
        SGD momentum (ignored by Adam).
    weight_decay : float
        L2 penalty.
    noise_multiplier : float or None
        Noise standard deviation over ``max_grad_norm``, ``>= 0``. Exactly one
        of ``noise_multiplier`` and ``target_epsilon`` must be set. 0 only
        for audits: the run is then not private, and clients report no
        ``epsilon`` (it is infinite).
    target_epsilon : float or None
        Record-level epsilon to reach after training in all planned rounds; the
        noise multiplier is solved once, on the client's first round, assuming
        it trains in every round of the run (conservative), and reused after.
    max_grad_norm : float
        Per-example gradient clipping norm.
    target_delta : float or None
        Delta of the reported epsilon. ``None`` gives each client
        ``min(1e-5, 1 / (10 n))``, which is below ``1 / n`` as it must be; a
        given value must be in ``(0, 1 / n)`` for every client.
    accountant : str
        ``prv`` (tight, default) or ``rdp``.
    grad_sample_mode : str
        Opacus per-sample-gradient implementation: ``ew`` (PyTorch's expanded
        weights, the fastest on fedpriv's models, see
        ``scripts/bench.py``, section 3), ``hooks``, ``functorch`` or
        ``ghost`` (ghost clipping). All give the same update.
    secure_mode : bool
        Opacus' cryptographically secure noise and sampling; needs the
        ``torchcsprng`` package and makes runs unseeded.
    max_epsilon : float or None
        Record-level budget: a round that would take the client's epsilon
        above it is declined with :class:`PrivacyBudgetExhausted`.
    """

    local_epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.5
    momentum: float = 0.5
    weight_decay: float = 0.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    target_delta: float | None = None
    accountant: str = "prv"
    grad_sample_mode: str = "ew"
    secure_mode: bool = False
    max_epsilon: float | None = None

    def __post_init__(self) -> None:
        """Validate the settings."""
        _check_int("local_epochs", self.local_epochs, minimum=1)
        _check_int("batch_size", self.batch_size, minimum=1)
        if self.optimizer not in OPTIMIZERS:
            raise _fail("optimizer", self.optimizer, f"must be one of {list(OPTIMIZERS)}")
        _check_positive("lr", self.lr)
        if not (isinstance(self.momentum, Real) and 0 <= self.momentum < 1):
            raise _fail("momentum", self.momentum, "must be in [0, 1)")
        if not (
            isinstance(self.weight_decay, Real)
            and math.isfinite(self.weight_decay)
            and self.weight_decay >= 0
        ):
            raise _fail("weight_decay", self.weight_decay, "must be >= 0")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                f"client.noise_multiplier={self.noise_multiplier} and "
                f"client.target_epsilon={self.target_epsilon}: set exactly one"
            )
        if self.noise_multiplier is not None:
            _check_non_negative("noise_multiplier", self.noise_multiplier)
            if self.noise_multiplier == 0:
                logger.warning("client.noise_multiplier=0: DP-SGD adds no noise; this run is NOT record-level private")
        if self.target_epsilon is not None:
            _check_positive("target_epsilon", self.target_epsilon)
        _check_positive("max_grad_norm", self.max_grad_norm)
        if self.target_delta is not None:
            _check_positive("target_delta", self.target_delta)
            if self.target_delta >= 1:
                raise _fail("target_delta", self.target_delta, "must be in (0, 1 / n)")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise _fail(
                "grad_sample_mode",
                self.grad_sample_mode,
                f"must be one of {list(GRAD_SAMPLE_MODES)}",
            )
        if not isinstance(self.secure_mode, bool):
            raise _fail("secure_mode", self.secure_mode, "must be true or false")
        if self.secure_mode and importlib.util.find_spec("torchcsprng") is None:
            raise _fail(
                "secure_mode",
                self.secure_mode,
                "Opacus' secure RNG needs the torchcsprng package, which is not installed",
            )
        if self.max_epsilon is not None:
            _check_positive("max_epsilon", self.max_epsilon)
        accountants = _accounting().ACCOUNTANTS
        if self.accountant not in accountants:
            raise _fail("accountant", self.accountant, f"must be one of {list(accountants)}")

    def target_delta_for(self, n: int) -> float:
        """The delta of a client with ``n`` examples.

        Parameters
        ----------
        n : int
            Number of the client's training examples, ``>= 1``.

        Returns
        -------
        float
            ``target_delta`` if given, else ``min(1e-5, 1 / (10 n))``.

        Raises
        ------
        ValueError
            If ``target_delta`` was given and is not below ``1 / n``.
        """
        if self.target_delta is None:
            return min(DEFAULT_TARGET_DELTA, 1 / (10 * n))
        if self.target_delta >= 1 / n:
            raise ValueError(
                f"client.target_delta={self.target_delta}: must be < 1/n = {1 / n:.6g} "
                f"for a client with n={n} examples"
            )
        return self.target_delta

    def sampling_for(self, n: int) -> tuple[float, int]:
        """Poisson sampling of a client with ``n`` examples.

        Parameters
        ----------
        n : int
            Number of the client's training examples, ``>= 1``.

        Returns
        -------
        sample_rate : float
            ``1 / ceil(n / batch_size)``, the rate of Opacus' ``make_private``.
        steps_per_epoch : int
            Batches (DP-SGD steps) per local epoch.
        """
        sample_rate = 1 / math.ceil(n / self.batch_size)
        # Opacus' sampler draws int(1 / sample_rate) batches per pass, which
        # floating point makes one less than ceil(n / batch_size) for some sizes.
        return sample_rate, int(1 / sample_rate)

    def fit(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        seed: int,
        state: RecordDict,
        planned_rounds: int = 1,
    ) -> TrainOutcome:
        """Train ``model`` in place with DP-SGD on ``(x, y)`` for one round.

        Parameters
        ----------
        model : nn.Module
            The global model; it is trained in place and keeps its plain
            ``state_dict`` names, with Opacus' hooks removed afterwards.
        x, y : torch.Tensor
            The client's examples and labels; left untouched.
        seed : int
            Seeds Poisson sampling and the noise (unless ``secure_mode``).
        state : flwr.app.RecordDict
            The node's persistent state; the accountant history is read from
            and written to its ``"fedpriv.privacy"`` ``ConfigRecord``.
        planned_rounds : int, default 1
            Rounds in the run; used to solve the noise multiplier for
            ``target_epsilon``.

        Returns
        -------
        TrainOutcome
            ``metrics`` holds the client's cumulative ``epsilon``, its
            ``delta``, the ``noise_multiplier``, the ``sample_rate`` and the
            total ``steps`` over all rounds it trained in; ``epsilon`` and
            ``delta`` are left out when ``noise_multiplier`` is 0.

        Raises
        ------
        PrivacyBudgetExhausted
            If this round would exceed ``max_epsilon``; nothing is trained and
            ``state`` is unchanged.
        ValueError
            If the model has layers Opacus cannot train, ``target_delta`` is
            not below ``1 / n`` or ``target_epsilon`` is unreachable.
        """
        accounting = _accounting()
        n = len(y)
        if n == 0:
            raise ValueError("client with n=0 examples: nothing to train on")
        if (
            isinstance(planned_rounds, bool)
            or not isinstance(planned_rounds, Integral)
            or planned_rounds < 1
        ):
            raise ValueError(f"planned_rounds={planned_rounds!r}: must be an integer >= 1")
        model.train()
        _check_model(model)
        delta = self.target_delta_for(n)
        sample_rate, steps_per_epoch = self.sampling_for(n)
        round_steps = self.local_epochs * steps_per_epoch

        record = state.config_records.get(STATE_KEY)
        if record is None:
            logger.info("client with n=%d examples: target_delta=%.3g", n, delta)
            history = []
        else:
            history = accounting.history_from_lists(record)
        noise_multiplier = self._noise_multiplier(
            record,
            delta=delta,
            sample_rate=sample_rate,
            steps=planned_rounds * round_steps,
            planned_rounds=planned_rounds,
        )
        projected = accounting.record_steps(
            history, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=round_steps
        )
        epsilon = accounting.compute_epsilon(projected, delta=delta, accountant=self.accountant)
        if self.max_epsilon is not None and epsilon > self.max_epsilon:
            spent = accounting.compute_epsilon(history, delta=delta, accountant=self.accountant)
            raise PrivacyBudgetExhausted(
                epsilon=spent,
                projected_epsilon=epsilon,
                delta=delta,
                max_epsilon=self.max_epsilon,
            )

        loss, trained = self._train(
            model, x, y, seed=seed, history=history, noise_multiplier=noise_multiplier
        )
        if trained != projected:
            raise RuntimeError(
                f"Opacus recorded {trained} but {projected} was accounted for; "
                "the round's update is withheld"
            )
        state[STATE_KEY] = ConfigRecord(
            {**accounting.history_to_lists(trained), "noise_multiplier": noise_multiplier}
        )
        # Without noise epsilon is infinite: there is no claim to report, and
        # the server refuses non-finite metrics.
        claim = {"epsilon": float(epsilon), "delta": float(delta)} if math.isfinite(epsilon) else {}
        metrics = {
            **claim,
            "noise_multiplier": float(noise_multiplier),
            "sample_rate": float(sample_rate),
            "steps": sum(steps for _, _, steps in trained),
        }
        return TrainOutcome(loss=loss, num_examples=n, metrics=metrics)

    def _noise_multiplier(
        self,
        record: ConfigRecord | None,
        *,
        delta: float,
        sample_rate: float,
        steps: int,
        planned_rounds: int,
    ) -> float:
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        if record is not None:
            return float(record["noise_multiplier"])
        noise_multiplier = _accounting().solve_noise_multiplier(
            target_epsilon=self.target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=self.accountant,
        )
        logger.info(
            "client: noise_multiplier=%.4g solved for target_epsilon=%g over %d rounds",
            noise_multiplier,
            self.target_epsilon,
            planned_rounds,
        )
        return noise_multiplier

    def _train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        seed: int,
        history: list,
        noise_multiplier: float,
    ) -> tuple[float, list]:
        """One round of DP-SGD; returns the mean loss and Opacus' new history."""
        with opacus_logging_contained():
            from opacus import PrivacyEngine

        sampler_seed, noise_seed = np.random.SeedSequence(seed).generate_state(2)
        loader = DataLoader(
            TensorDataset(x, y),
            batch_size=self.batch_size,
            generator=torch.Generator().manual_seed(int(sampler_seed)),
        )
        ghost = self.grad_sample_mode == "ghost"
        with _opacus_chatter_silenced():
            engine = PrivacyEngine(accountant=self.accountant, secure_mode=self.secure_mode)
            engine.accountant.history = list(history)
            private = engine.make_private(
                module=model,
                optimizer=make_optimizer(
                    self.optimizer,
                    model.parameters(),
                    lr=self.lr,
                    momentum=self.momentum,
                    weight_decay=self.weight_decay,
                ),
                criterion=nn.CrossEntropyLoss(),
                data_loader=loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode=self.grad_sample_mode,
                noise_generator=None
                if self.secure_mode
                else torch.Generator().manual_seed(int(noise_seed)),
            )
            if ghost:
                module, optimizer, criterion, private_loader = private
            else:
                (module, optimizer, private_loader), criterion = private, nn.CrossEntropyLoss()
            total, seen = 0.0, 0
            try:
                for _ in range(self.local_epochs):
                    for batch_x, batch_y in private_loader:
                        optimizer.zero_grad(set_to_none=True)
                        if len(batch_y) == 0:
                            _stage_empty_batch(optimizer, ghost=ghost)
                        else:
                            loss = criterion(module(batch_x), batch_y)
                            loss.backward()
                            total += loss.item() * len(batch_y)
                            seen += len(batch_y)
                        optimizer.step()
            finally:
                optimizer.zero_grad(set_to_none=True)
                module.to_standard_module()
                for param in model.parameters():
                    if hasattr(param, "summed_grad"):
                        del param.summed_grad
        # Only when every Poisson batch was empty: report the loss of the data.
        mean_loss = total / seen if seen else evaluate(model, x, y)[0]
        return mean_loss, list(engine.accountant.history)
