"""PNG plots of a run's per-round metrics (accuracy, loss, epsilon, bytes on the wire)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(row["round"], row[key]) for row in rows if row.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _plot(rows, *, keys: dict[str, str], ylabel: str, title: str, path: Path) -> bool:
    lines = {label: _series(rows, key) for key, label in keys.items()}
    if not any(xs for xs, _ in lines.values()):
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in lines.items():
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_rounds(rows: Sequence[dict[str, Any]], *, output_dir: Path) -> list[Path]:
    """Write ``accuracy.png``, ``loss.png``, ``communication.png`` and, when privacy is on, ``epsilon.png``.

    Returns
    -------
    list[Path]
        The files written.
    """
    plots = {
        "accuracy.png": (
            {
                "test_accuracy": "server test accuracy",
                "test_auc": "server test ROC AUC",
                "test_balanced_accuracy": "server test balanced accuracy",
            },
            "accuracy / AUC",
            "Global model accuracy",
        ),
        "loss.png": ({"train_loss": "client train loss", "test_loss": "server test loss"}, "loss", "Loss"),
        "epsilon.png": (
            {
                "epsilon_user": "client-level epsilon",
                "epsilon_record_max": "record-level epsilon (max client)",
                "epsilon_local_max": "local epsilon, PLD (max client)",
                "epsilon_local_basic_max": "local epsilon, basic composition (max client)",
            },
            "epsilon spent",
            "Privacy spent",
        ),
    }
    written = []
    for name, (keys, ylabel, title) in plots.items():
        path = Path(output_dir) / name
        if _plot(rows, keys=keys, ylabel=ylabel, title=title, path=path):
            written.append(path)
    path = Path(output_dir) / "communication.png"
    if _plot(_cumulative_megabytes(rows), keys=TRAFFIC_LINES, ylabel="MB, cumulative", title="Bytes on the wire", path=path):
        written.append(path)
    return written


TRAFFIC_LINES = {"mb_down": "server to clients", "mb_up": "clients to server"}


def _cumulative_megabytes(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of cumulative megabytes down and up, from the rows that have byte counts."""
    cumulative, down, up = [], 0.0, 0.0
    for row in rows:
        if row.get("bytes_down") is None or row.get("bytes_up") is None:
            continue
        down, up = down + row["bytes_down"] / 1e6, up + row["bytes_up"] / 1e6
        cumulative.append({"round": row["round"], "mb_down": down, "mb_up": up})
    return cumulative
