"""Record-level DP-SGD local training with Opacus (``client=opacus``).

Privacy semantics (docs/design.md, section 4): neighbouring datasets differ in
one example of one client (add/remove one record). Each round the client runs
Opacus DP-SGD with Poisson sampling of batches; its accountant history lives in
the node's persistent ``context.state``, so the reported epsilon composes over
every round the client trained in and over nothing else.

Nothing data-dependent leaves the client unaccounted. Its dataset size ``n`` is
private too: on its first round the client releases a noisy count ``n~ = n +
N(0, count_noise_multiplier^2)`` (sensitivity 1), recorded in the same ledger as
a Gaussian release, and derives everything that depends on its size from
``n~``: its FedAvg weight, the Poisson sample rate and steps, the default delta,
the averaging denominator. The reply holds the privatized model, ``n~`` and
values computed from ``n~`` and public config; no loss.

Randomness (Poisson batches, gradient noise, the count's noise) comes from the
operating system unless the caller passes a seed (tests, ``seeded_noise=true``),
which voids the guarantee: anyone who knows the seed can replay the noise.

Opacus is imported on the first call that needs it, not when this module is
imported: it costs over a second, and its import installs a handler on the root
logger (``logging.basicConfig``) through which Flower's DEBUG records would be
printed. :func:`fedpriv.opacus_logging.opacus_logging_contained` undoes that.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from numbers import Integral
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate

from clients.plain import TrainOutcome, check_training_settings
from clients.privacy_state import PrivacyBudgetExhausted, store_ledger, stored_ledger
from fedpriv.checks import check_choice, check_delta, check_noise_multiplier, check_real
from fedpriv.devices import client_device
from fedpriv.logs import get_logger
from fedpriv.opacus_logging import opacus_logging_contained
from fedpriv.protocol import PRIVACY_REPLY_KEYS
from fedpriv.training import (
    anchor_copies,
    make_optimizer,
    make_torch_optimizer,
    proximal_gradients,
    trainable_parameters,
)

if TYPE_CHECKING:
    from flwr.app import RecordDict

logger = get_logger(__name__)

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")
"""Opacus per-sample-gradient implementations that train fedpriv's models."""

BOOKKEEPING = "bookkeeping"
"""``client.grad_sample_mode=bookkeeping``: fedpriv's own DP-SGD step, :mod:`fedpriv.privacy.bookkeeping`."""

AUTO = "auto"
"""``client.grad_sample_mode=auto``: :func:`auto_grad_sample_mode` picks :data:`BOOKKEEPING` or one of :data:`GRAD_SAMPLE_MODES`."""

# CUDA, measured by the reporter on an H200 (cnn28, Opacus 1.6, torch
# 2.11), not by us: ew is best at batch 64 (3.3 against hooks' 3.7), hooks from
# 256 on (4.4 and 2.1 against ew's 6.4 and 5.8); the switch is at the geometric
# middle, 128. Dense models were not measured there and take the CNN's choices.
# Book-keeping runs on CUDA too, but no GPU measured it, so auto does not pick it there.
_CUDA_MODES = ((128, "ew"), (math.inf, "hooks"))
AUTO_GRAD_SAMPLE_MODES: dict[str, dict[str, tuple[tuple[float, str], ...]]] = {
    # Per device type and model kind (convolutional or not), (largest expected
    # batch size, mode) from small batches to large: the mode with the lowest
    # DP-step / plain-step ratio of scripts/bench.py, section 3, at batch 64,
    # 256 and 1024 (the README's GPUs section has the figures).
    # CPU, measured here (2 cores, one thread per client, the median of three
    # runs): book-keeping is the fastest at every batch size for both kinds,
    # CNN 1.41 / 1.39 / 1.67 against ew's 1.94 / 1.86 / 2.28, MLP 1.48 / 1.36 /
    # 1.17 against ew's 5.77 at 64 and ghost's 4.80 and 2.87 above; for a
    # model it cannot train, AUTO_WITHOUT_BOOKKEEPING holds the Opacus mode
    # that was best over these batch sizes in the runs before it existed.
    "cpu": {"conv": ((math.inf, BOOKKEEPING),), "dense": ((math.inf, BOOKKEEPING),)},
    "cuda": {"conv": _CUDA_MODES, "dense": _CUDA_MODES},
}
AUTO_WITHOUT_BOOKKEEPING = {"conv": "ew", "dense": "ghost"}
"""Per model kind, the Opacus mode ``auto`` picks where it would pick :data:`BOOKKEEPING` but that cannot train the model."""

# Modes that compute (some) per-example norms without per-example gradients, to
# which FedProx's proximal term could be added before clipping.
_NORMS_WITHOUT_GRADIENTS = ("ghost", BOOKKEEPING)

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# The layers PyTorch's expanded weights (grad_sample_mode=ew) compute per-example
# gradients of; a trainable layer of any other type makes ew fail, while hooks
# (with functorch for unknown layers) takes every model Opacus' validator accepts.
_EXPANDED_WEIGHTS_LAYERS = (
    nn.Linear,
    *_CONVOLUTIONS,
    nn.Embedding,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)

DEFAULT_TARGET_DELTA = 1e-5
"""Upper end of the default ``target_delta``; see :class:`OpacusTraining`."""

COUNT_SAMPLE_RATE = 1.0
"""The noisy count is one Gaussian release over the whole data set (no sampling)."""

# Opacus warns on every PrivacyEngine without its secure_mode (which needs
# torchcsprng; see the README's threat model for what fedpriv's noise covers)
# and on every backward through a first layer whose input needs no grad.
_IGNORED_WARNINGS = (
    "Secure RNG turned off",
    "Full backward hook is firing when gradients are computed with respect to module outputs",
)
# Above these the clipping or the count's noise stop being numerically meaningful.
_MAX_GRAD_NORM = 1e6
_MAX_COUNT_NOISE = 1e6
# Opacus logs this when a pass starts with an empty Poisson batch, which
# _stage_empty_batch handles.
_IGNORED_LOG_PREFIX = "First batch is empty"


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


def _bookkeeping():
    """``fedpriv.privacy.bookkeeping`` (its package imports Opacus)."""
    with opacus_logging_contained():
        from fedpriv.privacy import bookkeeping
    return bookkeeping


def _accounting():
    """``fedpriv.privacy.accounting``, which imports Opacus."""
    with opacus_logging_contained():
        from fedpriv.privacy import accounting
    return accounting


def _new_ledger(accountant: str):
    """An empty :class:`fedpriv.privacy.ledger.PrivacyLedger` (its module imports Opacus)."""
    with opacus_logging_contained():
        from fedpriv.privacy.ledger import PrivacyLedger
    return PrivacyLedger(accountant=accountant)


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


def auto_grad_sample_mode(*, device_type: str, batch_size: int, model: nn.Module) -> str:
    """The DP-SGD implementation ``grad_sample_mode=auto`` trains ``model`` with.

    Parameters
    ----------
    device_type : str
        ``cpu`` or ``cuda`` (a ``torch.device``'s ``type``); any other device
        gets the CPU's choice.
    batch_size : int
        The expected batch size (``client.batch_size``).
    model : nn.Module
        The model to train; only its layer types are read.

    Returns
    -------
    str
        The first mode of :data:`AUTO_GRAD_SAMPLE_MODES` for the device and
        the model's kind (``conv`` with a convolution layer, else ``dense``)
        whose batch size bound covers ``batch_size``. The pick never fails
        where another mode would train: :data:`AUTO_WITHOUT_BOOKKEEPING` instead
        of :data:`BOOKKEEPING` for a model with a layer book-keeping cannot
        train (:func:`fedpriv.privacy.bookkeeping.bookkeeping_unsupported`),
        and ``hooks`` instead of ``ew`` for a model with a trainable layer that
        expanded weights cannot handle (``hooks`` and ``ghost`` fall back to
        functorch for such layers).
    """
    by_kind = AUTO_GRAD_SAMPLE_MODES.get(device_type, AUTO_GRAD_SAMPLE_MODES["cpu"])
    kind = "conv" if any(isinstance(module, _CONVOLUTIONS) for module in model.modules()) else "dense"
    mode = next(mode for largest, mode in by_kind[kind] if batch_size <= largest)
    if mode == BOOKKEEPING and _bookkeeping().bookkeeping_unsupported(model):
        mode = AUTO_WITHOUT_BOOKKEEPING[kind]
    if mode == "ew" and not _expanded_weights_cover(model):
        return "hooks"
    return mode


def _expanded_weights_cover(model: nn.Module) -> bool:
    """Whether every module that holds trainable parameters of its own is an expanded-weights layer."""
    return all(
        isinstance(module, _EXPANDED_WEIGHTS_LAYERS)
        for module in model.modules()
        if any(param.requires_grad for param in module.parameters(recurse=False))
    )


def add_proximal_per_example(model: nn.Module, anchors: list[torch.Tensor], *, mu: float) -> None:
    """Add FedProx's ``mu * (w - w_global)`` to every example's gradient, before Opacus clips them.

    The proximal term depends on the parameters, not on the data, so autograd
    would put its gradient into ``p.grad`` only; Opacus' ``DPOptimizer``
    builds the step from ``p.grad_sample`` alone and would drop it. Added to
    each row of ``p.grad_sample``, it makes every example's gradient that of
    ``loss_i + mu / 2 * ||w - w_global||^2``, which is then clipped to
    ``max_grad_norm`` as a whole: one example still moves the noisy sum by at
    most the clipping norm, so the guarantee is DP-SGD's, unchanged.

    Parameters
    ----------
    model : nn.Module
        The model Opacus wraps (its parameters carry ``grad_sample`` after
        the backward pass of a non-empty batch).
    anchors : list of torch.Tensor
        :func:`fedpriv.training.anchor_copies` of the round's global model.
    mu : float
        The proximal weight.
    """
    extras = proximal_gradients(model, anchors, mu=mu)
    with torch.no_grad():
        for param, extra in zip(trainable_parameters(model), extras, strict=True):
            param.grad_sample.add_(extra)  # broadcast over the batch dimension


def noisy_count(n: int, *, noise_multiplier: float, rng: np.random.Generator) -> float:
    """Release a data set size with the Gaussian mechanism (sensitivity 1).

    Parameters
    ----------
    n : int
        The true number of examples.
    noise_multiplier : float
        Noise standard deviation (the sensitivity of a count is 1), ``> 0``.
    rng : numpy.random.Generator
        Source of the noise.

    Returns
    -------
    float
        ``max(1, n + N(0, noise_multiplier^2))``: at least one, so that it can
        serve as a weight and a denominator.
    """
    return max(1.0, float(n + rng.normal(0.0, noise_multiplier)))


def poisson_batches(*, count: float, batch_size: int) -> int:
    """Poisson batches per epoch for a data set of (noisy) size ``count``.

    Returns
    -------
    int
        ``K = ceil(count / batch_size)``; each batch samples every example with
        rate exactly ``1 / K``, the rate Opacus' ``make_private`` derives from a
        loader of length ``K`` and accounts with.
    """
    return max(1, math.ceil(count / batch_size))


def poisson_loader(
    x: torch.Tensor, y: torch.Tensor, *, batches: int, generator: torch.Generator
) -> DataLoader:
    """A loader of ``batches`` Poisson batches, each example with rate ``1 / batches``.

    Opacus' own ``DPDataLoader`` draws ``int(1 / sample_rate)`` batches, which
    floating point makes one fewer than ``1 / sample_rate`` for some sizes (93
    or 99 batches, say), so its accountant would record a rate the sampler does
    not use. Here the number of batches is given and the rate is its inverse.
    Empty batches come out as zero-length tensors.
    """
    with opacus_logging_contained():
        from opacus.data_loader import wrap_collate_with_empty
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = UniformWithReplacementSampler(
        num_samples=len(y), sample_rate=1 / batches, generator=generator, steps=batches
    )
    collate = wrap_collate_with_empty(
        collate_fn=default_collate,
        sample_empty_shapes=[(0, *x.shape[1:]), (0, *y.shape[1:])],
        dtypes=[x.dtype, y.dtype],
    )
    return DataLoader(TensorDataset(x, y), batch_sampler=sampler, collate_fn=collate)


def _generators(
    seed: int | None, *, device: torch.device
) -> tuple[torch.Generator, torch.Generator, np.random.Generator]:
    """Generators for Poisson batches, gradient noise and the count's noise.

    ``None`` seeds each from 64 (torch) or 128 (numpy) bits of fresh operating
    system entropy that are never stored, so nobody can replay the noise. The
    gradient noise's generator is on ``device``, where Opacus draws the noise
    (next to the gradients); the Poisson batches are drawn on the CPU, where
    the examples wait, so they do not depend on the device.
    """
    if seed is None:
        seeds = [secrets.randbits(64), secrets.randbits(64), secrets.randbits(128)]
    else:
        seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(3, dtype=np.uint64)]
    return (
        torch.Generator().manual_seed(seeds[0]),
        torch.Generator(device=device).manual_seed(seeds[1]),
        np.random.default_rng(seeds[2]),
    )


@dataclass(frozen=True)
class _RoundPlan:
    """What one round of DP-SGD needs besides the model and the settings."""

    loader: DataLoader
    device: torch.device
    expected_batch_size: float
    noise_generator: torch.Generator
    history: list
    noise_multiplier: float
    sample_rate: float


@dataclass(frozen=True)
class OpacusTraining:
    """Record-level DP-SGD local training with Opacus (``client=opacus``).

    On its first round a client releases its noisy size ``n~`` (see
    :func:`noisy_count`; accounted in its ledger) and from then on samples
    Poisson batches with rate ``1 / K``, ``K = ceil(n~ / batch_size)``, ``K``
    batches per epoch: ``batch_size`` is the expected batch size. Gradients
    are averaged over the public expected batch size ``n~ / K``.

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
        Noise standard deviation over ``max_grad_norm``: 0 or in ``[0.01,
        1e6]``. Exactly one
        of ``noise_multiplier`` and ``target_epsilon`` must be set. 0 only
        for audits: the run is then not private, and clients report no
        ``epsilon`` (it is infinite).
    target_epsilon : float or None
        Record-level epsilon to reach after training in all planned rounds; the
        noise multiplier is solved once, on the client's first round, assuming
        it trains in every round of the run (conservative), and reused after.
        The count release is part of the budget.
    max_grad_norm : float
        Per-example gradient clipping norm, in ``(0, 1e6]``.
    target_delta : float or None
        Delta of the reported epsilon. ``None`` gives each client
        ``min(1e-5, 1 / (10 n~))``; a given value must be in ``[1e-12, 1 /
        n~)``.
    accountant : str
        ``prv`` (tight, default) or ``rdp``.
    grad_sample_mode : str
        How per-example gradients are clipped: ``auto`` (default), picked by
        device, model and batch size (:func:`auto_grad_sample_mode`);
        ``bookkeeping``, fedpriv's own step for models of ``Linear``,
        ``Conv2d`` and ``GroupNorm`` layers (:mod:`fedpriv.privacy.bookkeeping`,
        the fastest on a CPU, see ``scripts/bench.py``, section 3); or one of
        Opacus' ``ew`` (PyTorch's expanded weights), ``hooks``, ``functorch``,
        ``ghost`` (ghost clipping). All give the same update in distribution.
    proximal_mu : float
        FedProx's proximal weight ``mu`` in ``[0, 1000]``: ``mu * (w -
        w_global)`` joins every example's gradient before clipping (see
        :func:`add_proximal_per_example`). Ghost clipping computes per-example
        norms without per-example gradients, so ``ghost`` refuses ``mu > 0``
        and ``auto`` does not pick it then.
    count_noise_multiplier : float
        Standard deviation of the Gaussian noise on the released data set
        size, ``>= 1`` (10 costs about 0.01 epsilon next to a DP-SGD epsilon
        of 10; see the README).
    max_epsilon : float or None
        Record-level budget: a round that would take the client's epsilon
        above it is declined with :class:`PrivacyBudgetExhausted`.
    device : str
        ``auto`` (the GPU Ray assigned to this client, else the CPU), ``cpu``
        or ``cuda``: where the model, the batches and the gradient noise are
        (see :mod:`fedpriv.devices`).
    """

    privacy_level: ClassVar[str | None] = "record"
    """Replies are record-level DP: no exact statistic may leave the client."""

    local_epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.5
    momentum: float = 0.5
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    target_delta: float | None = None
    accountant: str = "prv"
    grad_sample_mode: str = "auto"
    count_noise_multiplier: float = 10.0
    max_epsilon: float | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        """Validate the settings."""
        check_training_settings(self)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                f"client.noise_multiplier={self.noise_multiplier} and "
                f"client.target_epsilon={self.target_epsilon}: set exactly one"
            )
        if self.noise_multiplier is not None:
            check_noise_multiplier("client.noise_multiplier", self.noise_multiplier)
            if self.noise_multiplier == 0:
                logger.warning("client.noise_multiplier=0: DP-SGD adds no noise; this run is NOT record-level private")
        if self.target_epsilon is not None:
            check_real("client.target_epsilon", self.target_epsilon, above=0.0)
        check_real("client.max_grad_norm", self.max_grad_norm, above=0.0, maximum=_MAX_GRAD_NORM)
        if self.target_delta is not None:
            check_delta("client.target_delta", self.target_delta)
        check_choice("client.grad_sample_mode", self.grad_sample_mode, (*GRAD_SAMPLE_MODES, BOOKKEEPING, AUTO))
        if self.proximal_mu and self.grad_sample_mode in _NORMS_WITHOUT_GRADIENTS:
            raise ValueError(
                f"client.proximal_mu={self.proximal_mu!r}: grad_sample_mode={self.grad_sample_mode!r} clips "
                "per-example norms without per-example gradients, so the proximal term cannot be clipped with "
                "them; use client.grad_sample_mode=ew, hooks, functorch or auto"
            )
        # Below the count's sensitivity (1) the release costs epsilon > 4 at
        # delta 1e-5 and the accountants' numerics break down.
        check_real("client.count_noise_multiplier", self.count_noise_multiplier, minimum=1.0, maximum=_MAX_COUNT_NOISE)
        if self.max_epsilon is not None:
            check_real("client.max_epsilon", self.max_epsilon, above=0.0)
        check_choice("client.accountant", self.accountant, _accounting().ACCOUNTANTS)

    def grad_sample_mode_for(self, model: nn.Module, *, device: torch.device) -> str:
        """The mode ``model`` trains with on ``device``: ``grad_sample_mode``, or what ``auto`` picks."""
        if self.grad_sample_mode != AUTO:
            return self.grad_sample_mode
        mode = auto_grad_sample_mode(device_type=device.type, batch_size=self.batch_size, model=model)
        if mode in _NORMS_WITHOUT_GRADIENTS and self.proximal_mu:
            # Ghost clipping and book-keeping form no per-example gradients (of Linear layers)
            # to add the proximal term to.
            return "ew" if _expanded_weights_cover(model) else "hooks"
        return mode

    def target_delta_for(self, count: float) -> float:
        """The delta of a client of (noisy) size ``count``.

        Parameters
        ----------
        count : float
            The client's released size ``n~``, ``>= 1``.

        Returns
        -------
        float
            ``target_delta`` if given, else ``min(1e-5, 1 / (10 count))``.

        Raises
        ------
        ValueError
            If ``target_delta`` was given and is not below ``1 / count``.
        """
        if self.target_delta is None:
            return min(DEFAULT_TARGET_DELTA, 1 / (10 * count))
        if self.target_delta >= 1 / count:
            raise ValueError(
                f"client.target_delta={self.target_delta}: must be < 1/n = {1 / count:.6g} "
                f"for a client with n={count:.0f} examples (its released, noisy size)"
            )
        return self.target_delta

    def sampling_for(self, count: float) -> tuple[float, int]:
        """Poisson sampling of a client of (noisy) size ``count``.

        Returns
        -------
        sample_rate : float
            ``1 / K``, the rate the sampler uses and the accountant records.
        steps_per_epoch : int
            ``K = ceil(count / batch_size)`` batches (DP-SGD steps) per epoch.
        """
        batches = poisson_batches(count=count, batch_size=self.batch_size)
        return 1 / batches, batches

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
        """Train ``model`` in place with DP-SGD on ``(x, y)`` for one round.

        Parameters
        ----------
        model : nn.Module
            The global model; it is trained in place and keeps its plain
            ``state_dict`` names, with Opacus' hooks removed afterwards.
        x, y : torch.Tensor
            The client's examples and labels; left untouched.
        seed : int or None
            ``None``: Poisson sampling and all noise draw from the operating
            system (private). An integer makes them reproducible, which voids
            the guarantee (tests and ``seeded_noise=true`` only).
        state : flwr.app.RecordDict or dict
            The node's persistent state; the ledger (accountant history and
            the released size) is read from and written to its
            ``"fedpriv.privacy"`` ``ConfigRecord`` (a plain ``dict`` serves
            where Flower is absent, see :mod:`clients.privacy_state`).
        planned_rounds : int, default 1
            Rounds in the run; used to solve the noise multiplier for
            ``target_epsilon``.

        Returns
        -------
        TrainOutcome
            ``num_examples`` is the released size ``n~`` and ``loss`` is
            ``None`` (an exact loss would leak); ``metrics`` holds the client's
            cumulative ``epsilon``, its ``delta``, the ``noise_multiplier``, the
            ``sample_rate`` and the total ``steps`` over all rounds it trained
            in; ``epsilon`` and ``delta`` are left out when
            ``noise_multiplier`` is 0.

        Raises
        ------
        PrivacyBudgetExhausted
            If this round would exceed ``max_epsilon``; nothing is trained, and
            ``state`` changes only by the count release of a first round
            (the decision depends on it, so it is accounted).
        ValueError
            If the model has layers Opacus cannot train, ``target_delta`` is
            not below ``1 / n~``, ``target_epsilon`` is unreachable or
            ``device=cuda`` finds no GPU; ``state`` is untouched by the last.
        """
        n = len(y)
        if n == 0:
            raise ValueError("client with n=0 examples: nothing to train on")
        if (
            isinstance(planned_rounds, bool)
            or not isinstance(planned_rounds, Integral)
            or planned_rounds < 1
        ):
            raise ValueError(f"planned_rounds={planned_rounds!r}: must be an integer >= 1")
        device = client_device(self.device)
        model.train()
        _check_model(model)
        batch_generator, noise_generator, count_rng = _generators(seed, device=device)

        ledger = _new_ledger(self.accountant)
        record = stored_ledger(state)
        if record is None:
            count = noisy_count(n, noise_multiplier=self.count_noise_multiplier, rng=count_rng)
            ledger.record(noise_multiplier=self.count_noise_multiplier, sample_rate=COUNT_SAMPLE_RATE)
            # Accounted the moment it exists: every later decision (delta,
            # sampling, declining, even an error) depends on it.
            record = _ledger_record(ledger, count=count)
            store_ledger(state, record)
            logger.info("client released its size n~=%.0f", count)
        else:
            count = float(record["noisy_count"])
            ledger.load_state_dict(record)
        delta = self.target_delta_for(count)
        sample_rate, steps_per_epoch = self.sampling_for(count)
        round_steps = self.local_epochs * steps_per_epoch
        noise_multiplier = self._noise_multiplier(
            record,
            history=ledger.history,
            delta=delta,
            sample_rate=sample_rate,
            steps=planned_rounds * round_steps,
            planned_rounds=planned_rounds,
        )
        if "noise_multiplier" not in record:
            logger.info("client: target_delta=%.3g, noise_multiplier=%.4g", delta, noise_multiplier)
            store_ledger(state, _ledger_record(ledger, count=count, noise_multiplier=noise_multiplier))
        release = {"noise_multiplier": noise_multiplier, "sample_rate": sample_rate, "steps": round_steps}
        over = ledger.epsilon_if_over(max_epsilon=self.max_epsilon, delta=delta, **release)
        if over is not None:
            raise PrivacyBudgetExhausted(
                epsilon=ledger.epsilon(delta),
                projected_epsilon=over,
                delta=delta,
                max_epsilon=self.max_epsilon,
            )
        projected = ledger.after(**release)

        trained = self._train(
            model,
            _RoundPlan(
                loader=poisson_loader(x, y, batches=steps_per_epoch, generator=batch_generator),
                device=device,
                expected_batch_size=count / steps_per_epoch,
                noise_generator=noise_generator,
                history=ledger.history,
                noise_multiplier=noise_multiplier,
                sample_rate=sample_rate,
            ),
        )
        if trained != projected.history:
            raise RuntimeError(
                f"Opacus recorded {trained} but {projected.history} was accounted for; "
                "the round's update is withheld"
            )
        epsilon = projected.epsilon(delta)
        store_ledger(state, _ledger_record(projected, count=count, noise_multiplier=noise_multiplier))
        # Without noise epsilon is infinite: there is no claim to report, and
        # the server refuses non-finite metrics.
        epsilon_key, delta_key = PRIVACY_REPLY_KEYS["record"]
        claim = {epsilon_key: float(epsilon), delta_key: float(delta)} if math.isfinite(epsilon) else {}
        metrics = {
            **claim,
            "noise_multiplier": float(noise_multiplier),
            "sample_rate": float(sample_rate),
            # Every DP-SGD step, without the one count release.
            "steps": projected.releases - 1,
        }
        return TrainOutcome(loss=None, num_examples=count, metrics=metrics)

    def _noise_multiplier(
        self,
        record: Mapping[str, Any],
        *,
        history: list,
        delta: float,
        sample_rate: float,
        steps: int,
        planned_rounds: int,
    ) -> float:
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        if "noise_multiplier" in record:
            return float(record["noise_multiplier"])
        noise_multiplier = _accounting().solve_noise_multiplier(
            target_epsilon=self.target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=self.accountant,
            history=history,
        )
        logger.info(
            "client: noise_multiplier=%.4g solved for target_epsilon=%g over %d rounds",
            noise_multiplier,
            self.target_epsilon,
            planned_rounds,
        )
        return noise_multiplier

    def _train(self, model: nn.Module, plan: _RoundPlan) -> list:
        """One round of DP-SGD on ``plan.device``; returns the new accountant history.

        The model comes back on the CPU, where its reply is built.
        """
        mode = self.grad_sample_mode_for(model, device=plan.device)
        if mode == BOOKKEEPING:
            return self._train_bookkeeping(model, plan)
        return self._train_opacus(model, plan, mode=mode)

    def _train_opacus(self, model: nn.Module, plan: _RoundPlan, *, mode: str) -> list:
        """:meth:`_train` with Opacus' ``PrivacyEngine`` in ``mode``."""
        with opacus_logging_contained():
            from opacus import PrivacyEngine

        device, loader = plan.device, plan.loader
        ghost = mode == "ghost"
        model.to(device)
        anchors = anchor_copies(model) if self.proximal_mu else []
        with _opacus_chatter_silenced():
            engine = PrivacyEngine(accountant=self.accountant)
            engine.accountant.history = list(plan.history)
            private = engine.make_private(
                module=model,
                optimizer=make_torch_optimizer(
                    self.optimizer,
                    model.parameters(),
                    lr=self.lr,
                    momentum=self.momentum,
                    weight_decay=self.weight_decay,
                ),
                criterion=nn.CrossEntropyLoss(),
                data_loader=loader,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                # The loader already samples Poisson batches (poisson_loader).
                poisson_sampling=False,
                grad_sample_mode=mode,
                noise_generator=plan.noise_generator,
            )
            if ghost:
                module, optimizer, criterion, private_loader = private
            else:
                (module, optimizer, private_loader), criterion = private, nn.CrossEntropyLoss()
            _use_public_batch_size(optimizer, plan.expected_batch_size)
            try:
                for _ in range(self.local_epochs):
                    for batch_x, batch_y in private_loader:
                        optimizer.zero_grad(set_to_none=True)
                        if len(batch_y) == 0:
                            _stage_empty_batch(optimizer, ghost=ghost)
                        else:
                            criterion(module(batch_x.to(device)), batch_y.to(device)).backward()
                            if self.proximal_mu:
                                add_proximal_per_example(model, anchors, mu=self.proximal_mu)
                        optimizer.step()
            finally:
                optimizer.zero_grad(set_to_none=True)
                module.to_standard_module()
                for param in model.parameters():
                    if hasattr(param, "summed_grad"):
                        del param.summed_grad
                model.to("cpu")
        return list(engine.accountant.history)

    def _train_bookkeeping(self, model: nn.Module, plan: _RoundPlan) -> list:
        """:meth:`_train` with :class:`fedpriv.privacy.bookkeeping.BookKeepingDPSGD` instead of Opacus' engine.

        The same Poisson batches, clipping, noise and accounting: an Opacus
        accountant records one step of ``(noise_multiplier, sample_rate)`` per
        batch, empty ones included, as ``DPOptimizer`` does.
        """
        accountant = _accounting().make_accountant(self.accountant)
        accountant.history = list(plan.history)
        model.to(plan.device)
        dp_sgd = _bookkeeping().BookKeepingDPSGD(
            model,
            max_grad_norm=self.max_grad_norm,
            noise_multiplier=plan.noise_multiplier,
            expected_batch_size=plan.expected_batch_size,
            generator=plan.noise_generator,
        )
        optimizer = make_optimizer(
            self.optimizer, model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        try:
            for _ in range(self.local_epochs):
                for batch_x, batch_y in plan.loader:
                    dp_sgd.gradients(batch_x.to(plan.device), batch_y.to(plan.device))
                    optimizer.step()
                    accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
        finally:
            dp_sgd.close()
            model.zero_grad(set_to_none=True)
            model.to("cpu")
        return list(accountant.history)


def _use_public_batch_size(optimizer, expected_batch_size: float) -> None:
    """Average gradients over ``expected_batch_size`` instead of Opacus' ``int(n * q)``.

    Opacus derives the divisor of the noisy gradient sum from the true data set
    size, which would make the released update depend on it beyond what is
    accounted; the noisy size keeps it a function of DP outputs.
    ``DPOptimizer.expected_batch_size`` is the constructor argument Opacus
    divides by in ``scale_grad`` (a test fails if that changes).
    """
    if not hasattr(optimizer, "expected_batch_size"):
        raise RuntimeError("Opacus' DPOptimizer has no expected_batch_size: cannot set the public divisor")
    optimizer.expected_batch_size = expected_batch_size


def _ledger_record(ledger, *, count: float, noise_multiplier: float | None = None) -> dict[str, Any]:
    """The client's ledger as stored in ``context.state`` (:func:`clients.privacy_state.store_ledger`) and on disk.

    ``noise_multiplier`` is left out until it is known (solved for a target).
    """
    solved = {} if noise_multiplier is None else {"noise_multiplier": noise_multiplier}
    return {**ledger.state_dict(), "noisy_count": count, **solved}
