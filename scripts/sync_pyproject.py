"""Regenerate the Flower app section of ``pyproject.toml`` from ``conf/``.

    python scripts/sync_pyproject.py          # rewrite the section
    python scripts/sync_pyproject.py --check  # exit 1 if it is stale

Everything from the marker line to the end of ``pyproject.toml`` is generated:
the components and the flattened default Hydra config, so ``flwr run .`` runs
the same experiment as ``python scripts/run.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tomli_w

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedpriv.compose import compose_config  # noqa: E402
from fedpriv.run_config import flatten  # noqa: E402
from fedpriv.simulation import CLIENT_APP, SERVER_APP  # noqa: E402

MARKER = "# Flower app. The run config below is the flattened default Hydra config"


def flower_section() -> str:
    """The generated TOML text, marker comment included."""
    nested: dict = {}
    for dotted, value in flatten(compose_config()).items():
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    app = {
        "publisher": "fedpriv",
        "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
        "config": nested,
    }
    body = tomli_w.dumps({"tool": {"flwr": {"app": app}}})
    return f"{MARKER}\n# (conf/config.yaml); regenerate with: python scripts/sync_pyproject.py\n{body}"


def main() -> int:
    """Rewrite or check the generated section; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, exit 1 if stale")
    args = parser.parse_args()
    path = REPO / "pyproject.toml"
    text = path.read_text()
    head = text.split(MARKER)[0].rstrip() + "\n\n"
    updated = head + flower_section()
    if args.check:
        if updated != text:
            print("pyproject.toml is stale: run python scripts/sync_pyproject.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
