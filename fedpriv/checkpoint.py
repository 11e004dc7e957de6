"""Checkpoints a run can resume from: the model, the rounds and the privacy spent.

A checkpoint is written after every completed round. Besides the global model
it holds the round rows written so far, the strategy's resumable state (the
server's accountant history, the adaptive clipping norm, ...) and the run's
privacy-ledger id, under which the clients keep their own accountant
histories (see :mod:`clients.node_state`). ``resume=RUN_DIR`` rebuilds all
of it, so a run whose SuperLink or ServerApp died goes on from its last
completed round without forgetting any epsilon.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedpriv.run_config import ConfigError, flatten

FORMAT = 2
CHECKPOINT_NAME = "checkpoint.pt"
# Settings a resumed run may change: how long it runs, where it talks to and on
# which devices (the results are the same in distribution on every device).
# Everything else (data, model, training, privacy) must match the checkpoint.
MAY_DIFFER = frozenset(
    {"num-rounds", "round-timeout", "resume", "output-dir", "strategy.node-wait-seconds", "client.device", "server-device"}
)
MAY_DIFFER_PREFIXES = ("mode.",)


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to continue a run after its last completed round.

    Attributes
    ----------
    round : int
        The last completed round.
    state_dict : dict[str, torch.Tensor]
        The global model after that round.
    rounds : list[dict[str, Any]]
        The round rows of ``results.json`` so far.
    strategy_state : dict[str, Any]
        What the strategy needs to go on (see ``WeightedFedAvg.resume_state``).
    ledger_id : str
        Names the clients' privacy ledgers of this run.
    config : dict[str, Any]
        The run's nested config.
    """

    round: int
    state_dict: dict[str, torch.Tensor]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    strategy_state: dict[str, Any] = field(default_factory=dict)
    ledger_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically (a crash leaves the previous one)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(
        {
            "format": FORMAT,
            "round": checkpoint.round,
            "state_dict": dict(checkpoint.state_dict),
            "rounds": list(checkpoint.rounds),
            "strategy_state": dict(checkpoint.strategy_state),
            "ledger_id": checkpoint.ledger_id,
            "config": dict(checkpoint.config),
        },
        tmp,
    )
    os.replace(tmp, path)


def load_checkpoint(run_dir: str | Path) -> Checkpoint:
    """Read the checkpoint of the run in ``run_dir``.

    Raises
    ------
    ConfigError
        If there is no checkpoint, or it was not written by this version.
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(f"resume={run_dir}: no {CHECKPOINT_NAME} there (give the folder of a run)")
    try:
        stored = torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike for a damaged file
        raise ConfigError(f"resume={run_dir}: {CHECKPOINT_NAME} could not be read: {exc}".splitlines()[0]) from exc
    if not isinstance(stored, dict) or stored.get("format") != FORMAT:
        raise ConfigError(
            f"resume={run_dir}: {CHECKPOINT_NAME} has format {stored.get('format') if isinstance(stored, dict) else None}, "
            f"this fedpriv resumes format {FORMAT} only"
        )
    return Checkpoint(
        round=int(stored["round"]),
        state_dict=dict(stored["state_dict"]),
        rounds=list(stored["rounds"]),
        strategy_state=dict(stored["strategy_state"]),
        ledger_id=str(stored["ledger_id"]),
        config=dict(stored["config"]),
    )


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two nested configs, as ``key: old -> new``.

    Keys in :data:`MAY_DIFFER` (and ``mode.*``) are left out: a resumed run
    may run longer or elsewhere, but not on other data or with other privacy.
    """
    old, new = flatten(stored), flatten(current)
    keys = sorted(set(old) | set(new))
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in keys
        if old.get(key) != new.get(key) and key not in MAY_DIFFER and not key.startswith(MAY_DIFFER_PREFIXES)
    ]


def check_resumable(checkpoint: Checkpoint, *, config: Mapping[str, Any], run_dir: str | Path) -> None:
    """Refuse to resume ``checkpoint`` with a config that changes the experiment.

    Raises
    ------
    ConfigError
        Naming the first key that differs, or when no round is left to run.
    """
    differences = config_differences(checkpoint.config, config)
    if differences:
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        raise ConfigError(f"resume={run_dir}: the config differs from the checkpoint's: {differences[0]}{more}")
    num_rounds = config.get("num_rounds")
    if isinstance(num_rounds, int) and num_rounds <= checkpoint.round:
        raise ConfigError(
            f"num_rounds={num_rounds}: the checkpoint in {run_dir} already has {checkpoint.round} rounds; "
            "raise num_rounds to go on"
        )
