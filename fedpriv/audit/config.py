"""The ``audit`` config group: ``audit=none`` (default) and ``audit=canary``.

Both options offer the same four hooks, so the apps call them without asking
which one they have: :meth:`check_strategy` (validation of the composed
config), :meth:`strategy_kwargs` (extra constructor arguments of the
strategy), :meth:`client_data` (a client's training data) and :meth:`report`
(the ``audit`` section of ``results.json``, or ``None``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import nn

from fedpriv.checks import check_choice, check_int, check_real, fail
from fedpriv.logs import get_logger

from .canaries import CanaryClients, alignment_scores, canary_coins, canary_records, client_canary_indices

logger = get_logger(__name__)

LEVELS = ("client", "record")
METHOD = "one-run canary audit (Steinke, Nasr, Jagielski 2023), delta 0"


@dataclass(frozen=True)
class NoAudit:
    """``audit=none``: the run is not audited and nothing changes."""

    def check_strategy(self, target: str) -> None:
        """Any strategy will do."""

    def strategy_kwargs(self) -> dict[str, Any]:
        """No extra strategy arguments."""
        return {}

    def client_data(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        partition_id: int,
        num_partitions: int,
        input_shape: Sequence[int],
        num_classes: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The client's data, unchanged."""
        return x, y

    def report(self, **_: Any) -> None:
        """No ``audit`` section."""
        return None


def _claim(value: object) -> float | None:
    # Infinity (no noise) and None (that privacy is off) both mean: nothing is claimed.
    return float(value) if isinstance(value, Real) and math.isfinite(value) else None


@dataclass(frozen=True)
class CanaryAudit:
    """``audit=canary``: the one-run audit (Steinke, Nasr, Jagielski 2023) as part of the run.

    ``num_canaries`` canaries are each included with probability 1/2 (see
    :mod:`fedpriv.audit.canaries` for what a canary is at each level); after
    the last round the server scores them, guesses on a fixed
    ``guess_fraction`` of them (the highest half of those guesses "included",
    the lowest half "excluded", abstaining in the middle) and turns the
    correct guesses into an empirical lower bound on epsilon at
    ``confidence`` (:mod:`fedpriv.audit.lower_bound`). A bound above the
    claimed epsilon would mean the claim is wrong; a bound far below it does
    not prove the claim, it only fails to refute it.

    Canaries change the run they audit: included canary clients add clipped
    updates to the average (and are counted by adaptive clipping), included
    canary records enlarge their clients' data. Audit runs are measurements,
    not production runs.

    Parameters
    ----------
    num_canaries : int
        ``m >= 2``. The bound can never exceed the value for ``m`` of ``m``
        correct guesses (about 3.5 for 100, 5.8 for 1000 at 95%).
    confidence : float
        Probability that the bound holds, in ``(0, 1)``.
    guess_fraction : float
        Fraction of the canaries to guess on, in ``(0, 1]``; ``r =
        max(2, int(guess_fraction * m))`` guesses. Fixed before the run, as the
        bound requires. Below 1 because the coins include about ``m / 2 +-
        sqrt(m) / 2`` canaries: guessing ``m / 2`` "included" would then be
        wrong on the surplus even when the scores separate perfectly.
    level : str
        ``client`` (canary clients; needs ``strategy=dp_fixed`` or
        ``dp_adaptive``) or ``record`` (canary records in clients' data, for
        ``client=opacus``; works with any strategy).
    seed : int
        Seed of the coins, directions, sampling and records; the auditor's
        secret (the config in ``results.json`` publishes it).
    """

    num_canaries: int = 1000
    confidence: float = 0.95
    guess_fraction: float = 0.8
    level: str = "client"
    seed: int = 0

    def __post_init__(self) -> None:
        """Validate the settings."""
        check_int("audit.num_canaries", self.num_canaries, minimum=2, maximum=10**7)
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, Real) or not 0 < self.confidence < 1:
            raise fail("audit.confidence", self.confidence, "must be in (0, 1)")
        check_real("audit.guess_fraction", self.guess_fraction, above=0.0, maximum=1.0)
        check_choice("audit.level", self.level, LEVELS)
        check_int("audit.seed", self.seed, minimum=0)

    @property
    def num_guesses(self) -> int:
        """``r = max(2, int(guess_fraction * num_canaries))``."""
        return max(2, int(self.guess_fraction * self.num_canaries))

    def check_strategy(self, target: str) -> None:
        """Refuse client canaries with a strategy that has no place to add them.

        Parameters
        ----------
        target : str
            The strategy's ``_target_``.

        Raises
        ------
        ValueError
            For ``level=client`` and a strategy class without
            ``accepts_extra_updates`` (anything but DP-FedAvg).
        """
        if self.level != "client":
            return
        from hydra.utils import get_class

        try:
            strategy_class = get_class(target)
        except (ImportError, ValueError):
            return  # building the strategy reports a bad _target_ in its own words
        if not getattr(strategy_class, "accepts_extra_updates", False):
            raise ValueError(
                f"audit.level='client': canary clients enter at the server's clipping step, which "
                f"strategy._target_={target!r} does not have; use strategy=dp_fixed or dp_adaptive "
                "(or audit.level=record)"
            )

    def strategy_kwargs(self) -> dict[str, Any]:
        """``{"extra_updates": CanaryClients(...)}`` for client canaries, else ``{}``."""
        if self.level != "client":
            return {}
        return {"extra_updates": CanaryClients(seed=self.seed, num_canaries=self.num_canaries)}

    def client_data(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        partition_id: int,
        num_partitions: int,
        input_shape: Sequence[int],
        num_classes: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The client's data plus its included record canaries (``level=record``).

        Returns
        -------
        tuple of torch.Tensor
            New tensors ``(x, y)`` with the canaries appended; the inputs are
            returned unchanged for ``level=client`` or a client without
            included canaries.
        """
        if self.level != "record":
            return x, y
        coins = canary_coins(seed=self.seed, num_canaries=self.num_canaries)
        mine = client_canary_indices(coins=coins, partition_id=partition_id, num_partitions=num_partitions)
        if mine.size == 0:
            return x, y
        canary_x, canary_y = canary_records(
            seed=self.seed, num_canaries=self.num_canaries, input_shape=input_shape, num_classes=num_classes
        )
        index = torch.from_numpy(mine)
        return torch.cat([x, canary_x[index]]), torch.cat([y, canary_y[index]])

    def report(
        self,
        *,
        initial_state: Mapping[str, torch.Tensor],
        final_state: Mapping[str, torch.Tensor],
        model: nn.Module,
        input_shape: Sequence[int],
        num_classes: int,
        privacy: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Score the canaries after the last round and bound epsilon.

        Parameters
        ----------
        initial_state, final_state : Mapping[str, torch.Tensor]
            The global model before the first round and after the last.
        model : nn.Module
            A model of the run's architecture; ``final_state`` is loaded into it.
        input_shape : sequence of int
            Shape of one example (for record canaries).
        num_classes : int
            Number of classes (for record canaries).
        privacy : Mapping[str, Any]
            The run's privacy summary (``epsilon_user``, ``delta_user``,
            ``epsilon_record_max``, ``delta_record``).

        Returns
        -------
        dict[str, Any]
            The ``audit`` section of ``results.json``.
        """
        # Imported here: scipy.stats (for the bound) is needed only by the
        # server, once, and clients build this object every round.
        from .model_outputs import per_example_loss
        from .one_run import audit_scores

        coins = canary_coins(seed=self.seed, num_canaries=self.num_canaries)
        if self.level == "client":
            scores = alignment_scores(
                seed=self.seed,
                num_canaries=self.num_canaries,
                initial=[value.detach().cpu().numpy() for value in initial_state.values()],
                final=[value.detach().cpu().numpy() for value in final_state.values()],
            )
            score = "alignment <theta_T - theta_0, u_i> of the model change with canary client i's direction"
            claimed, delta = _claim(privacy.get("epsilon_user")), privacy.get("delta_user")
        else:
            model.load_state_dict(dict(final_state))
            x, y = canary_records(
                seed=self.seed, num_canaries=self.num_canaries, input_shape=input_shape, num_classes=num_classes
            )
            scores = -per_example_loss(model, x, y)
            score = "minus the final model's loss on canary record i"
            claimed, delta = _claim(privacy.get("epsilon_record_max")), privacy.get("delta_record")
        result = audit_scores(scores, coins, num_guesses=self.num_guesses, confidence=self.confidence)
        if claimed is None:
            logger.warning(
                "audit: epsilon lower bound %.3f (%d of %d guesses correct, confidence %g); claimed epsilon: "
                "none, the run is NOT %s-level private",
                result.epsilon_lower_bound, result.correct_guesses, result.num_guesses, self.confidence, self.level,
            )
        else:
            logger.info(
                "audit: epsilon lower bound %.3f (%d of %d guesses correct, confidence %g); claimed %s-level "
                "epsilon %.3f (delta %g)",
                result.epsilon_lower_bound, result.correct_guesses, result.num_guesses, self.confidence,
                self.level, claimed, delta,
            )
        return {
            "method": METHOD,
            "level": self.level,
            "score": score,
            "epsilon_lower_bound": result.epsilon_lower_bound,
            "confidence": result.confidence,
            "num_canaries": result.num_canaries,
            "num_included": result.num_included,
            "num_guesses": result.num_guesses,
            "correct_guesses": result.correct_guesses,
            "claimed_epsilon": claimed,
            "claimed_delta": delta if claimed is not None else None,
            "private": claimed is not None,
        }

