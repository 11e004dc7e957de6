"""Decrypt a ``secure=ckks`` run's final model with the clients' key and write ``model.pt``.

    python scripts/decrypt_model.py RUN_DIR [--key-dir DIR]

The server of such a run holds only ciphertexts: it writes
``RUN_DIR/model-encrypted.pt``. A key holder (a client's operator) turns it
into the plain ``RUN_DIR/model.pt`` with the secret context in ``--key-dir``
(default: the run's ``secure.key_dir``). Exit codes: 0 success, 2 a bad run
folder or key (one line on stderr).
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

import torch  # noqa: E402
from flwr.app import Array, ArrayRecord  # noqa: E402

from clients.he_client import load_global_model  # noqa: E402
from fedpriv.experiment import load_experiment  # noqa: E402
from fedpriv.he.keys import load_secret_context  # noqa: E402
from fedpriv.results import ENCRYPTED_MODEL_FILE, MODEL_FILE  # noqa: E402
from fedpriv.run_config import ConfigError  # noqa: E402

BAD_INPUT = 2


def main(argv: list[str]) -> int:
    """Decrypt the run's model; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished secure=ckks run's folder")
    parser.add_argument("--key-dir", type=Path, help="folder of secret-context.tenseal (default: the run's secure.key_dir)")
    args = parser.parse_args(argv)
    try:
        experiment = load_experiment(json.loads((args.run_dir / "results.json").read_text())["config"])
        if experiment.secure.name != "ckks":
            raise ValueError("not a secure=ckks run: its model.pt is already in the clear")
        context = load_secret_context(args.key_dir or experiment.secure.key_dir)
        encrypted = torch.load(args.run_dir / ENCRYPTED_MODEL_FILE)
        record = ArrayRecord({name: Array(value.numpy()) for name, value in encrypted.items()})
        model = experiment.build_model()
        load_global_model(model, record, context=context)
    except (ConfigError, OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        print(f"decrypt_model error: run_dir={args.run_dir}: {exc}", file=sys.stderr)
        return BAD_INPUT
    torch.save(model.state_dict(), args.run_dir / MODEL_FILE)
    print(f"wrote {args.run_dir / MODEL_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
