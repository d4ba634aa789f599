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
from pathlib import Path

from gradalign import tracking
from gradalign.config import hydra_quoted, register_resolvers
from gradalign.report.build import make_report
from gradalign.report.configs import compose_optimizer, optimizer_overrides
from gradalign.report.settings import StudySettings

log = logging.getLogger(__name__)
TAIL = 40  # lines of a failed sweep's log shown


def sweep_commands(settings: StudySettings, sweep_root: Path) -> dict[str, list[str]]:
    """The train.py command of each optimizer's sweep, writing under ``sweep_root/<optimizer>``."""
    report = settings.report
    return {
        name: [
            sys.executable,
            str(report.root / "train.py"),
            "-m",
            *optimizer_overrides(name, report.overrides),
            f"hydra.sweeper.n_trials={settings.trials}",
            f"hydra.sweep.dir={hydra_quoted(sweep_root / name)}",
        ]
        for name in report.optimizers
    }


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
    """
    report = settings.report
    register_resolvers(report.root)
    cfgs = [  # composed, and so validated, before any sweep starts
        compose_optimizer(report.conf_dir, name, report.overrides).cfg for name in report.optimizers
    ]
    cfg = cfgs[0]
    tracking.connect(cfg.tracking)
    name = report.name or datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    outputs = Path(cfg.paths.outputs)
    sweep_root = outputs / "multirun" / f"study-{name}"
    for taken in (sweep_root, outputs / "report" / name):  # found now, not after the sweeps
        if taken.exists():
            raise ValueError(f"{taken} exists: choose another --name")
    sweep_root.mkdir(parents=True)

    start = time.perf_counter()
    run_sweeps(sweep_commands(settings, sweep_root), sweep_root, report.jobs)
    swept = time.perf_counter()
    log.info("sweeps: %.1f s", swept - start)
    out_dir = make_report(dataclasses.replace(report, name=name))
    log.info(
        "report: %.1f s (study total %.1f s)",
        time.perf_counter() - swept,
        time.perf_counter() - start,
    )
    return out_dir
