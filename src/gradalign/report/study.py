"""The seed study end to end: one Optuna sweep per optimizer through ``train.py -m``, run as
parallel subprocesses, then the report (gradalign.report) in this process.

The sweeps are plain train.py commands, the same a user would type, so the study adds nothing a
single sweep does not already do; each one's output goes to a log file beside its sweep folder.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import TrialState

from gradalign import tracking
from gradalign.config import hydra_quoted, register_resolvers
from gradalign.report.build import make_report
from gradalign.report.configs import compose_optimizer, optimizer_overrides
from gradalign.report.settings import StudySettings

log = logging.getLogger(__name__)
TAIL = 40  # lines of a failed sweep's log shown


STORAGE = "optuna.db"  # the study's Optuna storage, in its sweep folder


def sweep_commands(
    settings: StudySettings, sweep_root: Path, trials: dict[str, int]
) -> dict[str, list[str]]:
    """The train.py command of each optimizer's sweep that has ``trials[optimizer]`` trials
    left to run, writing under ``sweep_root/<optimizer>``, its study stored in
    ``sweep_root/optuna.db`` as ``<folder name>-<optimizer>`` (so a rerun resumes it)."""
    report = settings.report
    storage = f"sqlite:///{sweep_root / STORAGE}"
    return {
        name: [
            sys.executable,
            str(report.root / "train.py"),
            "-m",
            *optimizer_overrides(name, report.overrides),
            f"hydra.sweeper.n_trials={trials[name]}",
            f"hydra.sweep.dir={hydra_quoted(sweep_root / name)}",
            f"hydra.sweeper.storage={hydra_quoted(storage)}",
            f"hydra.sweeper.study_name={study_name(sweep_root, name)}",
        ]
        for name in report.optimizers
        if trials[name] > 0
    }


def study_name(sweep_root: Path, optimizer: str) -> str:
    """The Optuna study of ``optimizer``'s sweep in the study folder ``sweep_root``."""
    return f"{sweep_root.name}-{optimizer}"


def trials_left(sweep_root: Path, optimizers: Sequence[str], trials: int) -> dict[str, int]:
    """How many of its ``trials`` each optimizer's stored study still has to run: all of them
    for a new study, fewer once some completed (a rerun of an interrupted study)."""
    path = sweep_root / STORAGE
    if not path.exists():
        return dict.fromkeys(optimizers, trials)
    storage = f"sqlite:///{path}"
    stored = {summary.study_name for summary in optuna.get_all_study_summaries(storage)}
    left = {}
    for name in optimizers:
        study = study_name(sweep_root, name)
        done = 0
        if study in stored:
            states = (TrialState.COMPLETE,)
            done = len(
                optuna.load_study(study_name=study, storage=storage).get_trials(states=states)
            )
        left[name] = max(0, trials - done)
    return left


def _stop(running: dict[str, subprocess.Popen]) -> None:
    for process in running.values():
        process.terminate()
    for process in running.values():
        process.wait()


def run_sweeps(commands: dict[str, list[str]], logs: Path, jobs: int) -> None:
    """Run ``commands`` (optimizer -> argv), at most ``jobs`` at once, output to logs/<name>.log.

    If one fails, the others are stopped (their MLflow runs end KILLED) and RuntimeError shows
    the tail of its log.
    """
    pending = list(commands)
    running: dict[str, subprocess.Popen] = {}
    handles = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name = pending.pop(0)
                handles[name] = open(logs / f"{name}.log", "w")  # noqa: SIM115 (closed below)
                running[name] = subprocess.Popen(
                    commands[name], stdout=handles[name], stderr=subprocess.STDOUT
                )
                log.info("sweep %s started: %s", name, logs / f"{name}.log")
            time.sleep(0.1)
            for name, process in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                handles[name].close()
                if process.returncode != 0:  # the except below stops the others
                    tail = (logs / f"{name}.log").read_text().splitlines()[-TAIL:]
                    raise RuntimeError(
                        f"sweep of {name} failed (exit {process.returncode}); "
                        f"{logs / f'{name}.log'} ends:\n" + "\n".join(tail)
                    )
                log.info("sweep %s done", name)
    except BaseException:
        _stop(running)
        raise
    finally:
        for handle in handles.values():
            handle.close()


def run_study(settings: StudySettings) -> Path:
    """Sweep every optimizer, then report; the report folder.

    Every configuration is composed and validated first, and the MLflow store and experiment
    are created once here, so parallel sweeps neither fail late on a typo nor race to create them.
    A study is named (``--name``, default: the time); rerunning a named study resumes it: each
    sweep runs only the trials its stored study still lacks, and the report reuses the final
    runs it has (gradalign.report.build).
    """
    report = settings.report
    register_resolvers(report.root)
    cfgs = [  # composed, and so validated, before any sweep starts
        compose_optimizer(report.conf_dir, name, report.overrides).cfg for name in report.optimizers
    ]
    cfg = cfgs[0]
    tracking.connect(cfg.tracking)
    name = report.name or datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    sweep_root = Path(cfg.paths.outputs) / "multirun" / f"study-{name}"
    sweep_root.mkdir(parents=True, exist_ok=True)
    trials = trials_left(sweep_root, report.optimizers, settings.trials)
    if any(left < settings.trials for left in trials.values()):
        log.info("resuming study %s: trials left per sweep %s", name, trials)

    start = time.perf_counter()
    run_sweeps(sweep_commands(settings, sweep_root, trials), sweep_root, report.jobs)
    swept = time.perf_counter()
    log.info("sweeps: %.1f s", swept - start)
    out_dir = make_report(dataclasses.replace(report, name=name))
    log.info(
        "report: %.1f s (study total %.1f s)",
        time.perf_counter() - swept,
        time.perf_counter() - start,
    )
    return out_dir
