"""A Hydra multirun through the Flower runtime, then scripts/report.py on it."""

from __future__ import annotations

import csv

import matplotlib.image

from conftest import run_project_script


def test_two_by_two_sweep_with_failing_jobs_ends_in_a_report(tmp_path):
    # Prepare: a 2 x 2 sweep in which num_clients=5000 is an impossible partition
    # (digits has 1,438 training examples): two jobs fail, two run.
    sweep = tmp_path / "sweep"
    overrides = [
        "-m", "strategy=dp_fixed", "strategy.noise_multiplier=0.5,2.0", "num_clients=3,5000",
        "num_rounds=1", "client.local_epochs=1", f"hydra.sweep.dir={sweep}",
    ]

    # Execute
    sweep_run = run_project_script("run.py", *overrides, cwd=tmp_path, timeout=600)
    report_run = run_project_script("report.py", str(sweep), cwd=tmp_path, timeout=120)

    # Assert: the sweep went on past the failures, and says so in its exit code
    assert sweep_run.returncode == 3, sweep_run.stderr[-2000:]
    assert "2 sweep job(s) failed" in sweep_run.stderr
    assert "sweep job 4 of 4" in sweep_run.stdout + sweep_run.stderr
    assert report_run.returncode == 0, report_run.stderr
    with (sweep / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    swept = {(row["strategy.noise_multiplier"], row["num_clients"]): row for row in rows}
    assert set(swept) == {("0.5", "3"), ("2.0", "3"), ("0.5", "5000"), ("2.0", "5000")}
    for noise in ("0.5", "2.0"):
        ok, failed = swept[(noise, "3")], swept[(noise, "5000")]
        assert ok["status"] == "completed"
        assert ok["rounds_completed"] == "1"
        assert float(ok["epsilon_user"]) > 0
        assert 0 <= float(ok["test_accuracy"]) <= 1
        assert failed["status"] == "failed"
        assert "more clients than training examples" in failed["error"]
    assert float(swept[("0.5", "3")]["epsilon_user"]) > float(swept[("2.0", "3")]["epsilon_user"])
    assert (sweep / "summary.md").read_text().count("\n|") >= 5
    for name in ("frontier.png", "accuracy_per_round.png"):
        assert matplotlib.image.imread(sweep / name).ndim == 3
