"""scripts/report.py on sweep folders built by hand (no Flower runtime)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image
import pytest

from conftest import run_project_script

from fedpriv import report
from scripts.report import main as report_main

NOISE, ALPHA = "strategy.noise_multiplier", "partition.alpha"
# epsilon_user reached after 3 rounds, by noise multiplier
EPSILON = {"0.5": 15.5, "1.0": 6.6}


def results_document(accuracies, *, epsilons=None, finished=True, stopped_reason="completed"):
    """A schema-1 results.json document with one round per accuracy."""
    epsilons = epsilons or [None] * len(accuracies)
    rounds = [
        {"round": n, "seconds": 0.5, "test_loss": 1.0 - acc, "test_accuracy": acc, "epsilon_user": eps,
         "epsilon_record_max": None}
        for n, (acc, eps) in enumerate(zip(accuracies, epsilons), start=1)
    ]
    final = None
    if finished:
        final = {"rounds_completed": len(rounds), "stopped_reason": stopped_reason, "stopped_detail": "",
                 "test_accuracy": accuracies[-1], "test_loss": 1.0 - accuracies[-1], "epsilon_user": epsilons[-1],
                 "epsilon_record_max": None}
    return {"schema": 1, "config": {}, "rounds": rounds, "final": final, "timing": {"total_seconds": 12.5}}


def make_job(sweep: Path, number: int, overrides: list[str], *, results=None, failed=None) -> Path:
    """Job folder ``sweep/number`` as Hydra and fedpriv write it."""
    folder = sweep / str(number)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {line}\n" for line in overrides))
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    if failed is not None:
        (folder / "failed.json").write_text(json.dumps({"status": "failed", "error": failed}))
    return folder


def make_multirun_yaml(sweep: Path, task: list[str]) -> None:
    lines = "".join(f"    - {line}\n" for line in task)
    (sweep / "multirun.yaml").write_text(f"hydra:\n  overrides:\n    hydra: []\n    task:\n{lines}")


def make_2x2_sweep(sweep: Path) -> dict[int, float]:
    """noise 0.5,1.0 x alpha 0.1,1.0 as Hydra numbers the jobs; returns final accuracy by job."""
    sweep.mkdir()
    make_multirun_yaml(sweep, ["num_rounds=3", "strategy=dp_fixed", f"{NOISE}=0.5,1.0", "partition=dirichlet",
                               f"{ALPHA}=0.1,1.0"])
    accuracy = {}
    for number, (noise, alpha) in enumerate([("0.5", "0.1"), ("0.5", "1.0"), ("1.0", "0.1"), ("1.0", "1.0")]):
        accuracy[number] = 0.5 + 0.1 * number
        eps = EPSILON[noise]
        document = results_document([0.3, 0.4, accuracy[number]], epsilons=[eps / 3, eps / 2, eps])
        make_job(sweep, number, ["num_rounds=3", "strategy=dp_fixed", f"{NOISE}={noise}", "partition=dirichlet",
                                 f"{ALPHA}={alpha}"], results=document)
    return accuracy


def read_rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "summary.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert matplotlib.image.imread(path).ndim == 3


def test_2x2_sweep_writes_table_and_plots(tmp_path, capsys):
    # Prepare
    sweep = tmp_path / "sweep"
    accuracy = make_2x2_sweep(sweep)

    # Execute
    code = report_main([str(sweep)])

    # Assert: one CSV row per job, in job order, with its swept values and final metrics
    assert code == 0
    rows = read_rows(sweep)
    assert list(rows[0]) == ["job", NOISE, ALPHA, *report.METRIC_COLUMNS]
    assert [(r["job"], r[NOISE], r[ALPHA]) for r in rows] == [
        ("0", "0.5", "0.1"), ("1", "0.5", "1.0"), ("2", "1.0", "0.1"), ("3", "1.0", "1.0"),
    ]
    for row in rows:
        job = int(row["job"])
        assert float(row["test_accuracy"]) == pytest.approx(accuracy[job])
        assert float(row["epsilon_user"]) == pytest.approx(EPSILON[row[NOISE]])
        assert row["epsilon_record_max"] == ""
        assert (row["rounds_completed"], row["stopped_reason"], row["status"]) == ("3", "completed", "completed")
        assert float(row["seconds"]) == pytest.approx(12.5)
        assert row["error"] == ""
    # the Markdown table: header, separator, 4 rows; printed too, with the paths written
    table = (sweep / "summary.md").read_text().splitlines()
    assert table[0].startswith("| job | strategy.noise_multiplier | partition.alpha | test_accuracy |")
    assert table[1].startswith("|---|")
    assert len(table) == 6 and table[2].startswith("| 0 | 0.5 | 0.1 | 0.5 | 15.5 |")
    printed = capsys.readouterr().out
    assert "\n".join(table) in printed
    for name in ("summary.csv", "summary.md", "frontier.png", "accuracy_per_round.png"):
        assert f"wrote {sweep / name}" in printed
    assert_png(sweep / "frontier.png")
    assert_png(sweep / "accuracy_per_round.png")


def test_frontier_groups_by_the_keys_that_do_not_set_epsilon(tmp_path):
    # Prepare: the noise multiplier (which sets epsilon) is not the first swept key
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for number, (alpha, noise) in enumerate([("0.1", "0.5"), ("0.1", "1.0"), ("1.0", "0.5"), ("1.0", "1.0")]):
        eps = EPSILON[noise]
        make_job(sweep, number, [f"{ALPHA}={alpha}", f"{NOISE}={noise}"],
                 results=results_document([0.5], epsilons=[eps]))
    jobs = report.load_jobs(sweep)

    # Execute
    swept = report.swept_keys(jobs, sweep)
    varied = report.epsilon_key(jobs, swept=swept, metric="epsilon_user")
    no_epsilon_change = report.epsilon_key(jobs[:1] + jobs[2:3], swept=swept, metric="epsilon_user")

    # Assert
    assert swept == [ALPHA, NOISE]
    assert varied == NOISE
    assert no_epsilon_change == ALPHA  # ambiguous: group by all keys but the first


def test_partly_failed_and_running_sweep(tmp_path, capsys):
    # Prepare: 0 completed, 1 failed, 2 running, 3 stopped by the budget, 4 failed after a round, 5 not started
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    make_multirun_yaml(sweep, ["client.lr=0.01,0.02,0.03,0.04,0.05,0.06"])
    make_job(sweep, 0, ["client.lr=0.01"], results=results_document([0.4, 0.6]))
    make_job(sweep, 1, ["client.lr=0.02"], failed="RuntimeError: CUDA out of memory | retry")
    make_job(sweep, 2, ["client.lr=0.03"], results=results_document([0.3, 0.45], finished=False))
    make_job(sweep, 3, ["client.lr=0.04"], results=results_document(
        [0.5], epsilons=[2.0], stopped_reason="privacy_budget_exhausted"))
    make_job(sweep, 4, ["client.lr=0.05"], results=results_document([0.2], finished=False), failed="boom")
    make_job(sweep, 5, ["client.lr=0.06"])
    (sweep / "notes").mkdir()  # not a job folder

    # Execute
    code = report_main([str(sweep)])

    # Assert
    assert code == 0
    rows = {row["job"]: row for row in read_rows(sweep)}
    assert list(rows) == ["0", "1", "2", "3", "4", "5"]
    assert [rows[job]["status"] for job in rows] == [
        "completed", "failed", "running", "privacy_budget_exhausted", "failed", "missing",
    ]
    assert (rows["0"]["test_accuracy"], rows["0"]["rounds_completed"]) == ("0.6", "2")
    assert rows["1"]["error"] == "RuntimeError: CUDA out of memory | retry"
    assert rows["1"]["test_accuracy"] == rows["1"]["seconds"] == ""
    assert (rows["2"]["test_accuracy"], rows["2"]["rounds_completed"], rows["2"]["stopped_reason"]) == ("0.45", "2", "")
    assert (rows["3"]["epsilon_user"], rows["3"]["stopped_reason"]) == ("2.0", "privacy_budget_exhausted")
    assert (rows["4"]["error"], rows["4"]["test_accuracy"]) == ("boom", "0.2")
    assert rows["5"]["test_accuracy"] == rows["5"]["error"] == ""
    assert "CUDA out of memory \\| retry" in (sweep / "summary.md").read_text()  # the pipe does not split the cell
    assert_png(sweep / "frontier.png")
    assert_png(sweep / "accuracy_per_round.png")


def test_unreadable_results_is_reported_not_raised(tmp_path):
    # Prepare
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    make_job(sweep, 0, ["client.lr=0.01"], results=results_document([0.4]))
    (make_job(sweep, 1, ["client.lr=0.02"]) / "results.json").write_text("{not json")

    # Execute
    result = report.report(sweep)

    # Assert
    row = read_rows(sweep)[1]
    assert row["status"] == "unreadable" and row["error"].startswith("results.json: ")
    assert sweep / "summary.csv" in result.written


def test_swept_keys_come_from_multirun_yaml_while_later_jobs_have_not_started(tmp_path):
    # Prepare: only job 0 exists, so no value differs between jobs yet
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    make_multirun_yaml(sweep, ["num_rounds=3", f"{NOISE}=0.5,1.0", "hydra.sweep.dir=x"])
    make_job(sweep, 0, ["num_rounds=3", f"{NOISE}=0.5"], results=results_document([0.4], finished=False))

    # Execute
    report.report(sweep)

    # Assert
    rows = read_rows(sweep)
    assert list(rows[0])[:2] == ["job", NOISE] and rows[0][NOISE] == "0.5"
    assert "num_rounds" not in rows[0]


def test_non_private_jobs_are_a_reference_line_in_the_frontier(tmp_path):
    # Prepare: strategy=fedavg,dp_fixed x alpha; the fedavg jobs have no epsilon
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for number, (strategy, alpha) in enumerate([("fedavg", "0.1"), ("fedavg", "1.0"), ("dp_fixed", "0.1"),
                                               ("dp_fixed", "1.0")]):
        epsilons = [3.0] if strategy == "dp_fixed" else None
        make_job(sweep, number, [f"strategy={strategy}", f"{ALPHA}={alpha}"],
                 results=results_document([0.9 - 0.1 * number], epsilons=epsilons))

    # Execute
    result = report.report(sweep)

    # Assert
    assert sweep / "frontier.png" in result.written and result.notes == []
    assert_png(sweep / "frontier.png")
    assert [row["epsilon_user"] for row in read_rows(sweep)] == ["", "", "3.0", "3.0"]


def test_sweep_without_any_private_job_skips_the_frontier(tmp_path):
    # Prepare
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for number, lr in enumerate(["0.01", "0.1"]):
        make_job(sweep, number, [f"client.lr={lr}"], results=results_document([0.5, 0.7]))

    # Execute
    result = report.report(sweep)

    # Assert
    assert not (sweep / "frontier.png").exists()
    assert result.notes == ["frontier.png not written: no finished job has an epsilon"]
    assert_png(sweep / "accuracy_per_round.png")


@pytest.mark.parametrize("layout", ["missing", "empty"])
def test_missing_or_empty_folder_is_one_line_and_exit_1(tmp_path, layout):
    # Prepare
    sweep = tmp_path / "sweep"
    if layout == "empty":
        sweep.mkdir()

    # Execute
    result = run_project_script("report.py", str(sweep), cwd=tmp_path, timeout=120)

    # Assert
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"report: {sweep} does not exist" if layout == "missing"
        else f"report: no job results in {sweep} (expected N/results.json from a fedpriv multirun)"
    ]


@pytest.mark.parametrize("layout", ["jobs_without_results", "single_run"])
def test_folder_without_job_results_is_one_line_and_exit_1(tmp_path, capsys, layout):
    # Prepare
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    if layout == "jobs_without_results":
        make_job(sweep, 0, ["client.lr=0.1"])
    else:
        (sweep / "results.json").write_text(json.dumps(results_document([0.5])))

    # Execute
    code = report_main([str(sweep)])

    # Assert
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"report: no job results in {sweep}")
    assert ("single run" in lines[0]) == (layout == "single_run")
    assert not (sweep / "summary.csv").exists()


def test_a_local_dp_sweep_is_reported_by_its_local_epsilon(tmp_path):
    # Prepare: two local-DP jobs, no other epsilon
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    make_multirun_yaml(sweep, ["client=local_dp", "client.epsilon_per_round=1.0,3.0"])
    for number, (epsilon, accuracy) in enumerate([(1.0, 0.6), (3.0, 0.8)]):
        document = results_document([accuracy])
        document["final"]["epsilon_local_max"] = 10 * epsilon
        make_job(sweep, number, ["client=local_dp", f"client.epsilon_per_round={epsilon}"], results=document)

    # Execute
    jobs = report.load_jobs(sweep)
    rows = report.summary_rows(jobs, ["client.epsilon_per_round"])

    # Assert
    assert report.epsilon_metric(jobs) == "epsilon_local_max"
    assert "test_auc" not in report.report(sweep).markdown  # no job reports one
    assert [row["epsilon_local_max"] for row in rows] == [10.0, 30.0]
    assert report.plot_frontier(jobs, swept=["client.epsilon_per_round"], path=tmp_path / "frontier.png")
    assert_png(tmp_path / "frontier.png")


def test_a_binary_task_sweep_adds_the_auc_columns_it_has(tmp_path):
    # Prepare
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    make_multirun_yaml(sweep, ["dataset=heart_disease", "num_rounds=1,2"])
    for number in range(2):
        document = results_document([0.7 + 0.1 * number])
        document["final"]["test_auc"] = (0.8, 0.85)[number]
        make_job(sweep, number, ["dataset=heart_disease", f"num_rounds={number + 1}"], results=document)

    # Execute
    markdown = report.report(sweep).markdown

    # Assert
    header = markdown.splitlines()[0]
    assert "| test_accuracy | test_auc | epsilon_user |" in header and "test_cost" not in header
    assert [row["test_auc"] for row in read_rows(sweep)] == ["0.8", "0.85"]
