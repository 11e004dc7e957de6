"""Start and stop a local Flower deployment: one SuperLink and N SuperNodes on 127.0.0.1.

    python scripts/federation.py start --dir DIR --num-supernodes N [--tls] [--auth]
    python scripts/federation.py stop --dir DIR
    python scripts/federation.py run --dir DIR --num-supernodes N [--tls] [--auth]   # foreground, Ctrl-C stops

See fedpriv.federation for what each command starts, where the logs, PID files,
certificates and keys go, and how stop finds exactly what start launched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # Running from a checkout without `pip install -e .` still finds the packages.
    sys.path.insert(0, str(REPO))

from fedpriv.federation import (  # noqa: E402
    FederationError,
    describe,
    run_foreground,
    start_federation,
    stop_federation,
)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("start", "start the federation in the background and return"),
        ("run", "start the federation, wait for Ctrl-C, then stop it"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--dir", required=True, type=Path, help="folder for logs, PID files and certificates")
        sub.add_argument("--num-supernodes", type=int, default=2)
        sub.add_argument("--tls", action="store_true", help="serve TLS with a CA created in --dir")
        sub.add_argument("--auth", action="store_true",
                         help="SuperNode authentication: register a key per SuperNode, refuse others")
        sub.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the SuperNodes")
        sub.add_argument("--he-keys", action="store_true",
                         help="make CKKS keys (default secure=ckks settings) and give each SuperNode a copy, for secure=ckks")
    stop = commands.add_parser("stop", help="stop the processes started from --dir")
    stop.add_argument("--dir", required=True, type=Path)
    stop.add_argument("--grace-seconds", type=float, default=10.0)
    args = parser.parse_args(argv)

    if args.command == "stop":
        stopped = stop_federation(args.dir, grace_seconds=args.grace_seconds)
        print(f"stopped {len(stopped)} process(es)" if stopped else "nothing to stop")
        return 0
    try:
        he_keys = None
        if args.he_keys:
            from fedpriv.he import CKKS

            he_keys = CKKS()
        federation = start_federation(
            args.dir, args.num_supernodes, tls=args.tls, auth=args.auth, timeout=args.timeout, he_keys=he_keys
        )
    except (FederationError, ValueError) as exc:
        print(f"federation error: {exc}", file=sys.stderr)
        return 1
    print(describe(federation))
    if args.command == "run":
        print(f"stopped {len(run_foreground(federation))} process(es)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
