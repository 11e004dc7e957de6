"""Client-level and record-level differential privacy: accounting and DP-FedAvg."""

from .accounting import (
    ACCOUNTANTS,
    HistoryEntry,
    adaptive_clipping_noise,
    compute_epsilon,
    history_from_lists,
    history_to_lists,
    make_accountant,
    record_steps,
    solve_noise_multiplier,
)
from .ledger import PrivacyLedger
from .mechanisms import (
    ClipStats,
    add_gaussian_noise,
    aggregate_clipped,
    bounded_weight,
    clip_to_norm,
    fixed_denominator,
    l2_norm,
    next_clipping_norm,
    noise_std,
    noisy_unclipped_fraction,
)

__all__ = [
    "ACCOUNTANTS",
    "ClipStats",
    "HistoryEntry",
    "PrivacyLedger",
    "adaptive_clipping_noise",
    "add_gaussian_noise",
    "aggregate_clipped",
    "bounded_weight",
    "clip_to_norm",
    "compute_epsilon",
    "fixed_denominator",
    "history_from_lists",
    "history_to_lists",
    "l2_norm",
    "make_accountant",
    "next_clipping_norm",
    "noise_std",
    "noisy_unclipped_fraction",
    "record_steps",
    "solve_noise_multiplier",
]
