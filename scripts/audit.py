"""Membership inference on a finished fedpriv run; adds ``audit.membership`` to its results.

    python scripts/audit.py RUN_DIR [--shadow-models 4] [--shadow-epochs E] [--shadow-lr LR] [--seed 0]

Rebuilds the run's experiment from ``RUN_DIR/results.json``, loads the global
model from ``RUN_DIR/model.pt`` and attacks it with the loss-threshold attack
and offline LiRA (shadow models trained here, centrally). Members are the
clients' training examples, non-members the server's held-out test split.
The ``audit.membership`` section of ``results.json`` gets the AUC and the TPR
at 1% and 0.1% FPR of both; every other section is kept. Exit codes: 0
success, 2 a bad argument or run folder (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # Running from a checkout without `pip install -e .` still finds the packages.
    sys.path.insert(0, str(REPO))

from fedpriv.audit.inference import membership_inference  # noqa: E402
from fedpriv.experiment import load_experiment  # noqa: E402
from fedpriv.results import merge_results_section  # noqa: E402
from fedpriv.run_config import ConfigError  # noqa: E402

BAD_INPUT = 2
logger = logging.getLogger("fedpriv.audit")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's folder (results.json, model.pt)")
    parser.add_argument("--shadow-models", type=_positive_int, default=4, help="even, >= 2 (default 4)")
    parser.add_argument(
        "--shadow-epochs", type=_positive_int, default=None, help="default: num_rounds * client.local_epochs"
    )
    parser.add_argument("--shadow-lr", type=float, default=None, help="default: client.lr")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Attack the run in ``argv``'s folder and record the result; return the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = _parse(argv)
    results_path, model_path = args.run_dir / "results.json", args.run_dir / "model.pt"
    try:
        if not results_path.is_file() or not model_path.is_file():
            raise ConfigError(f"run_dir={args.run_dir}: needs results.json and model.pt (a finished run)")
        if args.shadow_models < 2 or args.shadow_models % 2:
            raise ConfigError(f"--shadow-models={args.shadow_models}: must be even and >= 2")
        config = json.loads(results_path.read_text())["config"]
        experiment = load_experiment(config)
        epochs = args.shadow_epochs or experiment.settings.num_rounds * experiment.client.local_epochs
        lr = experiment.client.lr if args.shadow_lr is None else args.shadow_lr
        if not lr > 0:
            raise ConfigError(f"--shadow-lr={lr}: must be > 0")
        state_dict = torch.load(model_path)
    except (ConfigError, OSError, KeyError, json.JSONDecodeError) as exc:
        print(f"audit error: {exc}", file=sys.stderr)
        return BAD_INPUT
    logger.info(
        "membership inference on %s: %d shadow models, %d epochs each, lr %g",
        args.run_dir, args.shadow_models, epochs, lr,
    )
    membership = membership_inference(
        experiment, state_dict, num_shadows=args.shadow_models, shadow_epochs=epochs, shadow_lr=lr, seed=args.seed
    )
    merge_results_section(results_path, section="audit", values={"membership": membership})
    for name in ("loss_threshold", "lira"):
        attack = membership[name]
        logger.info(
            "%s: AUC %.4f, TPR %.4f at 1%% FPR, %.4f at 0.1%% FPR (%d members, %d non-members)",
            attack["method"], attack["auc"], attack["tpr_at_1pct_fpr"], attack["tpr_at_0.1pct_fpr"],
            attack["num_members"], attack["num_nonmembers"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
