"""Summarise a fedpriv Hydra multirun sweep: a table, a privacy-utility frontier, accuracy per round.

    python scripts/report.py SWEEP_DIR

Writes summary.csv, summary.md, frontier.png and accuracy_per_round.png into
SWEEP_DIR (see fedpriv.report). A folder without job results ends with one line
on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # Running from a checkout without `pip install -e .` still finds the packages.
    sys.path.insert(0, str(REPO))

from fedpriv.report import ReportError, report  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code (1 for a user error)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR", help="a Hydra multirun sweep folder")
    args = parser.parse_args(argv)
    try:
        result = report(args.sweep_dir)
    except ReportError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 1
    print("\n".join([result.markdown, *result.notes, *(f"wrote {path}" for path in result.written)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
