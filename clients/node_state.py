"""A client's node state on disk, so its privacy ledger outlives the run.

Opacus training keeps its accountant history in ``context.state``, which
Flower keeps for one run only. A resumed run is a new Flower run, so each
client also writes its state to a file after every round it trains in and
reads it back when its ``context.state`` is empty. The file belongs to the
client: with a node config ``ledger-dir`` (the SuperNode's own disk) it lives
there; otherwise, as in a simulation, under the run's output folder.

The file is written before the reply leaves, so a crash between the two makes
a resumed run count that round's epsilon although its update was never
aggregated: epsilon is over-counted, never forgotten.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from fedpriv.run_config import Scalar
from fedpriv.secagg.messages import RECORD as SECAGG_RECORD

NODE_LEDGER_DIR_KEY = "ledger-dir"
RUN_LEDGER_SUBDIR = "client-state"
ROUND_ONLY_RECORDS = frozenset({SECAGG_RECORD})
"""State that lasts one round (secure aggregation's secret keys): never on disk."""


def node_state_path(
    *, node_config: Mapping[str, Scalar], run_config: Mapping[str, Scalar], ledger_id: str, partition_id: int
) -> Path | None:
    """Where this client keeps its state for the run lineage ``ledger_id``.

    Returns
    -------
    Path or None
        ``<ledger-dir>/<ledger_id>/partition-<id>.json`` with the node config's
        ``ledger-dir``, else under ``<output-dir>/client-state/``; ``None``
        without a ledger id or a folder (the state then lasts one run).
    """
    folder = node_config.get(NODE_LEDGER_DIR_KEY)
    if not folder and run_config.get("output-dir"):
        folder = Path(str(run_config["output-dir"])) / RUN_LEDGER_SUBDIR
    if not folder or not ledger_id:
        return None
    return Path(str(folder)) / ledger_id / f"partition-{partition_id}.json"


def restore_node_state(state: RecordDict, path: Path) -> bool:
    """Fill an empty ``state`` from ``path``; return whether anything was read.

    A ``state`` that already holds records (a later round of the same run)
    is left as it is: it is at least as recent as the file.

    Raises
    ------
    ValueError
        If the file exists but is not a node state written by :func:`save_node_state`.
    """
    if set(state.config_records) - ROUND_ONLY_RECORDS or not path.is_file():
        return False
    try:
        records = json.loads(path.read_text())["config_records"]
        for name, values in records.items():
            state[name] = ConfigRecord(values)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"node state {path} is damaged: {exc}") from exc
    return True


def save_node_state(state: RecordDict, path: Path) -> None:
    """Write the ``ConfigRecord``\\ s of ``state`` to ``path`` atomically (nothing when there are none).

    Records in :data:`ROUND_ONLY_RECORDS` are left out.
    """
    records = {name: dict(record) for name, record in state.config_records.items() if name not in ROUND_ONLY_RECORDS}
    if not records:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"config_records": records}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document))
    os.replace(tmp, path)
