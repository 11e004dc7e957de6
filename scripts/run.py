"""Run one fedpriv experiment (or a Hydra multirun sweep of them).

    python scripts/run.py [group=option ...] [key=value ...]

Composes ``conf/config.yaml`` with the overrides, validates every group,
flattens the config into Flower's run config and runs it in the chosen mode.
A bad config ends with one line naming the key and value, and exit code 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys

# Flower reads this when first imported; a private run reports nothing home.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # Running from a checkout without `pip install -e .` still finds the packages.
    sys.path.insert(0, str(REPO))

from fedpriv.experiment import prepare_run  # noqa: E402
from fedpriv.logs import LOG_FILE, log_to_file, quiet_console  # noqa: E402
from fedpriv.results import final_summary  # noqa: E402
from fedpriv.run_config import ConfigError  # noqa: E402

CONFIG_ERROR = 2
# Not 1: Hydra's own exit code 1 means the config failed to compose.
RUN_FAILED = 3

logger = logging.getLogger("fedpriv.run")


def prepare(cfg: DictConfig, *, output_dir: str):
    """Resolve the composed config and validate it (:func:`fedpriv.experiment.prepare_run`).

    Raises
    ------
    ConfigError
        Naming the first invalid key and value.
    """
    try:
        nested = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as exc:  # OmegaConf raises several unrelated types for bad interpolations
        raise ConfigError(f"config could not be resolved: {exc}".splitlines()[0]) from exc
    return prepare_run(nested, default_output_dir=output_dir)


def _first_of_each_sweep(args: list[str], *, multirun: bool) -> list[str]:
    """The overrides of the first job: every sweep replaced by its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    first = []
    for override in OverridesParser.create().parse_overrides(args):
        if override.is_hydra_override():
            continue
        if override.is_sweep_override():
            if not multirun:
                raise ConfigError(f"{override.input_line}: a sweep needs --multirun (-m)")
            try:
                value = next(iter(override.sweep_string_iterator()))
            except HydraException:
                continue  # glob() sweeps need Hydra's config loader; Hydra checks them itself
        else:
            value = override.get_value_element_as_str()
        first.append(f"{override.get_key_element()}={value}")
    return first


def _one_line(exc: Exception) -> str:
    message = str(exc).strip()
    if isinstance(exc, MissingConfigException) and "Could not find" in message:
        # Hydra lists the options over several lines; keep them on one.
        listing = message.split("Config search path")[0].splitlines()[1:]
        options = [line.strip() for line in listing if line.startswith("\t")]
        return f"{message.splitlines()[0]} (available: {', '.join(options)})" if options else message.splitlines()[0]
    return " ".join(line.strip() for line in message.splitlines()[:3] if line.strip())


def check_overrides(args: list[str]) -> None:
    """Compose and validate the first job's config before Hydra starts.

    Hydra reports a bad override over many lines with exit code 1; this turns
    it, and any invalid value, into one line naming the key.

    Raises
    ------
    ConfigError
        For an unknown group option or key, a malformed override or a bad value.
    """
    from fedpriv.compose import compose_config

    # Flags such as `--cfg job` are Hydra's; overrides are the `key=value` words.
    overrides = [arg for arg in args if "=" in arg and not arg.startswith("-")]
    multirun = "-m" in args or "--multirun" in args
    resumed = [arg for arg in overrides if arg.startswith("resume=") and arg != "resume="]
    if multirun and resumed:
        raise ConfigError(f"{resumed[0]}: a sweep cannot resume (every job would write into that one folder)")
    try:
        config = compose_config(_first_of_each_sweep(overrides, multirun=multirun))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_one_line(exc)) from exc
    prepare(OmegaConf.create(config), output_dir="unused")


def _sweep_size(args: list[str]) -> int:
    """Number of jobs the command line's sweeps expand to (1 without sweeps)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    size = 1
    overrides = [arg for arg in args if "=" in arg and not arg.startswith("-")]
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override() and not override.is_hydra_override():
            try:
                size *= len(list(override.sweep_string_iterator()))
            except HydraException:
                return 0  # glob() sweeps: Hydra knows, we do not
    return size


FAILED_JOBS: list[str] = []


def _fail(message: str, *, output_dir: Path, code: int, multirun: bool) -> None:
    """End a single run with ``code``; in a sweep, record the failure and go on."""
    if not multirun:
        if code == CONFIG_ERROR:
            print(f"config error: {message}", file=sys.stderr)
        sys.exit(code)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "failed.json").write_text(json.dumps({"status": "failed", "error": message}) + "\n")
    FAILED_JOBS.append(str(output_dir))
    logger.error("job failed (%s); the sweep goes on", message)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: validate, run, summarise (each job of a sweep alike)."""
    # Hydra configures the root logger; flwr has its own handler.
    logging.getLogger("flwr").propagate = False
    hydra_config = HydraConfig.get()
    multirun = hydra_config.mode == RunMode.MULTIRUN
    job_dir = Path(hydra_config.runtime.output_dir)
    if multirun:
        total = _sweep_size(sys.argv[1:])
        logger.info(
            "sweep job %d of %s: %s",
            hydra_config.job.num + 1,
            total or "?",
            " ".join(hydra_config.overrides.task),
        )
    try:
        experiment, mode, run_config = prepare(cfg, output_dir=str(job_dir))
    except ConfigError as exc:
        _fail(str(exc), output_dir=job_dir, code=CONFIG_ERROR, multirun=multirun)
        return
    output_dir = Path(experiment.settings.output_dir)
    logger.info(
        "running %d rounds with %d clients; results in %s",
        experiment.settings.num_rounds,
        experiment.settings.num_clients,
        output_dir,
    )
    quiet_console(verbose=experiment.settings.verbose)
    log_file = log_to_file(output_dir / LOG_FILE)
    try:
        mode.run(run_config=run_config, num_supernodes=experiment.settings.num_clients)
    except Exception as exc:
        logger.exception("the run failed; completed rounds are in %s", output_dir)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        _fail(f"run failed: {reason}", output_dir=output_dir, code=RUN_FAILED, multirun=multirun)
        return
    finally:
        logging.getLogger("flwr").removeHandler(log_file)
        log_file.close()
    if not getattr(mode, "results_local", True):
        logger.info("finished: results are on the SuperLink host under %s", output_dir)
        return
    results_path = output_dir / "results.json"
    if not results_path.exists():
        _fail(f"the run wrote no results.json in {output_dir}", output_dir=output_dir, code=RUN_FAILED, multirun=multirun)
        return
    final = json.loads(results_path.read_text())["final"] or {}
    logger.info("finished: %s", final_summary(final))


def _exit_code_of(code: object) -> object:
    # Hydra ends a failed composition (unknown group option, bad override) with
    # exit code 1 after printing its own message; that is a config error too.
    return CONFIG_ERROR if code == 1 else code


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(CONFIG_ERROR)
    try:
        main()
    except SystemExit as exc:
        sys.exit(_exit_code_of(exc.code))
    if FAILED_JOBS:
        print(f"{len(FAILED_JOBS)} sweep job(s) failed: {', '.join(FAILED_JOBS)}", file=sys.stderr)
        sys.exit(RUN_FAILED)
