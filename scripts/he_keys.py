"""Make the CKKS keys of a ``secure=ckks`` federation: one secret context for the clients, a public one for the server.

    python scripts/he_keys.py --out DIR [secure.poly_modulus_degree=16384 ...]

Writes ``DIR/secret-context.tenseal`` (owner-only: copy it to every SuperNode
and name its folder in the node config, ``he-key-dir=...``) and
``DIR/public-context.tenseal`` (for the server: ``secure.key_dir=DIR``). The
overrides are the run's own ``secure.*`` settings, so the keys match them.
``scripts/run.py`` makes them for a simulation, and ``scripts/federation.py
start --he-keys`` for a local federation. Exit codes: 0 success, 2 a bad
setting or an existing key (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # Running from a checkout without `pip install -e .` still finds the packages.
    sys.path.insert(0, str(REPO))

from fedpriv.compose import compose_config  # noqa: E402
from fedpriv.he.keys import PUBLIC_FILE, SECRET_FILE, make_keys  # noqa: E402
from fedpriv.run_config import ConfigError, build_component  # noqa: E402

BAD_INPUT = 2


def main(argv: list[str]) -> int:
    """Make the keys; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the two key files")
    parser.add_argument("overrides", nargs="*", help="secure.* settings of the run (Hydra overrides)")
    args = parser.parse_args(argv)
    if (args.out / SECRET_FILE).exists() or (args.out / PUBLIC_FILE).exists():
        print(f"he_keys error: --out={args.out}: keys are already there; a new pair would lock out every client", file=sys.stderr)
        return BAD_INPUT
    try:
        secure = build_component(compose_config(["secure=ckks", *args.overrides])["secure"], key="secure")
    except (ConfigError, ValueError) as exc:
        print(f"he_keys error: {exc}", file=sys.stderr)
        return BAD_INPUT
    folder = make_keys(args.out, secure)
    print(f"wrote {folder / SECRET_FILE} (for the clients) and {folder / PUBLIC_FILE} (for the server)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
