"""gradalign's Optuna sweep: hydra-optuna-sweeper 1.3.0's, plus what scaling out needs.

The stock sweeper (``OptunaSweeperImpl``, pinned) asks ``n_jobs`` trials, launches them as one
batch through the configured launcher, tells Optuna their results, and repeats. This subclass
keeps that loop and adds:

- checks before the first trial is asked: the job config validates and its data set, model and
  optimizer build, every searched key exists in it and the ends of its range build too, and the
  MLflow store answers (a typo fails once, in a second, instead of once per trial);
- a failure budget over the whole sweep: it stops once more than
  ``max_failure_rate * n_trials`` trials have raised. The stock rule applies the rate to each
  batch, which with ``n_jobs=1`` means any failure stops the sweep, or none does;
- each trial's number passed to its job (override ``tracking.optuna_trial``, tagged on the MLflow
  run), and the job's outcome written on the trial before it is told: user attrs
  ``mlflow_run_id``, ``diverged``, ``failure_reason``;
- on Ctrl-C or SIGTERM: the launcher's child processes get SIGTERM (submitit's local jobs end
  their runs KILLED) and its SLURM jobs are cancelled, the trials in flight are told FAIL
  (failure_reason ``interrupted``), and their MLflow runs left RUNNING (joblib kills its workers
  before they can end them; what they flushed stays) and the sweep's parent run end KILLED. A
  batch whose SLURM jobs were stopped (``scancel``, a time limit) stops the sweep the same way
  (gradalign.sweep.slurm);
- a sweep directory of its own: if ``hydra.sweep.dir`` is claimed by another sweep process (two
  started in the same second), the first free ``<dir>-<n>``;
- trial pruning (``hydra/sweeper/pruner``, gradalign.sweep.pruning): the study gets the pruner,
  each job where to report its epochs (a journal file in the sweep directory when the user gave
  no storage), and a trial whose job stopped pruned is told PRUNED (user attr ``pruned_epoch``),
  never counted as a failure; the sweep's parent run gets the study's trial counts by state.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import socket
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from mlflow.entities import RunStatus
from omegaconf import DictConfig, OmegaConf, read_write
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.pruners import NopPruner
from optuna.samplers import GridSampler
from optuna.study import Study
from optuna.trial import Trial, TrialState

from gradalign import credentials, databases, processes, tracking
from gradalign.checks import is_number
from gradalign.components import build_dataset, build_model, build_optimizer
from gradalign.config import anchored_uri, hydra_quoted, validate
from gradalign.data import Splits
from gradalign.sweep import slurm, summary
from gradalign.sweep.pruning import JOURNAL, build_pruner, journal_storage, prunes
from gradalign.sweep.runs import open_parent, sweep_id
from gradalign.sweep.stock import (
    OptunaSweeperImpl,
    current_distributions,
    legacy_distributions_quiet,
    params_from_overrides,
)
from gradalign.sweep.studies import check_storage, claim_study, open_storage, study_identity

log = logging.getLogger(__name__)
CLAIM = ".sweep_claim"  # created atomically in the sweep directory by the sweep that owns it
STOP_CHILDREN_S = 30.0  # how long an interrupted sweep waits for its workers to end their runs
EXIT_INTERRUPTED = 130  # as a single run's (train.py)
_MISSING = object()


class SweepEnded(Exception):
    """A sweep that ends without a result: printed as its one line (no traceback, no hint to
    set HYDRA_FULL_ERROR), and the process exits with ``status``."""

    status = 1


class SweepNotStarted(SweepEnded):
    """Refused before its first trial: an invalid setting, an unusable store."""

    status = 2


class SweepStopped(SweepEnded):
    """More trials raised than the failure budget allows; the message says how many and why."""


class SweepFailed(SweepEnded):
    """The sweep ran but found no usable configuration (every trial diverged)."""


class SweepCancelled(SweepEnded):
    """SLURM stopped jobs of the running batch (scancel, a time limit, a node failure)."""


def claim_sweep_dir(requested: Path) -> Path:
    """``requested``, or ``<requested>-<n>`` with the smallest free n: the first directory whose
    claim file this process creates (atomically, so two processes never share one)."""
    for n in range(1000):
        candidate = requested if n == 0 else requested.with_name(f"{requested.name}-{n}")
        candidate.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(candidate / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as claim:
            claim.write(f"{socket.gethostname()} {os.getpid()}\n")
        return candidate
    raise RuntimeError(f"no free sweep directory next to {requested}")


def _range_ends(distribution: BaseDistribution) -> list[Any]:
    """The values a distribution can produce at its extremes (both ends of a range, which
    current Optuna includes; all choices of a categorical)."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def _own_key(key: str, cfg: DictConfig) -> bool:
    """False for appended (+) or deleted (~) keys, Hydra's settings and config group choices
    (``model=cnn``, ``experiment=seed_note``: composed, not set), which need no check."""
    group = Path(cfg.paths.root) / "conf" / key.replace(".", "/")
    return not key.startswith(("+", "~", "hydra.")) and not group.is_dir()


def check_trial_config(cfg: DictConfig, splits: Splits) -> None:
    """Raise ValueError (a ConfigError) unless a trial of ``cfg`` can start: its config
    validates and its model and optimizer accept their arguments (built on ``splits``' shape)."""
    validate(cfg)
    build_optimizer(cfg, build_model(cfg, splits).parameters())


def check_search_space(
    cfg: DictConfig,
    distributions: dict[str, BaseDistribution],
    fixed: Iterable[str],
    splits: Splits,
) -> None:
    """Raise ValueError if a searched (or ``fixed``) key is not in ``cfg``, or if a value at the
    end of a searched range cannot run (``check_trial_config``; a data set key rebuilds the
    data set), naming the key, the range and what is allowed."""
    for key in [k for k in (*distributions, *fixed) if _own_key(k, cfg)]:
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            parent = key.rpartition(".")[0]  # the deepest node of the key that exists
            while parent and not isinstance(OmegaConf.select(cfg, parent), DictConfig):
                parent = parent.rpartition(".")[0]
            node = OmegaConf.select(cfg, parent) if parent else cfg
            known = sorted(k for k in node if k != "hydra")
            where = f"{parent!r} has" if parent else "top-level keys are"
            raise ValueError(
                f"search space key {key!r} (hydra.sweeper.params or a sweep override) is not in "
                f"the config: {where} {known}"
            )
    for key, distribution in distributions.items():
        if not _own_key(key, cfg) or isinstance(OmegaConf.select(cfg, key), DictConfig):
            continue  # a config group choice (model=mlp,cnn) composes its own values
        for value in _range_ends(distribution):
            trial_cfg = copy.deepcopy(cfg)
            OmegaConf.update(trial_cfg, key, value, force_add=False)
            try:
                trial_splits = build_dataset(trial_cfg) if key.startswith("dataset.") else splits
                check_trial_config(trial_cfg, trial_splits)
            except ValueError as error:
                raise ValueError(
                    f"search space of {key} ({distribution}) reaches {value!r}: {error}"
                ) from None


class _RecordingLauncher:
    """The configured launcher, with each batch's outcomes passed to the sweeper before the
    stock loop tells Optuna."""

    def __init__(self, launcher: Any, sweeper: SafeOptunaSweeperImpl):
        self.launcher = launcher
        self.sweeper = sweeper

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        try:
            returns = self.launcher.launch(job_overrides, initial_job_idx)
        except Exception as error:
            stopped = slurm.stopped_batch(error)
            if stopped is None:
                raise
            raise stopped from error
        self.sweeper.record(returns)
        return returns


def _outcome(job: JobReturn) -> tuple[bool, dict[str, Any]]:
    """(whether the stock loop will tell the job's trial FAIL, user attrs for the trial: its
    MLflow run, whether and why it failed, the epoch its pruner stopped it at)."""
    if job.status == JobStatus.FAILED:
        error = job._return_value  # the exception; job.return_value would raise it
        return True, {"failure_reason": tracking.failure_reason(error)}
    value = job.return_value
    try:
        objective = float(value)
    except (TypeError, ValueError):
        return True, {"failure_reason": f"return value {value!r} is not a number"}
    attrs: dict[str, Any] = {}
    if getattr(value, "run_id", None):
        attrs["mlflow_run_id"] = value.run_id
    if getattr(value, "pruned_epoch", None) is not None:
        attrs["pruned_epoch"] = value.pruned_epoch
    if not math.isfinite(objective):
        attrs["diverged"] = True
        attrs["failure_reason"] = getattr(value, "failure_reason", None) or "non-finite objective"
    return False, attrs


class SafeOptunaSweeperImpl(OptunaSweeperImpl):
    """OptunaSweeperImpl with the checks, failure budget, trial records, interruption handling,
    sweep-directory claim and pruning described in the module docstring. Same arguments, plus
    ``pruner`` (a ``hydra.sweeper.pruner`` config; None: no pruning); its ``max_failure_rate``
    is the fraction of ``n_trials`` that may raise before the sweep stops."""

    def __init__(self, *, max_failure_rate: float, pruner: Any = None, **kwargs: Any) -> None:
        super().__init__(max_failure_rate=1.0, **kwargs)  # the stock per-batch rule: never
        self.budget_rate = max_failure_rate
        self.failures = 0
        self.in_flight: list[Trial] = []
        self.parent_run_id: str | None = None
        self.owner = ""
        self.pruner_config = pruner
        self.pruner = NopPruner()
        self.job_storage: str | None = None  # where a pruned sweep's jobs find their study
        self.pruned: set[int] = set()  # numbers of the trials whose jobs stopped pruned
        self.study: Study | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        credentials.mask_logs()  # the stock sweeper logs its storage URL
        self.owner = processes.adopt()  # workers die with this process, this one with its own
        requested = Path(config.hydra.sweep.dir)
        claimed = claim_sweep_dir(requested)
        if claimed != requested:
            log.warning("sweep directory %s is another sweep's: writing to %s", requested, claimed)
            with read_write(config.hydra):  # jobs recompose hydra.* from hydra.overrides.hydra
                config.hydra.sweep.dir = str(claimed)
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir={hydra_quoted(claimed)}")
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        if isinstance(self.storage, str):
            self.storage = anchored_uri(self.storage, config.paths.root)
        self.launcher = _RecordingLauncher(self.launcher, self)

    def _check(self, arguments: list[str]) -> None:
        if not (is_number(self.budget_rate) and 0.0 <= self.budget_rate <= 1.0):
            raise ValueError(
                f"invalid config value hydra.sweeper.max_failure_rate={self.budget_rate!r}: "
                "must be a number in [0, 1]"
            )
        self.pruner = build_pruner(self.pruner_config)
        if prunes(self.pruner) and len(self._get_directions()) > 1:
            raise ValueError(
                f"hydra.sweeper.direction={self._get_directions()}: Optuna prunes only "
                "single-objective studies; use hydra/sweeper/pruner=none"
            )
        validate(self.config)
        splits = build_dataset(self.config)
        check_trial_config(self.config, splits)
        overrides = [*self._parse_sweeper_params_config(), *arguments]
        distributions, fixed = params_from_overrides(overrides)
        check_search_space(self.config, distributions, fixed, splits)
        if isinstance(self.sampler, functools.partial) and self.sampler.func is GridSampler:
            for key, distribution in distributions.items():
                if not isinstance(distribution, CategoricalDistribution) and not distribution.step:
                    raise ValueError(
                        f"hydra/sweeper/sampler=grid needs a discrete search space, but {key} "
                        f"is {distribution}: give it choice(...) or range(...)"
                    )
        if isinstance(self.storage, str):
            check_storage(self.storage)
            databases.check_separate(self.storage, tracking.tracking_uri(self.config.tracking))
            storage = open_storage(self.storage, self.config.tracking.store_wait_s)  # its schema
        tracking.connect(self.config.tracking)  # reachable; the experiment created once, here
        if isinstance(self.storage, str) and self.study_name is not None:
            identity = study_identity(self.config, distributions, fixed)
            claim_study(storage, self.study_name, self._get_directions(), identity)
        if prunes(self.pruner):
            self._provide_storage()

    def _provide_storage(self) -> None:
        """Give a pruned sweep's jobs a storage to reach their trials through: the user's, or a
        new journal file in this sweep's own directory (the study lives there, not in memory)."""
        if self.storage is None:
            journal = Path(self.config.hydra.sweep.dir) / JOURNAL
            self.storage = journal_storage(str(journal))
            self.job_storage = str(journal)
            log.info("pruning: the study is kept in %s", journal)
        else:
            self.job_storage = self.storage

    def sweep(self, arguments: list[str]) -> None:
        try:
            self._sweep(arguments)
        except SweepEnded as ended:
            print(credentials.mask(str(ended)), file=sys.stderr)
            raise SystemExit(ended.status) from None
        except (KeyboardInterrupt, tracking.Terminated):
            print(summary.interrupted_line(self.storage, self.study_name), file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None

    def _sweep(self, arguments: list[str]) -> None:
        try:
            self._check(arguments)
            self.parent_run_id = open_parent(self.config)
        except (ValueError, tracking.TrackingUnavailable) as error:
            raise SweepNotStarted(f"sweep not started, no trial run: {error}") from error
        summary.announce(self.config, self.parent_run_id, self.n_trials)
        with tracking.sigterm_raises():
            try:
                with legacy_distributions_quiet():  # the stock loop builds Optuna 2-era ones
                    super().sweep(arguments)
                self._check_some_trial_converged()
            except slurm.JobsStopped as error:
                reason = f"stopped by SLURM: {error}"
                self._interrupted(reason)
                self._close_parent(RunStatus.KILLED, reason)
                raise SweepCancelled(
                    f"sweep stopped: {error}. Its trials in flight are FAIL, their runs KILLED; "
                    "run the same command to resume a stored study"
                ) from None
            except (KeyboardInterrupt, tracking.Terminated) as error:
                reason = tracking.interruption_reason(error)
                self._interrupted(reason)
                self._close_parent(RunStatus.KILLED, reason)
                raise
            except BaseException as error:
                self._close_parent(RunStatus.FAILED, tracking.failure_reason(error))
                raise
        self._close_parent(RunStatus.FINISHED)

    def _close_parent(self, status: int, reason: str | None = None) -> None:
        """Write the study's summary on the sweep's parent run and end it (if no other sweep
        process still works in it), then print the sweep's last line; a store failure is logged,
        not raised, so that the sweep's own outcome is what the user sees."""
        storage = self.storage if isinstance(self.storage, str) else None
        summary.finish(self.config, self.parent_run_id, self.study, status, reason, storage)

    def _check_some_trial_converged(self) -> None:
        """Raise SweepFailed when no trial of the study has a finite objective: every one of
        them diverged, and the sweep found nothing."""
        trials = self.study.get_trials(deepcopy=False) if self.study else []
        values = [t.value for t in trials if t.state != TrialState.PRUNED]
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if values and not finite:
            raise SweepFailed(
                f"sweep failed: all {len(values)} trials diverged (non-finite loss), so there is "
                "no best configuration; narrow the search space (e.g. a lower top of "
                "optimizer.lr)"
            )

    def _configure_trials(
        self,
        trials: list[Trial],
        search_space_distributions: dict[str, BaseDistribution],
        fixed_params: dict[str, Any],
    ) -> Sequence[Sequence[str]]:
        if self.study is None:
            self._adopt(trials[0].study)
        distributions = current_distributions(search_space_distributions)  # stored as today's
        overrides = super()._configure_trials(trials, distributions, fixed_params)
        self.in_flight = list(trials)
        for trial in trials:
            trial.set_user_attr("owner", self.owner)
        where = []
        if self.job_storage is not None:
            where = [
                f"tracking.optuna_storage={hydra_quoted(self.job_storage)}",
                f"tracking.optuna_study={hydra_quoted(self.study.study_name)}",
            ]
        return [
            (
                *override,
                f"tracking.optuna_trial={trial.number}",
                f"tracking.parent_run_id={self.parent_run_id}",
                *where,
            )
            for override, trial in zip(overrides, trials, strict=True)
        ]

    def _adopt(self, study: Study) -> None:
        """Take the study the stock loop made: judge its trials with the sweep's pruner (the
        sampler sees it too: TPE samples a Hyperband trial from its own bracket), and have every
        tell of a trial whose job stopped pruned tell PRUNED instead (the stock loop tells each
        job's return value COMPLETE; Optuna then keeps the last reported value as the trial's)."""
        self.study = study
        study.pruner = self.pruner
        tell = study.tell

        def tell_pruned_as_pruned(
            trial: Any, values: Any = None, state: Any = None, skip_if_finished: bool = False
        ) -> Any:
            number = trial if isinstance(trial, int) else trial.number
            if number in self.pruned:
                return tell(trial, state=TrialState.PRUNED, skip_if_finished=skip_if_finished)
            return tell(trial, values, state, skip_if_finished)

        study.tell = tell_pruned_as_pruned

    def record(self, returns: Sequence[JobReturn]) -> None:
        """Write each job's outcome on its trial; past the failure budget, tell Optuna this
        batch's results and stop the sweep with SweepStopped."""
        outcomes = [_outcome(job) for job in returns]
        for trial, (failed, attrs) in zip(self.in_flight, outcomes, strict=True):
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            if "pruned_epoch" in attrs:
                self.pruned.add(trial.number)
            self.failures += failed
        allowed = int(self.budget_rate * self.n_trials)
        if self.failures <= allowed:
            return
        for trial, job, (failed, _) in zip(self.in_flight, returns, outcomes, strict=True):
            if failed:
                trial.study.tell(trial, state=TrialState.FAIL)
            else:
                trial.study.tell(trial, float(job.return_value))
        first = next(attrs["failure_reason"] for failed, attrs in outcomes if failed)
        raise SweepStopped(
            f"sweep stopped: {self.failures} trials raised, more than "
            f"hydra.sweeper.max_failure_rate={self.budget_rate:g} of n_trials={self.n_trials} "
            f"allows ({allowed}); the last batch's first: {first}"
        )

    def _interrupted(self, reason: str) -> None:
        """Stop the workers, fail the trials in flight, end their leftover runs KILLED. A step
        that fails is logged, not raised: the interruption itself must propagate."""
        left = processes.stop_children(STOP_CHILDREN_S)
        if left:
            log.warning("worker processes %s did not stop within %g s", left, STOP_CHILDREN_S)
        queued = slurm.cancel_jobs(self.config.hydra.launcher, STOP_CHILDREN_S)
        if queued:
            log.warning("SLURM jobs %s still queued %g s after scancel", queued, STOP_CHILDREN_S)
        failed = []
        for trial in self.in_flight:
            try:
                trial.set_user_attr("failure_reason", reason)
                trial.study.tell(trial, state=TrialState.FAIL)
                failed.append(trial.number)
            except RuntimeError:
                continue  # told before the interruption
            except Exception as error:
                log.warning("could not mark trial %d FAIL in Optuna: %s", trial.number, error)
        numbers = [trial.number for trial in self.in_flight]  # only RUNNING runs are touched
        cfg = self.config
        key = sweep_id(Path(cfg.paths.root), Path(cfg.hydra.sweep.dir), cfg.hydra.sweeper)
        try:
            killed = tracking.kill_sweep_runs(
                cfg.tracking, sweep_id=key, trials=numbers, reason=reason
            )
        except Exception as error:
            log.warning("could not end the interrupted sweep's runs in MLflow: %s", error)
            return
        log.warning(
            "%s: trials %s marked FAIL in Optuna, %d MLflow run(s) left RUNNING ended KILLED",
            reason,
            failed,
            killed,
        )
