"""Summarise a fedpriv Hydra multirun sweep: one table row per job, two plots.

``python scripts/report.py SWEEP_DIR`` calls :func:`report`. It reads every
job folder of the sweep (``0/``, ``1/``, ...): the job's overrides
(``.hydra/overrides.yaml``) and its ``results.json`` or ``failed.json``. Writes
into SWEEP_DIR:

- ``summary.csv`` and ``summary.md``: job, the swept keys, final metrics, status;
- ``frontier.png``: final test accuracy against epsilon, one line per value of
  the swept keys other than the one that sets epsilon;
- ``accuracy_per_round.png``: test accuracy per round, one line per job.

A sweep still running or partly failed is reported as it stands. A folder
without job results ends with one line on stderr and exit code 1.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

# Statuses of a job whose results.json has its ``final`` section.
FINISHED = ("completed", "privacy_budget_exhausted", "diverged")
BINARY_COLUMNS = ("test_auc", "test_balanced_accuracy", "test_cost")
"""Columns a sweep report adds when any job reports them (two-class tasks; ``test_cost``: German credit)."""
METRIC_COLUMNS = (
    "test_accuracy",
    "epsilon_user",
    "epsilon_record_max",
    "epsilon_local_max",
    "rounds_completed",
    "stopped_reason",
    "seconds",
    "status",
    "error",
)
EPSILON_LABELS = {
    "epsilon_user": "client-level epsilon (epsilon_user)",
    "epsilon_record_max": "record-level epsilon, max over clients (epsilon_record_max)",
    "epsilon_local_max": "local epsilon, max over clients (epsilon_local_max)",
}


class ReportError(Exception):
    """A user error, reported as one line on stderr."""


@dataclass
class Job:
    """One job folder of a sweep.

    Parameters
    ----------
    number : int
        The job number (the folder's name).
    overrides : dict[str, str]
        The job's overrides, key to value as written on the command line.
    status : str
        ``completed``, ``privacy_budget_exhausted``, ``running``, ``failed``,
        ``missing`` (no results yet) or ``unreadable`` (a results file that is
        not valid JSON or not a fedpriv results file).
    results : dict[str, Any] or None
        The ``results.json`` document, if there is a readable one.
    error : str
        The error of a failed or unreadable job, else empty.
    """

    number: int
    overrides: dict[str, str]
    status: str
    results: dict[str, Any] | None = None
    error: str = ""

    @property
    def rounds(self) -> list[dict[str, Any]]:
        """The rounds recorded so far (empty without results)."""
        return self.results["rounds"] if self.results else []

    @property
    def final(self) -> dict[str, Any] | None:
        """The ``final`` section, or None while running, after a failure or without results."""
        return self.results["final"] if self.results else None


@dataclass
class Report:
    """What :func:`report` wrote.

    Parameters
    ----------
    markdown : str
        The summary table in Markdown.
    written : list[Path]
        The files written.
    notes : list[str]
        One line per plot that was not written, with the reason.
    """

    markdown: str
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _parse_overrides(lines: Sequence[str], *, source: Path):
    try:
        return [o for o in OverridesParser.create().parse_overrides(list(lines)) if not o.is_hydra_override()]
    except OverrideParseException as exc:
        raise ReportError(f"{source}: unparsable override: {exc}".splitlines()[0]) from exc


def _read_yaml_list(path: Path) -> list[str]:
    if not path.is_file():
        return []
    try:
        value = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ReportError(f"{path}: not valid YAML: {exc}".splitlines()[0]) from exc
    return [str(line) for line in value or []]


def _read_results(path: Path) -> tuple[dict[str, Any] | None, str]:
    """``(document, "")`` for a readable results.json, else ``(None, reason)``."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"{path.name}: {exc}".splitlines()[0]
    if not isinstance(document, dict) or document.get("schema") != 1:
        return None, f"{path.name}: not a fedpriv schema-1 results file"
    return document, ""


def _failure(path: Path) -> str:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"{path.name}: {exc}".splitlines()[0]
    return str(document.get("error", "")) if isinstance(document, dict) else ""


def load_job(folder: Path) -> Job:
    """Read one job folder.

    Parameters
    ----------
    folder : Path
        A job folder, named by its job number.

    Returns
    -------
    Job
        The job; a ``failed.json`` makes it ``failed`` even next to a partial
        ``results.json``, whose rounds are kept.
    """
    overrides_path = folder / ".hydra" / "overrides.yaml"
    overrides = {
        o.key_or_group: o.get_value_element_as_str() if o.value() is not None else ""
        for o in _parse_overrides(_read_yaml_list(overrides_path), source=overrides_path)
    }
    job = Job(number=int(folder.name), overrides=overrides, status="missing")
    results_path = folder / "results.json"
    if results_path.is_file():
        job.results, job.error = _read_results(results_path)
        if job.results is None:
            job.status = "unreadable"
        else:
            job.status = job.final["stopped_reason"] if job.final else "running"
    if (folder / "failed.json").is_file():
        job.status, job.error = "failed", _failure(folder / "failed.json")
    return job


def load_jobs(sweep_dir: Path) -> list[Job]:
    """Read every job folder (``0/``, ``1/``, ...) of a sweep, by job number.

    Raises
    ------
    ReportError
        If the folder does not exist or holds no job results yet.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.exists():
        raise ReportError(f"{sweep_dir} does not exist")
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir} is not a folder (expected a fedpriv multirun sweep folder)")
    folders = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    jobs = [load_job(folder) for folder in folders]
    if all(job.status == "missing" for job in jobs):
        hint = "; this folder holds a single run's results.json" if (sweep_dir / "results.json").is_file() else ""
        raise ReportError(f"no job results in {sweep_dir} (expected N/results.json from a fedpriv multirun{hint})")
    return jobs


def swept_keys(jobs: Sequence[Job], sweep_dir: Path) -> list[str]:
    """The keys swept over.

    Those whose value differs between jobs, plus the sweeps declared in
    Hydra's ``multirun.yaml`` (so a sweep whose later jobs have not started
    yet still shows its swept columns).

    Returns
    -------
    list[str]
        The keys, in the order they appear in the jobs' overrides.
    """
    multirun = Path(sweep_dir) / "multirun.yaml"
    task: list[str] = []
    if multirun.is_file():
        try:
            config = yaml.safe_load(multirun.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ReportError(f"{multirun}: not valid YAML: {exc}".splitlines()[0]) from exc
        task = ((config.get("hydra") or {}).get("overrides") or {}).get("task") or []
    declared = [o.key_or_group for o in _parse_overrides(task, source=multirun) if o.is_sweep_override()]
    keys = dict.fromkeys([key for job in jobs for key in job.overrides] + declared)
    return [key for key in keys if key in declared or len({job.overrides.get(key, "") for job in jobs}) > 1]


def summary_rows(jobs: Sequence[Job], swept: Sequence[str]) -> list[dict[str, Any]]:
    """One row per job: ``job``, the swept keys, then :data:`METRIC_COLUMNS`.

    Metrics come from ``final``; for a job without it (running, or failed
    after some rounds), from its last round, and ``rounds_completed`` counts
    the rounds recorded so far.
    """
    rows = []
    for job in jobs:
        row: dict[str, Any] = {"job": job.number, **{key: job.overrides.get(key, "") for key in swept}}
        row.update(dict.fromkeys((*METRIC_COLUMNS, *BINARY_COLUMNS)))
        if job.results:
            source = job.final or (job.rounds[-1] if job.rounds else {})
            for key in ("test_accuracy", *BINARY_COLUMNS, *EPSILON_LABELS):
                row[key] = source.get(key)
            row["rounds_completed"] = job.final["rounds_completed"] if job.final else len(job.rounds)
            row["stopped_reason"] = job.final["stopped_reason"] if job.final else None
            row["seconds"] = job.results["timing"]["total_seconds"]
        row["status"], row["error"] = job.status, job.error
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return " ".join(str(value).split()).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (floats to 4 significant digits, None empty)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[column]) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(rows: Sequence[dict[str, Any]], *, columns: Sequence[str], sweep_dir: Path) -> list[Path]:
    """Write ``summary.csv`` (None as empty) and ``summary.md`` into ``sweep_dir``.

    Returns
    -------
    list[Path]
        The two files.
    """
    csv_path, md_path = Path(sweep_dir) / "summary.csv", Path(sweep_dir) / "summary.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({key: "" if row[key] is None else row[key] for key in columns} for row in rows)
    md_path.write_text(markdown_table(rows, columns))
    return [csv_path, md_path]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each key's last dotted part, unless two keys share it."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: short if last.count(short) == 1 else key for key, short in zip(keys, last)}


def _label(job: Job, keys: Sequence[str]) -> str:
    names = _short_names(keys)
    return ", ".join(f"{names[key]}={job.overrides.get(key, '')}" for key in keys)


def epsilon_metric(jobs: Sequence[Job]) -> str | None:
    """The epsilon to plot: ``epsilon_user`` if any finished job has a finite one.

    Else ``epsilon_record_max``, then ``epsilon_local_max``, if any has that;
    else None (no private job).
    """
    for metric in EPSILON_LABELS:
        if any(job.final and _finite(job.final.get(metric)) for job in jobs):
            return metric
    return None


def epsilon_key(jobs: Sequence[Job], *, swept: Sequence[str], metric: str) -> str | None:
    """The swept key that most changes epsilon.

    For each key, sums the spread of ``metric`` over jobs that agree on every
    other swept key. The key with the unique largest positive sum wins; if
    there is none, the first swept key (None if nothing is swept).
    """
    scores = {}
    for key in swept:
        groups: dict[tuple[str, ...], list[float]] = {}
        for job in jobs:
            if job.final and _finite(job.final.get(metric)):
                others = tuple(job.overrides.get(other, "") for other in swept if other != key)
                groups.setdefault(others, []).append(job.final[metric])
        scores[key] = sum(max(values) - min(values) for values in groups.values())
    best = max(scores.values(), default=0.0)
    winners = [key for key, score in scores.items() if score == best]
    if best > 0 and len(winners) == 1:
        return winners[0]
    return swept[0] if swept else None


def _save(fig, ax, path: Path) -> None:
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_frontier(jobs: Sequence[Job], *, swept: Sequence[str], path: Path) -> bool:
    """Final test accuracy against epsilon, written to ``path``.

    Epsilon is :func:`epsilon_metric`. One line per value of the swept keys
    other than :func:`epsilon_key`, points sorted by epsilon and labelled with
    that key's value. A job with neither epsilon (non-private) is a dashed
    horizontal line in its group's colour. Jobs without a ``final`` section
    (running, failed) are left out, and so is a job with only the other epsilon.

    Returns
    -------
    bool
        False (nothing written) if no finished job has an epsilon.
    """
    metric = epsilon_metric(jobs)
    if metric is None:
        return False
    varied = epsilon_key(jobs, swept=swept, metric=metric)
    group_keys = [key for key in swept if key != varied]
    finished = [job for job in jobs if job.final and _finite(job.final.get("test_accuracy"))]
    groups: dict[str, list[Job]] = {}
    for job in finished:
        groups.setdefault(_label(job, group_keys), []).append(job)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    epsilons = []
    for index, (label, members) in enumerate(groups.items()):
        color = colors[index % len(colors)]
        small = {"fontsize": 7, "color": color}
        private = sorted((job for job in members if _finite(job.final.get(metric))), key=lambda j: j.final[metric])
        if private:
            xs = [job.final[metric] for job in private]
            ys = [job.final["test_accuracy"] for job in private]
            epsilons += xs
            line_label = label or (f"varying {varied}" if varied else "all jobs")
            ax.plot(xs, ys, marker="o", color=color, label=line_label)
            if varied:
                name = varied.rsplit(".", 1)[-1]
                for job, x, y in zip(private, xs, ys):
                    text = f"{name}={job.overrides.get(varied, '')}"
                    ax.annotate(text, (x, y), textcoords="offset points", xytext=(0, 6), ha="center", **small)
        non_private = [job for job in members if all(job.final.get(key) is None for key in EPSILON_LABELS)]
        for number, job in enumerate(non_private):
            line_label = ("non-private" + (f" ({label})" if label else "")) if number == 0 else None
            ax.axhline(job.final["test_accuracy"], linestyle="--", color=color, label=line_label)
    ax.margins(x=0.12, y=0.1)
    if epsilons and min(epsilons) > 0 and max(epsilons) / min(epsilons) > 10:
        ax.set_xscale("log")
    ax.set_xlabel(EPSILON_LABELS[metric])
    ax.set_ylabel("final test accuracy")
    ax.set_title("Accuracy against privacy spent")
    _save(fig, ax, path)
    return True


def plot_accuracy_per_round(jobs: Sequence[Job], *, swept: Sequence[str], path: Path) -> bool:
    """Test accuracy per round, one line per job labelled with its swept values.

    Jobs not finished (running, failed) are dashed and their status is in the label.

    Returns
    -------
    bool
        False (nothing written) if no job has a round with a test accuracy.
    """
    series = []
    for job in jobs:
        points = [(row["round"], row["test_accuracy"]) for row in job.rounds if _finite(row.get("test_accuracy"))]
        if points:
            series.append((job, points))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for job, points in series:
        label = f"job {job.number}" + (f": {_label(job, swept)}" if swept else "")
        finished = job.status in FINISHED
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o",
            markersize=3,
            linestyle="-" if finished else "--",
            label=label if finished else f"{label} ({job.status})",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy per round")
    _save(fig, ax, path)
    return True


def report(sweep_dir: Path) -> Report:
    """Write the summary table and the plots of a sweep into ``sweep_dir``.

    Parameters
    ----------
    sweep_dir : Path
        A Hydra multirun sweep folder of fedpriv jobs.

    Returns
    -------
    Report
        The Markdown table, the files written and why any plot was not.

    Raises
    ------
    ReportError
        If the folder is missing, holds no job results or cannot be written.
    """
    sweep_dir = Path(sweep_dir)
    jobs = load_jobs(sweep_dir)
    swept = swept_keys(jobs, sweep_dir)
    rows = summary_rows(jobs, swept)
    binary = [key for key in BINARY_COLUMNS if any(row.get(key) is not None for row in rows)]
    columns = ["job", *swept, METRIC_COLUMNS[0], *binary, *METRIC_COLUMNS[1:]]
    result = Report(markdown=markdown_table(rows, columns))
    plots = {
        "frontier.png": (plot_frontier, "no finished job has an epsilon"),
        "accuracy_per_round.png": (plot_accuracy_per_round, "no job has a round with a test accuracy"),
    }
    try:
        result.written += write_summary(rows, columns=columns, sweep_dir=sweep_dir)
        for name, (plot, reason) in plots.items():
            if plot(jobs, swept=swept, path=sweep_dir / name):
                result.written.append(sweep_dir / name)
            else:
                result.notes.append(f"{name} not written: {reason}")
    except OSError as exc:
        raise ReportError(f"cannot write into {sweep_dir}: {exc}") from exc
    return result
