"""The reference points of a finished run: the same model pooled and on each client alone, beside the run.

    python scripts/reference.py RUN_DIR

Rebuilds the run's experiment from ``RUN_DIR/results.json``, trains its model
without privacy on the pooled training data (the upper reference) and on each
client's data alone (the lower one) for ``num_rounds * client.local_epochs``
epochs, scores them on the server's test split, and prints them as a Markdown
table under the run's own final row. Writes ``RUN_DIR/reference.json``. Exit
codes: 0 success, 2 a bad run folder (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # Running from a checkout without `pip install -e .` still finds the packages.
    sys.path.insert(0, str(REPO))

from fedpriv.experiment import load_experiment  # noqa: E402
from fedpriv.reference import reference_points  # noqa: E402
from fedpriv.report import markdown_table  # noqa: E402
from fedpriv.run_config import ConfigError  # noqa: E402

BAD_INPUT = 2
COLUMNS = ("reference", "examples", "test_accuracy", "test_auc", "test_balanced_accuracy", "test_cost")


def main(argv: list[str]) -> int:
    """Train the references of the run in ``argv`` and print them; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's folder (results.json)")
    args = parser.parse_args(argv)
    try:
        document = json.loads((args.run_dir / "results.json").read_text())
        experiment = load_experiment(document["config"])
        final = document["final"] or {}
    except (ConfigError, OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        print(f"reference error: run_dir={args.run_dir}: {exc}", file=sys.stderr)
        return BAD_INPUT
    rows = [{"reference": "this federated run", "examples": None, **final}, *reference_points(experiment)]
    columns = [column for column in COLUMNS if any(row.get(column) is not None for row in rows)]
    print(markdown_table([{column: row.get(column) for column in columns} for row in rows], columns))
    (args.run_dir / "reference.json").write_text(json.dumps(rows[1:], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
