"""Cost of an Opacus DP-SGD step over a plain SGD step, per grad_sample_mode.

    python scripts/bench_grad_sample.py [--quick] [--out DIR] [--batch-size 64]

For the MLP on digits-shaped inputs (1, 8, 8) and CNN28 on MNIST-shaped inputs
(1, 28, 28), random data, times one training step (forward, backward, optimizer
step) without privacy and with Opacus' ``make_private`` in every grad-sample
mode that ``clients.opacus_training`` supports, on the same fixed batch. Each
timing is the median over repeats of the mean over a block of steps, after
warm-up. Prints the ratios private / plain and writes
``DIR/bench_grad_sample.json``. Runs on one thread by default, as each
simulated client does.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # Running from a checkout without `pip install -e .` still finds the packages.
    sys.path.insert(0, str(REPO))

from clients.opacus_training import GRAD_SAMPLE_MODES  # noqa: E402
from fedpriv.models import CNN28, MLP  # noqa: E402

MODELS = {
    "mlp": (lambda: MLP(input_shape=(1, 8, 8), num_classes=10), (1, 8, 8)),
    "cnn28": (lambda: CNN28(input_shape=(1, 28, 28), num_classes=10), (1, 28, 28)),
}


def _time_interleaved(steps_by_name: dict, *, warmup: int, steps: int, repeats: int) -> dict:
    """Median over ``repeats`` of the mean seconds per call of each step function.

    The candidates take turns within every repeat, so load from other processes
    affects them alike; garbage collection is off while timing, as in ``timeit``.
    """
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    samples = {name: [] for name in steps_by_name}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, step in steps_by_name.items():
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                samples[name].append((time.perf_counter() - start) / steps)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: statistics.median(values) for name, values in samples.items()}


def _plain_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()

    return step


def _private_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, mode: str):
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="prv")
    private = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=len(y)),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
        grad_sample_mode=mode,
        noise_generator=torch.Generator().manual_seed(0),
    )
    if mode == "ghost":
        module, optimizer, criterion, _ = private
    else:
        (module, optimizer, _), criterion = private, nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(module(x), y).backward()
        optimizer.step()

    return step


def run(*, batch_size: int, warmup: int, steps: int, repeats: int) -> list[dict]:
    """Time every model and mode; return one row per (model, mode)."""
    rows = []
    for name, (build, shape) in MODELS.items():
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(batch_size, *shape, generator=generator)
        y = torch.randint(0, 10, (batch_size,), generator=generator)
        candidates, errors = {"plain": _plain_step(build(), x, y)}, {}
        for mode in GRAD_SAMPLE_MODES:
            try:
                step = _private_step(build(), x, y, mode=mode)
                step()
            except (RuntimeError, ValueError, NotImplementedError) as exc:
                errors[mode] = f"{type(exc).__name__}: {exc}"
            else:
                candidates[mode] = step
        timings = _time_interleaved(candidates, warmup=warmup, steps=steps, repeats=repeats)
        plain = timings["plain"]
        for mode in GRAD_SAMPLE_MODES:
            row = {"model": name, "mode": mode, "plain_ms": plain * 1e3}
            if mode in errors:
                row.update(private_ms=None, ratio=None, error=errors[mode])
            else:
                private = timings[mode]
                row.update(private_ms=private * 1e3, ratio=private / plain, error=None)
            rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    lines = [f"{'model':<7} {'mode':<10} {'plain ms':>9} {'private ms':>11} {'ratio':>7}"]
    for row in rows:
        if row["error"]:
            lines.append(f"{row['model']:<7} {row['mode']:<10} failed: {row['error']}")
        else:
            lines.append(
                f"{row['model']:<7} {row['mode']:<10} {row['plain_ms']:>9.3f} "
                f"{row['private_ms']:>11.3f} {row['ratio']:>7.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, run the benchmark, print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("."), help="folder for bench_grad_sample.json"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few seconds instead of about a minute"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    # Opacus warns on every engine without secure_mode and on every backward
    # through a first layer whose input needs no grad; neither matters here.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    timing = (
        {"warmup": 3, "steps": 5, "repeats": 3}
        if args.quick
        else {"warmup": 10, "steps": 20, "repeats": 15}
    )
    rows = run(batch_size=args.batch_size, **timing)
    print(_table(rows))
    result = {
        "batch_size": args.batch_size,
        "threads": args.threads,
        **timing,
        "torch": torch.__version__,
        "opacus": __import__("opacus").__version__,
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_grad_sample.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
