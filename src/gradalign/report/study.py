"""A study end to end: the Optuna sweeps its comparisons need, each a ``train.py -m`` run as a
parallel subprocess, then a report per comparison in this process, and, for a study of several
comparisons, a summary across them (gradalign.report.audit: claim by claim; gradalign.report.suite:
across workloads).

The sweeps are plain train.py commands, the same a user would type, so the study adds nothing a
single sweep does not already do; each one's output goes to a log file. Every sweep keeps its
Optuna study in ``<outputs>/studies/optuna.db`` under a name that says which study needed it
and what it sweeps (``default-quick.gao-1a2b3c4d5e``: the preset, quick or not, the part; the
optimizer and a digest of the training overrides and the sampler's seed), so a rerun, or another
comparison that needs the same sweep, resumes or reuses it instead of sweeping again (``named``
finds it under the name it has); the reports reuse the final runs already tracked. A study is
thereby fixed by its configuration: rerunning it only redoes what is missing.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import optuna
from optuna.storages import BaseStorage

from gradalign import tracking
from gradalign.budget import budget
from gradalign.checks import UserError
from gradalign.config import hydra_quoted, register_resolvers
from gradalign.optuna_storage import opened
from gradalign.report.audit import write_audit
from gradalign.report.build import MARKDOWN, write_report
from gradalign.report.configs import compose_optimizer, sweep_command
from gradalign.report.settings import Part, ReportSettings, StudySettings
from gradalign.report.suite import write_suite
from gradalign.report.sweep_progress import SweepProgress

log = logging.getLogger(__name__)
TAIL = 40  # lines of a failed sweep's log shown
PROGRESS_S = 2.0  # how often the sweeps' progress is read from their studies
STUDIES = "studies"  # under paths.outputs: the Optuna storage and the sweeps' logs and folders
STORAGE = "optuna.db"  # in STUDIES: every sweep's study
# The page a study of several parts ends with (StudySettings.summary): each writes every part's
# report, then its own page, and returns the page.
SUMMARIES = {"audit": write_audit, "suite": write_suite}


@dataclasses.dataclass(frozen=True)
class StudySweep:
    """One optimizer's sweep with given training overrides, sampler seed, trial pruner and
    parallel preset (which decides how many trials the sampler draws before it sees results),
    and the name of its study once known (``named``; not part of what the sweep is)."""

    optimizer: str
    overrides: tuple[str, ...]
    seed: int
    pruner: str = "none"
    parallel: str = "serial"
    name: str | None = dataclasses.field(default=None, compare=False)

    @property
    def key(self) -> str:
        """What names the sweep's study for good: the optimizer and a digest of what else
        defines it (the pruner and the parallel preset only when they are not the defaults, so
        the studies stored before either existed keep their names)."""
        pruned = [] if self.pruner == "none" else [self.pruner]
        batched = [] if self.parallel == "serial" else [f"parallel={self.parallel}"]
        identity = json.dumps([self.overrides, self.seed, *pruned, *batched])
        return f"{self.optimizer}-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"

    @property
    def study_name(self) -> str:
        """The Optuna study of the sweep: its ``name``, else its key (the name of the studies
        stored before names said which study they are part of)."""
        return self.name or self.key

    @property
    def sweep_id(self) -> str:
        """The MLflow tag its trials carry (gradalign.sweep.runs.sweep_id of a stored study)."""
        return f"optuna:{self.study_name}"

    def command(self, root: Path, trials: int, folder: Path) -> list[str]:
        """The train.py command of the sweep with a budget of ``trials`` (it runs those its
        study misses), its study stored in ``folder``/optuna.db and its outputs in a folder of
        its own there."""
        storage = f"sqlite:///{folder / STORAGE}"
        return sweep_command(
            self.optimizer,
            self.overrides,
            f"hydra.sweeper.n_trials={trials}",
            f"hydra.sweeper.seed={self.seed}",
            f"hydra.sweep.dir={hydra_quoted(folder / self.study_name)}",
            f"hydra.sweeper.storage={hydra_quoted(storage)}",
            f"hydra.sweeper.study_name={self.study_name}",
            *([] if self.pruner == "none" else [f"hydra/sweeper/pruner={self.pruner}"]),
            *([] if self.parallel == "serial" else [f"parallel={self.parallel}"]),
            program=(sys.executable, str(root / "train.py")),
        )


def study_label(settings: StudySettings, part: Part) -> str:
    """What a person tells a study's sweeps apart by, in optuna-dashboard's list: the preset,
    ``quick`` for --quick, the part of a study of several (``seed_note_audit-quick-c1``)."""
    words = [settings.preset, *(["quick"] if settings.quick else [])]
    words += [part.name] if len(settings.parts) > 1 else []
    return re.sub(r"[^A-Za-z0-9_-]", "_", "-".join(words))


def named(storage: BaseStorage, labels: Mapping[StudySweep, str]) -> dict[StudySweep, StudySweep]:
    """Each sweep of ``labels`` (sweep -> its study_label) with the name of its study: the one
    it is stored under (its key, for a study stored before labels; ``<label>.<key>`` with the
    label of the study that first needed it: another study's sweep is reused), else
    ``<label>.<key>``, e.g. ``default-quick.gao-1a2b3c4d5e``."""
    stored = {study.study_name for study in storage.get_all_studies()}
    result = {}
    for sweep, label in labels.items():
        mine = f"{label}.{sweep.key}"
        labelled = sorted(
            name
            for name in stored
            if name.endswith(f".{sweep.key}") and "." not in name[: -len(sweep.key) - 1]
        )
        chosen = next((n for n in (sweep.key, mine, *labelled) if n in stored), mine)
        result[sweep] = dataclasses.replace(sweep, name=chosen)
    return result


def part_settings(settings: StudySettings, part: Part, name: str) -> ReportSettings:
    """The report of one part of the study named ``name``: the study's report settings narrowed
    to the part. A study of several parts names each part's report ``<name>-<part>`` and
    rewrites it from the tracked runs on every run of the study."""
    report = settings.report
    optimizers = part.optimizers or report.optimizers
    several = len(settings.parts) > 1
    return dataclasses.replace(
        report,
        optimizers=optimizers,
        baseline=report.baseline if report.baseline in optimizers else optimizers[0],
        seeds=part.seeds or report.seeds,
        overrides=(*report.overrides, *part.overrides),
        optimizer_overrides=dict(part.optimizer_overrides),
        name=f"{name}-{part.name}" if several else name,
        overwrite=several,
    )


def sweep_of(
    report: ReportSettings,
    optimizer: str,
    part: Part,
    pruner: str = "none",
    parallel: str = "serial",
) -> StudySweep:
    """The sweep that tunes ``optimizer`` for the part whose report is ``report``."""
    return StudySweep(optimizer, report.overrides_of(optimizer), part.sweep_seed, pruner, parallel)


def trials_left(
    storage: BaseStorage, sweeps: Sequence[StudySweep], trials: int
) -> dict[StudySweep, int]:
    """How many of its budget of ``trials`` each sweep's stored study still misses: all of
    them for a new study, fewer once some are done (gradalign.budget, as the sweep loop counts
    them); a sweep with none missing is not started. A trial left RUNNING (by a killed sweep)
    is not done: the sweep, started, completes it from MLflow and counts again."""
    stored = {study.study_name for study in storage.get_all_studies()}
    left = {}
    for sweep in sweeps:
        left[sweep] = trials
        if sweep.study_name in stored:
            study = optuna.load_study(study_name=sweep.study_name, storage=storage)
            left[sweep] = max(0, trials - budget(study, trials).done)
    return left


def sweep_commands(
    root: Path, folder: Path, storage: BaseStorage, sweeps: Sequence[StudySweep], trials: int
) -> dict[str, list[str]]:
    """The commands of the ``sweeps`` whose study in ``storage`` (``folder``/optuna.db) misses
    some of its budget of ``trials``, by study name: each with that budget, of which the sweep
    loop runs the trials missing (a study never grows past its budget by being rerun)."""
    left = trials_left(storage, sweeps, trials)
    return {
        sweep.study_name: sweep.command(root, trials, folder)
        for sweep, missing in left.items()
        if missing > 0
    }


def run_sweeps(
    commands: dict[str, list[str]],
    logs: Path,
    jobs: int,
    progress: SweepProgress | None = None,
) -> None:
    """Run ``commands`` (name -> argv), at most ``jobs`` at once, output to logs/<name>.log,
    shown on ``progress`` (the sweeps by their study names) every PROGRESS_S while they run.

    If one fails, the others are stopped (their MLflow runs end KILLED) and a UserError shows
    the tail of its log (the sweep's own traceback is there).
    """
    pending = list(commands)
    running: dict[str, subprocess.Popen] = {}
    handles = {}
    shown = time.monotonic()
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
            if progress is not None and time.monotonic() - shown >= PROGRESS_S:
                progress.update(tuple(handles))
                shown = time.monotonic()
            for name, process in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                handles[name].close()
                if process.returncode != 0:  # the except below stops the others
                    tail = (logs / f"{name}.log").read_text().splitlines()[-TAIL:]
                    raise UserError(
                        f"sweep {name} failed (exit {process.returncode}); "
                        f"{logs / f'{name}.log'} ends:\n" + "\n".join(tail)
                    )
                log.info("sweep %s done", name)
    except BaseException:
        for process in running.values():
            process.terminate()
        for process in running.values():
            process.wait()
        raise
    finally:
        for handle in handles.values():
            handle.close()


def run_study(settings: StudySettings) -> Path:
    """Run the sweeps the study's parts need (only what is missing), then report each part,
    then summarise them; the study's page (report.md, or for several parts the summary's page:
    audit.md or suite.md).

    Every configuration is composed and validated first, and the MLflow store and experiment
    are created once here, so parallel sweeps neither fail late on a typo nor race to create them.
    """
    report = settings.report
    register_resolvers(report.root)
    name = report.name or datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    parts, sweeps, labels = {}, {}, {}
    for part in settings.parts:
        parts[part.name] = part_report = part_settings(settings, part, name)
        for optimizer in part_report.optimizers:
            overrides = part_report.overrides_of(optimizer)
            composed = compose_optimizer(report.conf_dir, optimizer, overrides)  # validated now
            sweep = sweep_of(part_report, optimizer, part, settings.pruner, settings.parallel)
            sweeps[sweep] = composed.cfg
            labels.setdefault(sweep, study_label(settings, part))
    first = next(iter(sweeps.values()))
    tracking.connect(first.tracking)
    folder = Path(first.paths.outputs) / STUDIES
    folder.mkdir(parents=True, exist_ok=True)
    # made here, before any sweep starts, as the sweeps make it: whole, one process at a time
    url = f"sqlite:///{folder / STORAGE}"
    with opened(url, first.tracking.store_wait_s) as storage:
        studies = named(storage, labels)
        for part in settings.parts:
            part_report = parts[part.name]
            own = tuple(
                studies[sweep_of(part_report, o, part, settings.pruner, settings.parallel)].sweep_id
                for o in part_report.optimizers
            )  # each part's report takes its best runs from the study's own sweeps
            parts[part.name] = dataclasses.replace(part_report, sweeps=own)
        commands = sweep_commands(
            report.root, folder, storage, list(studies.values()), settings.trials
        )
        stored = len(studies) - len(commands)
        log.info("study %s: %d sweep(s), %d stored already", name, len(studies), stored)
        start = time.perf_counter()
        budgets = dict.fromkeys(commands, settings.trials)
        with SweepProgress(storage, budgets) as progress:
            run_sweeps(commands, folder, report.jobs, progress)
    swept = time.perf_counter()
    log.info("sweeps: %.1f s", swept - start)
    if len(parts) == 1:
        page = write_report(next(iter(parts.values()))).out_dir / MARKDOWN
    else:
        page = SUMMARIES[settings.summary](settings, name, parts)
    log.info(
        "reports: %.1f s (study %.1f s)", time.perf_counter() - swept, time.perf_counter() - start
    )
    return page
