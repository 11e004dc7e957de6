"""The results contract: ``results.json``, ``metrics.csv``, plots, checkpoints.

``results.json`` and ``metrics.csv`` are rewritten atomically after every
round and a resumable checkpoint (:mod:`fedpriv.checkpoint`) is written, so a
run that dies keeps every completed round and can go on from the last one.
See docs/design.md, section 5, and the README for the fields.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedpriv.checkpoint import CHECKPOINT_NAME, Checkpoint, save_checkpoint
from fedpriv.publication import (
    CLIENT_LEVEL_PUBLIC_FINAL,
    CLIENT_LEVEL_PUBLIC_ROUND,
    append_operator_record,
    split_public,
)

SCHEMA = 1
# Always present in every round row, in this order (null where not applicable).
ROUND_FIELDS = (
    "round",
    "seconds",
    "num_clients",
    "num_rejected",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "epsilon_user",
    "epsilon_record_max",
    "epsilon_local_max",
    "clipping_norm",
    "noise_std",
)
STOPPED_REASONS = ("completed", "privacy_budget_exhausted", "diverged")
PRIVACY_PAIRS = (
    ("epsilon_user", "delta_user"),
    ("epsilon_record_max", "delta_record"),
    ("epsilon_local_max", "delta_local"),
)
"""The epsilons a run reports (client-level, record-level, local) with their deltas."""


def _json_value(value: Any) -> Any:
    # results.json stays strict JSON: no NaN or Infinity.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


MODEL_FILE = "model.pt"
ENCRYPTED_MODEL_FILE = "model-encrypted.pt"
"""``secure=ckks``: the final model as ciphertexts; ``scripts/decrypt_model.py`` writes ``model.pt`` from it."""


class RunRecorder:
    """Writes one run's results into its output folder.

    Parameters
    ----------
    output_dir : Path
        The run's folder (created if missing).
    config : Mapping[str, Any]
        The resolved nested config, stored in ``results.json``.
    ledger_id : str
        The run's privacy-ledger id, stored in every checkpoint.
    resumed : Checkpoint or None
        The checkpoint this run goes on from: its rounds are kept.
    client_level_private : bool
        The run is client-level DP: round rows, ``final`` and timings publish
        only the allow-listed DP outputs (:mod:`fedpriv.publication`); the
        exact values go to the operator file.
    privacy : Mapping[str, Any]
        The ``privacy`` section of ``results.json``: which protections were
        on, and whether seeded noise voided them.
    model_file : str
        Name of the final model's file: :data:`MODEL_FILE`, or
        :data:`ENCRYPTED_MODEL_FILE` when the server holds only ciphertexts.
    """

    def __init__(
        self,
        output_dir: Path,
        *,
        config: Mapping[str, Any],
        ledger_id: str = "",
        resumed: Checkpoint | None = None,
        client_level_private: bool = False,
        privacy: Mapping[str, Any] | None = None,
        model_file: str = MODEL_FILE,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.model_file = model_file
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.config = dict(config)
        self.ledger_id = ledger_id
        self.client_level_private = client_level_private
        self.privacy = dict(privacy or {})
        self.resumed_from_round = resumed.round if resumed else None
        self.rounds: list[dict[str, Any]] = [dict(row) for row in resumed.rounds] if resumed else []
        self.final: dict[str, Any] | None = None
        self._started = time.perf_counter()
        self._last_mark = self._started

    @property
    def results_path(self) -> Path:
        """Path of ``results.json``."""
        return self.output_dir / "results.json"

    def start_clock(self) -> None:
        """Start timing the first round (after set-up and initial evaluation)."""
        self._last_mark = time.perf_counter()

    def record_round(
        self,
        *,
        server_round: int,
        metrics: Mapping[str, Any],
        state_dict: Mapping[str, torch.Tensor],
        strategy_state: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Record one finished round, rewrite results and write a checkpoint.

        ``strategy_state`` goes into the checkpoint with the model, the rows so
        far and the ledger id, so ``resume=`` can go on after this round.

        Returns
        -------
        dict[str, Any]
            The round's row as written.
        """
        now = time.perf_counter()
        measured = {key: _json_value(value) for key, value in metrics.items()}
        measured.update(round=server_round, seconds=round(now - self._last_mark, 4))
        self._last_mark = now
        published, withheld = split_public(measured, public=self._public(CLIENT_LEVEL_PUBLIC_ROUND))
        row: dict[str, Any] = {**dict.fromkeys(ROUND_FIELDS), **published}
        if withheld:
            append_operator_record(self.output_dir, {"round": server_round, **withheld})
        self.rounds.append(row)
        save_checkpoint(
            self.output_dir / CHECKPOINT_NAME,
            Checkpoint(
                round=server_round,
                state_dict=dict(state_dict),
                rounds=self.rounds,
                strategy_state=dict(strategy_state),
                ledger_id=self.ledger_id,
                config=self.config,
            ),
        )
        self._write()
        return row

    def finish(
        self,
        *,
        stopped_reason: str,
        detail: str,
        final: Mapping[str, Any],
        state_dict: Mapping[str, torch.Tensor],
    ) -> dict[str, Any]:
        """Write the final model, the ``final`` section and the plots.

        Returns
        -------
        dict[str, Any]
            The whole ``results.json`` document.
        """
        if stopped_reason not in STOPPED_REASONS:
            raise ValueError(f"stopped_reason={stopped_reason!r}: must be one of {list(STOPPED_REASONS)}")
        torch.save(dict(state_dict), self.output_dir / self.model_file)
        measured = {
            "rounds_completed": len(self.rounds),
            "stopped_reason": stopped_reason,
            "stopped_detail": detail,
            **{key: _json_value(value) for key, value in final.items()},
        }
        self.final, withheld = split_public(
            measured, public=self._public(CLIENT_LEVEL_PUBLIC_FINAL), always=final.keys()
        )
        if self.client_level_private:
            withheld["total_seconds"] = self._total_seconds()
        if withheld:
            append_operator_record(self.output_dir, {"final": withheld})
        document = self._write()
        from fedpriv.plots import plot_rounds

        plot_rounds(self.rounds, output_dir=self.output_dir)
        return document

    def _public(self, allowed: frozenset[str]) -> frozenset[str] | None:
        return allowed if self.client_level_private else None

    def _total_seconds(self) -> float:
        return round(time.perf_counter() - self._started, 4)

    def _write(self) -> dict[str, Any]:
        document = {
            "schema": SCHEMA,
            "config": self.config,
            "privacy": self.privacy,
            "rounds": self.rounds,
            "final": self.final,
            "timing": {
                # A run's duration depends on which clients trained: under
                # client-level DP it goes to the operator file only.
                "total_seconds": None if self.client_level_private else self._total_seconds(),
                "resumed_from_round": self.resumed_from_round,
            },
        }
        _atomic_write(self.results_path, json.dumps(document, indent=2, allow_nan=False) + "\n")
        columns = list(ROUND_FIELDS) + sorted({k for row in self.rounds for k in row} - set(ROUND_FIELDS))
        csv_path = self.output_dir / "metrics.csv"
        with csv_path.with_suffix(".csv.tmp").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(self.rounds)
        os.replace(csv_path.with_suffix(".csv.tmp"), csv_path)
        return document


def _strict_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(item) for item in value]
    return _json_value(value)


def merge_results_section(results_path: Path, *, section: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``values`` into one top-level section of an existing ``results.json``.

    Keys of ``values`` replace the same keys of the section; every other key
    and section is kept. Used for sections added after a run (``audit``).
    Non-finite floats become ``null`` so the file stays strict JSON.

    Parameters
    ----------
    results_path : Path
        The run's ``results.json``.
    section : str
        Top-level key, e.g. ``"audit"``.
    values : Mapping[str, Any]
        JSON-serialisable values to merge in; left untouched.

    Returns
    -------
    dict[str, Any]
        The whole updated document.
    """
    path = Path(results_path)
    document = json.loads(path.read_text())
    current = document.get(section) or {}
    if not isinstance(current, dict):
        raise ValueError(f"{path}: section {section!r} is {type(current).__name__}, not an object")
    updated = {**document, section: _strict_json({**current, **values})}
    _atomic_write(path, json.dumps(updated, indent=2, allow_nan=False) + "\n")
    return updated


def final_summary(final: Mapping[str, Any]) -> str:
    """One line: rounds, why the run stopped, accuracy and the privacy spent."""
    parts = [
        f"{final.get('rounds_completed')} rounds ({final.get('stopped_reason')})",
        f"test accuracy {final['test_accuracy']:.4f}" if final.get("test_accuracy") is not None else "",
        f"AUC {final['test_auc']:.4f}" if final.get("test_auc") is not None else "",
    ]
    for epsilon, delta in PRIVACY_PAIRS:
        if final.get(epsilon) is not None:
            parts.append(f"{epsilon} {final[epsilon]:.3g} (delta {final[delta]:.3g})")
    if final.get("epsilon_local_basic_max") is not None:
        parts.append(f"epsilon_local_basic_max {final['epsilon_local_basic_max']:.3g} (delta 0)")
    return ", ".join(part for part in parts if part)
