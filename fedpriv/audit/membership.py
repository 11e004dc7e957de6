"""Membership inference scores and their ROC summary (pure numpy).

Two attacks on a trained model, both turning per-example model outputs into a
score where higher means "more likely a training member":

* **Loss threshold** (Yeom et al. 2018): ``-loss(x, y)``. Members tend to have
  lower loss; every threshold on the score is one attack.
* **Offline LiRA with a fixed variance** (Carlini et al. 2022, "Membership
  Inference Attacks From First Principles", Sec. 4 and 6): calibrates for how
  hard each example is. Shadow models are trained on random halves of the
  candidate examples; for each example the shadows that did *not* see it
  ("out" models) give the mean ``mu_out(x)`` of the logit-scaled confidence
  ``phi = log(p_y / (1 - p_y))``, and the score is the one-sided likelihood
  ratio statistic ``(phi_target(x) - mu_out(x)) / sigma_out`` with one
  ``sigma_out`` pooled over all examples (the paper's choice with few shadows).

:func:`roc_summary` reports the AUC and the true positive rate at low false
positive rates, which is what matters for privacy (Carlini et al. 2022, Sec. 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

LOW_FPRS = (0.01, 0.001)
"""False positive rates at which :func:`roc_summary` reports the TPR."""


@dataclass(frozen=True)
class RocSummary:
    """How well a score separates members from non-members.

    Attributes
    ----------
    auc : float
        Area under the ROC curve (0.5 is chance).
    tpr_at_1pct_fpr : float
        Largest true positive rate with a false positive rate <= 1%.
    tpr_at_01pct_fpr : float
        The same at <= 0.1%; with fewer than 1000 non-members this is the
        rate at zero false positives.
    num_members, num_nonmembers : int
        Sizes of the two sides.
    """

    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    num_members: int
    num_nonmembers: int


def _finite_vector(key: str, values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or not np.all(np.isfinite(array)):
        raise ValueError(f"{key}: must be a flat array of finite numbers (shape {array.shape})")
    return array


def loss_threshold_scores(losses: Sequence[float]) -> np.ndarray:
    """Scores of the loss-threshold attack: ``-loss``.

    Parameters
    ----------
    losses : sequence of float
        Per-example cross-entropy of the target model; left untouched.

    Returns
    -------
    numpy.ndarray
    """
    return -_finite_vector("losses", losses)


def offline_lira_scores(
    target_confidence: Sequence[float],
    shadow_confidence: np.ndarray,
    shadow_in: np.ndarray,
) -> np.ndarray:
    """Scores of offline LiRA with a pooled (fixed) variance.

    Parameters
    ----------
    target_confidence : sequence of float
        ``phi`` of the target model per example, length ``n``.
    shadow_confidence : numpy.ndarray
        ``phi`` of each shadow model per example, shape ``[K, n]``.
    shadow_in : numpy.ndarray
        Boolean ``[K, n]``: whether shadow ``k`` was trained on example ``j``.
        Every example needs at least one "out" shadow.

    Returns
    -------
    numpy.ndarray
        ``(phi_target - mu_out) / sigma_out``, length ``n``.
    """
    target = _finite_vector("target_confidence", target_confidence)
    shadows = np.asarray(shadow_confidence, dtype=np.float64)
    trained = np.asarray(shadow_in, dtype=bool)
    if shadows.shape != trained.shape or shadows.ndim != 2 or shadows.shape[1] != target.size:
        raise ValueError(
            f"shadow_confidence {shadows.shape} and shadow_in {trained.shape}: must both be [K, {target.size}]"
        )
    if not np.all(np.isfinite(shadows)):
        raise ValueError("shadow_confidence: must be finite")
    out = ~trained
    out_count = out.sum(axis=0)
    if np.any(out_count == 0):
        raise ValueError(f"shadow_in: {int(np.sum(out_count == 0))} examples have no shadow model that left them out")
    mu_out = np.where(out, shadows, 0.0).sum(axis=0) / out_count
    residuals = (shadows - mu_out)[out]
    # Guard against a degenerate pool (identical shadows); any positive scale ranks the same.
    sigma_out = max(float(np.std(residuals)), 1e-12)
    return (target - mu_out) / sigma_out


def roc_summary(scores: Sequence[float], is_member: Sequence[bool]) -> RocSummary:
    """AUC and TPR at 1% and 0.1% FPR of a membership score.

    Parameters
    ----------
    scores : sequence of float
        Higher means "member".
    is_member : sequence of bool
        Ground truth, same length; both classes must occur.

    Returns
    -------
    RocSummary
    """
    values = _finite_vector("scores", scores)
    truth = np.asarray(is_member, dtype=bool)
    if truth.shape != values.shape:
        raise ValueError(f"is_member: {truth.size} labels for {values.size} scores")
    members = int(truth.sum())
    if members in (0, truth.size):
        raise ValueError(f"is_member: {members} members of {truth.size}; need both members and non-members")
    fpr, tpr, _ = roc_curve(truth, values)
    low = [float(tpr[fpr <= limit].max()) for limit in LOW_FPRS]
    return RocSummary(
        auc=float(roc_auc_score(truth, values)),
        tpr_at_1pct_fpr=low[0],
        tpr_at_01pct_fpr=low[1],
        num_members=members,
        num_nonmembers=int(truth.size - members),
    )
