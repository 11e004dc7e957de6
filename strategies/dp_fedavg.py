"""Server-side client-level DP: DP-FedAvg with fixed or adaptive clipping.

The strategy only wires things together. The mechanism (clipping, bounded
weights, the fixed denominator, Gaussian noise, the adaptive clipping update)
is in :mod:`fedpriv.privacy.mechanisms` and the accounting in
:mod:`fedpriv.privacy.accounting`, both pure functions tested on their own.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from flwr.serverapp import Grid

from fedpriv.checks import check_bool, check_choice, check_delta, check_int, check_noise_multiplier, check_real
from fedpriv.logs import get_logger
from fedpriv.privacy import (
    ACCOUNTANTS,
    adaptive_clipping_noise,
    add_gaussian_noise,
    aggregate_clipped,
    bounded_weight,
    fixed_denominator,
    next_clipping_norm,
    noise_std,
    noisy_unclipped_fraction,
)
from fedpriv.privacy.ledger import SKELLAM_ACCOUNTANT, PrivacyLedger
from fedpriv.secagg.encoding import DistributedDPEncoding, NoisePlan, plan_distributed_noise
from strategies.aggregation import TrainReply, add_flat
from strategies.secagg_server import SecAggOutcome
from strategies.weighted_fedavg import StopRun, WeightedFedAvg

logger = get_logger(__name__)

SAMPLING = ("poisson",)

# Bounds inside which the mechanism and the accountant are numerically
# meaningful; outside them a run would end in an overflow or an infinite model.
MAX_CLIPPING_NORM = 1e6
MAX_NOISE_STD = 1e3  # per coordinate: no signal survives, float32 models overflow
MIN_DENOMINATOR = 0.01  # expected sampled clients per round
MAX_CLIP_LR = 10.0
MAX_WEIGHT_CAP = 1e12  # with num-examples >= 1, a bounded weight stays >= 1e-12


class ExtraUpdates(Protocol):
    """Source of extra client updates aggregated with the replies (audit canaries).

    Called once per round; returns updates (one array per layer, shaped like
    ``like``) that the strategy treats exactly like clients' updates: clipped
    to ``clipping_norm``, weight 1, summed over the fixed denominator, then
    noised. See :class:`fedpriv.audit.canaries.CanaryClients`.
    """

    def __call__(
        self, *, server_round: int, clipping_norm: float, sample_rate: float, like: Sequence[np.ndarray]
    ) -> list[list[np.ndarray]]: ...


class DPFedAvg(WeightedFedAvg):
    """DP-FedAvg (McMahan et al. 2018) with fixed clipping and Poisson sampling.

    Client-level DP: neighbouring federations differ in one client's data.
    Every round:

    1. each connected node joins independently with probability
       ``sample_rate`` (Poisson sampling, so accounting may use amplification
       by sampling);
    2. the server clips each reply's update (its model minus the global model)
       to L2 norm ``clipping_norm``, whatever the client did;
    3. weights are bounded, ``w_k = min(num_examples_k / weight_cap, 1)`` (1
       for every client when ``weighted=false``);
    4. the weighted sum of clipped updates is divided by the fixed denominator
       ``D = sample_rate * num_clients`` (the expected number of sampled
       clients), so one client moves the average by at most
       ``clipping_norm / D`` whatever it reports;
    5. Gaussian noise with std ``noise_multiplier * clipping_norm / D`` is
       added, then the server optimizer steps with the noised aggregate: it
       reads only that DP release, so its step (momentum, Adam's moments) is
       post-processing and costs no epsilon.

    The estimator ``sum_k w_k clip(u_k) / D`` is unbiased for the mean
    clipped update when every weight is 1; clients with ``num_examples <
    weight_cap`` count less, which biases the average towards zero by the
    mean weight. Choose ``weight_cap`` at or below typical client sizes.

    With secure aggregation (:meth:`enable_secure_aggregation`) the server
    cannot clip what it cannot see: each client clips its own update to
    ``clipping_norm``, applies its bounded weight, rounds it to the run's
    integer grid and adds its share of Skellam noise
    (:class:`fedpriv.secagg.encoding.DistributedDPEncoding`); the server
    divides the unmasked sum by ``D``. Shares are sized so that the clients a
    round needs (all but ``secure.dropout_tolerance`` of the sampled) carry
    the accounted noise; with fewer survivors the round is refused before
    anything is unmasked, releases nothing and is not accounted. A release
    is accounted as a distributed Skellam sum (:mod:`fedpriv.privacy.skellam`).

    Each round is accounted as one Poisson-sampled Gaussian event with rate
    ``sample_rate`` and the noise multiplier, whether or not any reply was
    valid: the noisy model is released either way. A round that would take
    ``epsilon_user`` past ``max_epsilon`` is not run: the run stops with
    ``privacy_budget_exhausted``.

    Parameters
    ----------
    num_clients : int
        Population size ``N`` (the number of SuperNodes).
    sample_rate : float
        Poisson sampling probability ``q`` in ``(0, 1]``.
    noise_multiplier : float
        ``z >= 0`` (0 only for audits: the run is then not private).
    clipping_norm : float
        L2 bound on each client's update.
    weighted : bool
        Bound weights by ``num_examples / weight_cap``; else every weight is 1.
    weight_cap : float
        Examples at which a client's weight reaches 1.
    target_delta : float
        Delta of the reported ``epsilon_user``; must be below ``1 / num_clients``.
    accountant : str
        ``prv`` (default) or ``rdp``, Opacus' accountants.
    max_epsilon : float or None
        Client-level budget; ``None`` for no budget.
    sampling : str
        Only ``poisson``: fixed-size sampling is refused because its
        accounting (replace-one neighbours) is not implemented.
    sampling_seed, noise_seed : int or None
        Seeds for reproducible tests and audits. ``None`` (default) draws from
        the OS: amplification by sampling and the noise itself assume that
        nobody who sees the model can recompute the sample or the noise, and
        ``results.json`` publishes the config.
    extra_updates : ExtraUpdates or None
        Audit canaries (``audit=canary``): their updates join each round's
        clipped sum before the noise, counted in the round's ``num_canaries``.
    **kwargs
        Passed to :class:`WeightedFedAvg` (``min_available_nodes``,
        ``server_optimizer``, ``server_lr``, ``node_wait_seconds``, ...).
        Training sampling is Poisson, so ``fraction_train`` and
        ``min_train_nodes`` are refused, and ``min_valid_replies`` too: every
        round releases a model. A robust ``aggregator`` is refused: its
        sensitivity is not the clipped mean's that the noise is calibrated to.
    """

    accepts_extra_updates = True
    """This strategy takes ``extra_updates`` (what ``audit.level=client`` needs)."""
    supports_homomorphic_encryption = False
    """The server clips and noises each update: it cannot do that to ciphertexts."""

    def __init__(
        self,
        *,
        num_clients: int,
        sample_rate: float,
        noise_multiplier: float,
        clipping_norm: float,
        weighted: bool = True,
        weight_cap: float = 100.0,
        target_delta: float = 1e-5,
        accountant: str = "prv",
        max_epsilon: float | None = None,
        sampling: str = "poisson",
        sampling_seed: int | None = None,
        noise_seed: int | None = None,
        extra_updates: ExtraUpdates | None = None,
        **kwargs,
    ) -> None:
        not_applicable = sorted(set(kwargs) & {"fraction_train", "min_train_nodes", "min_valid_replies"})
        if not_applicable:
            key = not_applicable[0]
            raise ValueError(
                f"strategy.{key}={kwargs[key]!r}: does not apply to DP-FedAvg, which Poisson-samples "
                "clients with sample_rate and releases a model every round"
            )
        super().__init__(**kwargs)
        if self.robust.enabled:
            raise ValueError(
                f"strategy.aggregator={self.robust.name!r}: client-level DP noise is calibrated to the clipped "
                "mean's sensitivity (clipping_norm / (sample_rate * num_clients)); a robust aggregate of clipped "
                "updates has another, which is not accounted; use strategy.aggregator=mean with DP-FedAvg"
            )
        if self.fraction_evaluate > 0:
            raise ValueError(
                f"strategy.fraction_evaluate={self.fraction_evaluate:g}: federated evaluation releases exact "
                "client metrics that epsilon_user does not cover; the server evaluates on its own split"
            )
        if sampling not in SAMPLING:
            raise ValueError(
                f"strategy.sampling={sampling!r}: only 'poisson' is accounted here "
                "(fixed-size sampling needs replace-one accounting)"
            )
        check_int("strategy.num_clients", num_clients, minimum=1)
        check_real("strategy.sample_rate", sample_rate, above=0.0, maximum=1.0)
        check_noise_multiplier("strategy.noise_multiplier", noise_multiplier)
        check_delta("strategy.target_delta", target_delta, below=1 / num_clients, below_name="1/num_clients")
        check_choice("strategy.accountant", accountant, ACCOUNTANTS)
        check_bool("strategy.weighted", weighted)
        if max_epsilon is not None:
            check_real("strategy.max_epsilon", max_epsilon, above=0.0)
        for key, value in (("sampling_seed", sampling_seed), ("noise_seed", noise_seed)):
            if value is not None:
                check_int(f"strategy.{key}", value, minimum=0)
        self.num_clients = num_clients
        self.sample_rate = float(sample_rate)
        self.noise_multiplier = float(noise_multiplier)
        self.clipping_norm = check_real("strategy.clipping_norm", clipping_norm, above=0.0, maximum=MAX_CLIPPING_NORM)
        self.weighted = weighted
        self.weight_cap = check_real("strategy.weight_cap", weight_cap, above=0.0, maximum=MAX_WEIGHT_CAP)
        self.target_delta = target_delta
        self.accountant = accountant
        self.max_epsilon = max_epsilon
        self.extra_updates = extra_updates
        self.denominator = fixed_denominator(sample_rate=self.sample_rate, num_clients=num_clients)
        self.ledger = PrivacyLedger(accountant=accountant)
        self._check_numerics()
        self.epsilon_user = 0.0
        self._sampling_rng = np.random.default_rng(sampling_seed if sampling_seed is not None else secrets.randbits(128))
        self._noise_rng = np.random.default_rng(noise_seed if noise_seed is not None else secrets.randbits(128))
        # Only seeded generators go into checkpoints: the state of an OS-seeded
        # one on disk would let a reader recompute the noise of later rounds.
        self._seeded_rngs = {
            name: rng
            for name, rng, seed in (("sampling", self._sampling_rng, sampling_seed), ("noise", self._noise_rng, noise_seed))
            if seed is not None
        }
        self._noise_plan: NoisePlan | None = None
        if self.noise_multiplier == 0:
            logger.warning("strategy.noise_multiplier=0: the server adds no noise; this run is NOT private")

    def _check_numerics(self) -> None:
        """Refuse settings for which the noise or the accountant cannot be computed.

        Raises
        ------
        ValueError
            Naming the key and value: fewer than 0.01 expected clients per
            round, a noise std above 1e3, or an epsilon the accountant cannot
            compute.
        """
        if self.denominator < MIN_DENOMINATOR:
            raise ValueError(
                f"strategy.sample_rate={self.sample_rate:g}: sample_rate * num_clients = {self.denominator:.3g} "
                f"expected clients per round, must be >= {MIN_DENOMINATOR:g}"
            )
        std = noise_std(noise_multiplier=self.noise_multiplier, clipping_norm=self.clipping_norm, denominator=self.denominator)
        if std > MAX_NOISE_STD:
            raise ValueError(
                f"strategy.noise_multiplier={self.noise_multiplier:g}: noise std noise_multiplier * clipping_norm / "
                f"(sample_rate * num_clients) = {std:.3g} per coordinate, must be <= {MAX_NOISE_STD:g}"
            )
        if self.noise_multiplier == 0:
            return
        try:
            epsilon = self.ledger.after(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate).epsilon(
                self.target_delta
            )
        except (ArithmeticError, ValueError) as exc:
            epsilon, reason = math.nan, f"{type(exc).__name__}: {exc}"
        else:
            reason = f"epsilon={epsilon}"
        if not math.isfinite(epsilon):
            raise ValueError(
                f"strategy.noise_multiplier={self.noise_multiplier:g}: the {self.accountant} accountant cannot "
                f"compute one round's epsilon at sample_rate={self.sample_rate:g} ({reason})"
            )

    @property
    def update_noise_multiplier(self) -> float:
        """Noise multiplier applied to the clipped update sum this round."""
        return self.noise_multiplier

    def enable_secure_aggregation(self, secure, *, dimension: int | None = None) -> None:
        """Secure aggregation with distributed Skellam noise, accounted with its own ledger.

        With ``dimension`` (values in the model) it also checks that
        ``num_clients`` noisy clients fit ``secure.modulus_range``.

        Raises
        ------
        ValueError
            With audit canaries (the server adds them to individual updates),
            or when the clients and their noise cannot fit the modulus.
        """
        if self.extra_updates is not None:
            raise ValueError(
                f"secure={secure.name}: audit=canary adds canary updates on the server, beside clients' "
                "updates it can no longer see; audit with secure=none"
            )
        super().enable_secure_aggregation(secure)
        if dimension is not None:
            self._noise_plan = self._plan_noise(dimension)
        self.accountant = SKELLAM_ACCOUNTANT
        self.ledger = PrivacyLedger(accountant=SKELLAM_ACCOUNTANT, history=self.ledger.history, mechanism="skellam")

    def _plan_noise(self, dimension: int) -> NoisePlan:
        return plan_distributed_noise(
            clipping_norm=self.clipping_norm,
            noise_multiplier=self.update_noise_multiplier,
            max_clients=self.num_clients,
            dimension=dimension,
            modulus=self.secure.modulus_range,
            dropout_tolerance=self.secure.dropout_tolerance,
        )

    def secure_encoding(self, *, num_sampled: int, dimension: int) -> DistributedDPEncoding:
        """Clip, weight, round to the run's grid and add a share of the noise, on each client."""
        if self._noise_plan is None:
            self._noise_plan = self._plan_noise(dimension)
        return DistributedDPEncoding(
            clipping_norm=self.clipping_norm,
            weighted=self.weighted,
            weight_cap=self.weight_cap,
            scale=self._noise_plan.scale,
            variance_per_client=self._noise_plan.variance_per_client(num_sampled),
        )

    def _accounted_noise_multiplier(self) -> float:
        """What a release is recorded with: the Skellam plan's dominating Gaussian's under secure aggregation."""
        return self._noise_plan.noise_multiplier if self._noise_plan is not None else self.noise_multiplier

    def secure_min_survivors(self, num_sampled: int) -> int:
        """The survivors whose noise shares add up to the accounted variance."""
        return self._noise_plan.required_survivors(num_sampled)

    def aggregate_secure(self, server_round: int, outcome: SecAggOutcome) -> list[np.ndarray]:
        """The noisy sum over the fixed denominator.

        The sum holds at least the accounted noise (the round was refused
        otherwise); what is accounted and reported is that amount, a function
        of public config only, so neither reveals how many clients survived.
        """
        plan = self._noise_plan
        self._round_stats = {
            "clipping_norm": self.clipping_norm,
            "noise_std": plan.noise_std / self.denominator,
            "accounted_noise_multiplier": self._accounted_noise_multiplier(),
        }
        return add_flat(self._global, self._encoding.decode(outcome.total) / self.denominator)

    @property
    def client_level_private(self) -> bool:
        """True unless the noise multiplier is 0 (audits), when nothing is private."""
        return self.noise_multiplier > 0

    def summary(self) -> None:
        """Log the DP configuration."""
        super().summary()
        logger.info(
            "%s: Poisson q=%g over %d clients, noise_multiplier=%g, clipping_norm=%g, denominator=%g, "
            "weighted=%s (weight_cap=%g), accountant=%s, target_delta=%g, max_epsilon=%s",
            type(self).__name__,
            self.sample_rate,
            self.num_clients,
            self.noise_multiplier,
            self.clipping_norm,
            self.denominator,
            self.weighted,
            self.weight_cap,
            self.accountant,
            self.target_delta,
            self.max_epsilon,
        )

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The releases accounted so far (the ledger's history)."""
        return self.ledger.history

    def sample_train_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """Check the budget, then Poisson-sample the nodes for this round.

        Raises
        ------
        StopRun
            If this round's release would take ``epsilon_user`` past ``max_epsilon``.
        """
        projected = self.ledger.epsilon_if_over(
            max_epsilon=self.max_epsilon,
            delta=self.target_delta,
            noise_multiplier=self._accounted_noise_multiplier(),
            sample_rate=self.sample_rate,
        )
        if projected is not None:
            raise StopRun(
                "privacy_budget_exhausted",
                f"round {server_round} would bring epsilon_user from {self.epsilon_user:.4g} to "
                f"{projected:.4g} > strategy.max_epsilon={self.max_epsilon:g}",
            )
        candidates = sorted(self._trainable_nodes(grid))
        joins = self._sampling_rng.random(len(candidates)) < self.sample_rate
        return [node for node, joined in zip(candidates, joins, strict=True) if joined]

    def aggregate_updates(self, server_round: int, valid: list[TrainReply]) -> list[np.ndarray]:
        """Clip, weight, average over the fixed denominator and add noise."""
        updates = [
            [client - base for client, base in zip(r.arrays, self._global, strict=True)] for r in valid
        ]
        weights = [
            bounded_weight(r.num_examples, weight_cap=self.weight_cap, weighted=self.weighted) for r in valid
        ]
        clipping_norm = self.clipping_norm
        extra = []
        if self.extra_updates is not None:
            extra = self.extra_updates(
                server_round=server_round, clipping_norm=clipping_norm, sample_rate=self.sample_rate, like=self._global
            )
        average, stats = aggregate_clipped(
            updates + extra,
            weights + [1.0] * len(extra),
            clipping_norm=clipping_norm,
            denominator=self.denominator,
            like=self._global,
        )
        std = noise_std(
            noise_multiplier=self.update_noise_multiplier, clipping_norm=clipping_norm, denominator=self.denominator
        )
        noisy = add_gaussian_noise(average, std=std, rng=self._noise_rng)
        self._round_stats = {"clipping_norm": clipping_norm, "noise_std": std, "clip_fraction": stats.clip_fraction}
        if self.extra_updates is not None:
            self._round_stats["num_canaries"] = len(extra)
        self.after_clipping(stats.norms)
        return [(base + update).astype(base.dtype) for base, update in zip(self._global, noisy, strict=True)]

    def after_clipping(self, norms: tuple[float, ...]) -> None:
        """Hook for adaptive clipping: see the round's update norms (before clipping)."""

    def releases_update(self, valid: list[TrainReply]) -> bool:
        """Always: the noisy model is released even when no reply was valid."""
        return True

    def round_metrics(self, server_round: int) -> dict[str, float]:
        """Account the round's release and report epsilon, clipping norm and noise."""
        stats, self._round_stats = dict(self._round_stats), {}
        if not stats:
            return {}
        noise_multiplier = stats.pop("accounted_noise_multiplier", self.noise_multiplier)
        self.ledger.record(noise_multiplier=noise_multiplier, sample_rate=self.sample_rate)
        self.epsilon_user = self.ledger.epsilon(self.target_delta)
        return {**stats, "epsilon_user": self.epsilon_user}

    def privacy_summary(self) -> dict[str, float | None]:
        """Client-level epsilon spent by the run, plus record-level from clients."""
        summary = super().privacy_summary()
        return {**summary, "epsilon_user": self.epsilon_user, "delta_user": self.target_delta}

    def resume_state(self) -> dict[str, Any]:
        """The base state plus the accountant history, the clipping norm and seeded RNG states."""
        return {
            **super().resume_state(),
            "history": self.ledger.state_dict(),
            "clipping_norm": self.clipping_norm,
            "rng_states": {name: rng.bit_generator.state for name, rng in self._seeded_rngs.items()},
        }

    def restore(self, state: Mapping[str, Any], *, completed_rounds: int) -> None:
        """Go on from a checkpoint with the accountant history of every round released so far.

        Raises
        ------
        ValueError
            If the checkpoint holds no accountant history while rounds were completed.
        """
        super().restore(state, completed_rounds=completed_rounds)
        if "history" not in state:
            raise ValueError(
                f"strategy state after {completed_rounds} rounds has no accountant history: "
                "the checkpoint is not from a DP-FedAvg run"
            )
        self.ledger.load_state_dict(state["history"])
        self.epsilon_user = self.ledger.epsilon(self.target_delta)
        self.clipping_norm = check_real("strategy.clipping_norm", state["clipping_norm"], above=0.0)
        for name, rng_state in state.get("rng_states", {}).items():
            if name in self._seeded_rngs:
                self._seeded_rngs[name].bit_generator.state = rng_state
        logger.info(
            "%s resumed after round %d: epsilon_user %.4g over %d releases, clipping_norm %g",
            type(self).__name__,
            completed_rounds,
            self.epsilon_user,
            self.ledger.releases,
            self.clipping_norm,
        )


class AdaptiveDPFedAvg(DPFedAvg):
    """DP-FedAvg whose clipping norm tracks a quantile of update norms.

    Andrew et al. 2021: after each round the clipping norm moves
    geometrically, ``C <- C * exp(-clip_lr * (b - target_quantile))``, where
    ``b`` is a noisy estimate of the fraction of updates with norm ``<= C``
    from a count released with Gaussian noise of std
    ``clipped_count_stddev``. The count costs privacy too: the stated
    ``noise_multiplier`` ``z`` is the total, split so that
    ``z^-2 = z_update^-2 + (2 * clipped_count_stddev)^-2``, and each round is
    accounted as one Gaussian event with ``z``. Noise in a round is calibrated
    to the clipping norm used in that round; the updated norm applies from the
    next round on.

    Parameters
    ----------
    target_quantile : float
        Fraction of updates that should fit under the clipping norm.
    clip_lr : float
        Geometric learning rate of the clipping norm.
    clipped_count_stddev : float
        Std of the noise on the count of unclipped clients, in clients; must
        exceed ``noise_multiplier / 2``.
    **kwargs
        :class:`DPFedAvg` parameters; ``clipping_norm`` is the initial norm.
    """

    supports_secure_aggregation = False
    """The noisy count of unclipped updates needs each update's norm."""

    def __init__(
        self,
        *,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        clipped_count_stddev: float = 2.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.target_quantile = check_real("strategy.target_quantile", target_quantile, above=0.0)
        if self.target_quantile >= 1:
            raise ValueError(f"strategy.target_quantile={target_quantile!r}: must be in (0, 1)")
        # exp(-clip_lr * (b - quantile)) must neither overflow nor vanish in a round.
        self.clip_lr = check_real("strategy.clip_lr", clip_lr, above=0.0, maximum=MAX_CLIP_LR)
        self.clipped_count_stddev = check_real(
            "strategy.clipped_count_stddev", clipped_count_stddev, above=0.0, maximum=MAX_CLIPPING_NORM
        )
        self._update_noise_multiplier = adaptive_clipping_noise(
            noise_multiplier=self.noise_multiplier, clipped_count_stddev=clipped_count_stddev
        )

    @property
    def update_noise_multiplier(self) -> float:
        """The update's share of the noise budget (the count takes the rest)."""
        return self._update_noise_multiplier

    def after_clipping(self, norms: tuple[float, ...]) -> None:
        """Move the clipping norm towards the target quantile, from a noisy count."""
        fraction = noisy_unclipped_fraction(
            norms,
            clipping_norm=self.clipping_norm,
            count_stddev=self.clipped_count_stddev if self.noise_multiplier > 0 else 0.0,
            expected_num_clients=self.denominator,
            rng=self._noise_rng,
        )
        self.clipping_norm = next_clipping_norm(
            clipping_norm=self.clipping_norm,
            unclipped_fraction=fraction,
            target_quantile=self.target_quantile,
            clip_lr=self.clip_lr,
        )
        self._round_stats["unclipped_fraction_noisy"] = fraction
