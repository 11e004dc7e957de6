"""What a run may publish, and what only its operator may see.

Under client-level DP the published files (``results.json``, ``metrics.csv``,
the plots, the per-round log line, sweep summaries) hold only DP outputs and
public config: neighbouring federations differ in one client's whole data, so
an exact count of replies, a mean training loss or the exact fraction of
clipped updates can reveal whether a client took part, whatever epsilon the
model carries. Everything else the run measured goes to the operator file,
whose name and first line say that no epsilon covers it.

This is an allow-list: a metric that is not named here is withheld, so a new
metric is private until someone argues that it is public.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

OPERATOR_FILE = "operator-only-NOT-PRIVATE.jsonl"
"""Name of the operator file in a run's folder (one JSON object per line)."""

OPERATOR_WARNING = (
    "NOT COVERED BY THE REPORTED EPSILON: exact client statistics for the run's operator "
    "(debugging only). Do not share or publish this file."
)

CLIENT_LEVEL_PUBLIC_ROUND = frozenset(
    {
        "round",
        "test_loss",
        "test_accuracy",
        "test_auc",
        "test_balanced_accuracy",
        "test_cost",
        "epsilon_user",
        "clipping_norm",
        "noise_std",
        "unclipped_fraction_noisy",
        "diverged",
        "server_update_norm",
    }
)
"""Round fields that are DP outputs or public config under client-level DP.

The server's test metrics (loss, accuracy and, for binary tasks, AUC, balanced
accuracy and cost) evaluate the noised model on the server's own data;
the clipping norm of a round is public config or (adaptive clipping) a
function of earlier noised counts; ``unclipped_fraction_noisy`` is the noised
count itself; ``diverged`` says the released (noised) model was not finite;
``server_update_norm`` is the distance between two released global models
(the server optimizer reads only the noised aggregate).
"""

CLIENT_LEVEL_PUBLIC_FINAL = frozenset(
    {
        "rounds_completed",
        "stopped_reason",
        "stopped_detail",
        "test_accuracy",
        "test_loss",
        "test_auc",
        "test_balanced_accuracy",
        "test_cost",
        "epsilon_user",
        "delta_user",
    }
)
"""``final`` fields published under client-level DP.

``epsilon_record_max`` is withheld: which client spent the most record-level
epsilon, and how much, depends on the clients that took part.
"""


def split_public(
    values: Mapping[str, Any], *, public: frozenset[str] | None, always: Iterable[str] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``values`` into what may be published and what is withheld.

    Parameters
    ----------
    values : Mapping[str, Any]
        Everything measured; left untouched.
    public : frozenset of str or None
        The allow-list; ``None`` publishes everything (no client-level DP).
    always : iterable of str
        Keys the published part keeps even when withheld, set to ``None``, so
        that fixed columns stay in place.

    Returns
    -------
    published : dict
        ``values`` restricted to ``public``, plus ``always`` keys as ``None``.
    withheld : dict
        The rest, with their exact values (empty when ``public`` is ``None``).
    """
    if public is None:
        return dict(values), {}
    published = {key: value for key, value in values.items() if key in public}
    withheld = {key: value for key, value in values.items() if key not in public}
    for key in always:
        published.setdefault(key, None)
    return published, withheld


def append_operator_record(output_dir: Path, record: Mapping[str, Any]) -> Path:
    """Append one JSON line to the run's operator file, creating it with its warning.

    Returns
    -------
    Path
        The operator file.
    """
    path = Path(output_dir) / OPERATOR_FILE
    lines = [] if path.exists() else [json.dumps({"warning": OPERATOR_WARNING})]
    lines.append(json.dumps(dict(record), default=float))
    with path.open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    return path
