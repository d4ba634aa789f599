"""gradalign's Optuna sweep (``python train.py -m``): one loop that owns each trial, from ask to
record, so that Optuna and MLflow never disagree, whatever is killed or restarted.

It reads hydra-optuna-sweeper's settings (``hydra.sweeper.*``, ``hydra/sweeper/sampler=...``,
its search-space grammar: gradalign.sweep.search_space) and runs, on Optuna's ask/tell API:

1. **Check** (``_check``): the settings, the search space (every key exists, every range end
   builds: gradalign.sweep.checks), the MLflow store; then open the study (a stored one is
   claimed for this configuration: gradalign.sweep.studies) and complete from MLflow the trials
   a killed process of it left RUNNING (``_settle_left``), and open the sweep's MLflow parent.
2. **Ask** a batch of ``n_jobs`` trials, or fewer: as many as the study's budget
   (``n_trials``: its results in all, gradalign.budget) still misses, counted before each
   batch (in the study's turn: processes sharing it fill one budget), so a rerun completes an
   interrupted study and runs none in a complete one. Each gets its values, its owner (this
   process), and its MLflow run, created now, RUNNING under the parent, whose id the trial
   records (user attr ``mlflow_run_id``) before anything runs.
3. **Launch** the batch through the configured launcher (serial, stacked, joblib, submitit,
   SLURM). Each job trains into its run, ends it with its outcome, and returns the outcome
   (gradalign.sweep.trial.run_trial).
4. **Record** each outcome: MLflow has it first (a job that could not end its run has it ended
   here), then Optuna is told (gradalign.sweep.trial.record). More raised trials than
   ``max_failure_rate * n_trials`` stop the sweep; a diverged trial is a result, not a failure.

If anything stops the loop (Ctrl-C, SIGTERM, SLURM cancelling jobs, a store that stays down,
an error), the trials in flight are completed from their MLflow runs (``_settle_in_flight``):
the launcher's workers are stopped first, a run still open is ended KILLED, and a run that
finished is recorded as finished. The parent run ends with the sweep, and one line says what
happened and how to resume. A process killed outright (kill -9) leaves its trials RUNNING:
its workers stop on their own (gradalign.processes), and the next run of the same command,
or ``python -m gradalign.doctor``, completes them from MLflow the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from mlflow.entities import RunStatus
from omegaconf import DictConfig, OmegaConf, read_write
from optuna.samplers import GridSampler
from optuna.storages import BaseStorage
from optuna.study import Study
from optuna.trial import Trial, TrialState

from gradalign import credentials, databases, processes, tracking
from gradalign.budget import OWNER, Budget, budget
from gradalign.components import build_dataset
from gradalign.config import anchored_uri, discard_output_dir, hydra_quoted
from gradalign.hydra_compat import trusted
from gradalign.optuna_storage import open_storage
from gradalign.schema import Tag
from gradalign.sweep import search_space, slurm, summary
from gradalign.sweep.checks import check_search_space, check_trial_config
from gradalign.sweep.pruning import JOURNAL, build_pruner, prunes
from gradalign.sweep.runs import create_trial_run, open_parent, trial_run_finder
from gradalign.sweep.sampler import build_sampler
from gradalign.sweep.search_space import SearchSpace
from gradalign.sweep.settings import NOT_STARTED, direction_name, search_overrides
from gradalign.sweep.studies import (
    check_not_merged,
    check_storage,
    claim_study,
    study_identity,
)
from gradalign.sweep.trial import (
    FAILED,
    PRUNED,
    RUN_ID,
    Outcome,
    record,
    settle,
)

log = logging.getLogger(__name__)
CLAIM = ".sweep_claim"  # created atomically in the sweep directory by the sweep that owns it
STOP_CHILDREN_S = 30.0  # how long an interrupted sweep waits for its workers to end their runs


class SweepEnded(Exception):
    """A sweep that ends without a result: stopped before its last trial (more trials raised
    than the failure budget allows, SLURM cancelled jobs, a store stayed down: the message says
    which and how to resume), or ran but found no usable configuration (every trial diverged).
    Printed as its one line (no traceback, no hint to set HYDRA_FULL_ERROR), and the process
    exits with ``status``."""

    status = 1


class SweepNotStarted(SweepEnded):
    """Refused before its first trial: an invalid setting, an unusable store."""

    status = processes.EXIT_BAD_INPUT


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


@dataclasses.dataclass
class Pending:
    """A trial in flight: asked, its MLflow run created, its job launched."""

    trial: Trial
    run_id: str


class OptunaSweep:
    """The sweep of ``python train.py -m`` (see the module docstring). Takes the settings of
    conf/hydra/sweeper/gradalign.yaml: hydra-optuna-sweeper's (``sampler`` a config node,
    ``direction``, ``storage``, ``study_name``, ``n_trials``, ``n_jobs``, ``max_failure_rate``
    the fraction of ``n_trials`` that may raise, ``params``, ``custom_search_space``), plus
    ``seed`` (the sampler's, unless its own config sets one) and ``pruner`` (an
    ``optuna.pruners`` config; None: no pruning)."""

    def __init__(
        self,
        *,
        sampler: DictConfig,
        seed: int | None,
        direction: Any,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None = None,
        custom_search_space: str | None = None,
        search_space: Any = None,
        pruner: Any = None,
    ) -> None:
        # search_space (hydra-optuna-sweeper 1.3's deprecated form) was refused by check_sweep
        self.direction = direction
        self.sampler_config, self.seed = sampler, seed
        self.storage, self.study_name = storage, study_name
        self.n_trials, self.n_jobs, self.budget_rate = n_trials, n_jobs, max_failure_rate
        self.params = params
        self.extend = (
            # the setting names the function to run: trusted as Hydra trusts a plugin it loads
            instantiate(
                {"_target_": custom_search_space, "_partial_": True},
                **trusted(custom_search_space),
            )
            if (custom_search_space)
            else None
        )
        self.pruner_config = pruner
        self.in_flight: list[Pending] = []
        self.study: Study | None = None
        self.backend: BaseStorage | None = None  # the study's storage, opened
        self.parent_run_id: str | None = None
        self.store: tracking.Store  # the MLflow store, once it answered (made by _check)
        self.job_storage: str | None = None  # where a pruned sweep's jobs find their study
        self.job_idx = 0

    # --- set-up --------------------------------------------------------------------------------

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        """Claim a sweep directory of its own (``<dir>-<n>`` if another sweep process has the
        requested one) and build the launcher."""
        credentials.mask_logs()  # the sweep's settings are logged with the storage URL
        processes.adopt()  # workers die with this process, this one with its own owner
        requested = Path(config.hydra.sweep.dir)
        claimed = claim_sweep_dir(requested)
        if claimed != requested:
            log.warning("sweep directory %s is another sweep's: writing to %s", requested, claimed)
            with read_write(config.hydra):  # jobs recompose hydra.* from hydra.overrides.hydra
                config.hydra.sweep.dir = str(claimed)
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir={hydra_quoted(claimed)}")
        if self.storage is not None:
            self.storage = anchored_uri(str(self.storage), config.paths.root)
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> None:
        """Run the sweep of ``arguments`` (the command line's overrides); its last line and exit
        status when it does not finish."""
        try:
            self._sweep(arguments)
        except SweepEnded as ended:
            if isinstance(ended, SweepNotStarted):  # nothing ran: its directory goes too
                discard_output_dir(Path(self.config.hydra.sweep.dir), CLAIM)
            print(credentials.mask(str(ended)), file=sys.stderr)
            raise SystemExit(ended.status) from None
        except (KeyboardInterrupt, tracking.Terminated):
            print(summary.interrupted_line(self.storage, self.study_name), file=sys.stderr)
            raise SystemExit(processes.EXIT_INTERRUPTED) from None

    def _sweep(self, arguments: list[str]) -> None:
        try:
            space = self._check(arguments)
            self._open_study(space)
            self._settle_left()
            counted = self._budget()
            if self.storage is not None and (counted.done or counted.running):
                print(counted.line(self.study.study_name), file=sys.stderr, flush=True)
            key = self.study.user_attrs.get("gradalign.study_key") if self.study_name else None
            self.parent_run_id = open_parent(self.store, self.config, key)
        except (ValueError, databases.StoreUnavailable) as error:
            raise SweepNotStarted(f"{NOT_STARTED}: {error}") from error
        summary.announce(self.store, self.config, self.parent_run_id, counted.left)
        log.info("Study name: %s", self.study.study_name)
        log.info("Storage: %s", self.storage)  # its password masked (credentials.mask_logs)
        log.info("Sampler: %s", type(self.sampler).__name__)
        with tracking.sigterm_raises():
            try:
                self._loop(space)
                self._check_some_trial_converged()
            except slurm.JobsStopped as error:
                self._end(RunStatus.KILLED, f"stopped by SLURM: {error}")
                raise SweepEnded(
                    f"sweep stopped: {error}. Its trials in flight are recorded from their MLflow "
                    f"runs; {self._resume_hint()}"
                ) from None
            except databases.StoreUnavailable as error:
                raise SweepEnded(self._store_down(error)) from None
            except (KeyboardInterrupt, tracking.Terminated) as error:
                self._end(RunStatus.KILLED, tracking.interruption_reason(error))
                raise
            except BaseException as error:
                self._end(RunStatus.FAILED, tracking.failure_reason(error))
                raise
        self._end(RunStatus.FINISHED)

    def _check(self, arguments: list[str]) -> SearchSpace:
        """Check the settings, the search space and the MLflow store; the search space. Raises
        ValueError (or StoreUnavailable) with the one line that says what is wrong."""
        # The settings and the search space's keys were checked before the heavy imports
        # (gradalign.sweep.settings.check_sweep, called by the plugin shim).
        self.direction = direction_name(self.direction)
        self.pruner = build_pruner(self.pruner_config)
        splits = build_dataset(self.config)
        check_trial_config(self.config, splits)
        space = search_space.parse(search_overrides(self.params, arguments))
        check_search_space(self.config, space.distributions, splits)
        self.sampler = build_sampler(self.sampler_config, self.seed)
        if getattr(self.sampler, "func", None) is GridSampler:  # a partial, to complete
            grid = space.grid()
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
        if self.storage is not None:
            check_storage(self.storage, self._wait_s)
            databases.check_separate(self.storage, tracking.tracking_uri(self.config.tracking))
        self.store = tracking.connect(self.config.tracking)  # the experiment created once, here
        return space

    def _open_study(self, space: SearchSpace) -> None:
        """Open the study: in memory, in a journal in the sweep directory (a pruned sweep
        without a storage: its jobs report to it), or claimed in the storage."""
        options = {"sampler": self.sampler, "pruner": self.pruner}
        if self.storage is None:
            self.backend = optuna.storages.InMemoryStorage()
            if prunes(self.pruner):
                self.job_storage = str(Path(self.config.hydra.sweep.dir) / JOURNAL)
                log.info("pruning: the study is kept in %s", self.job_storage)
                self.backend = open_storage(self.job_storage, self._wait_s)
            self.study = optuna.create_study(
                storage=self.backend, direction=self.direction, **options
            )
            return
        self.backend = self._optuna(lambda: open_storage(self.storage, self._wait_s))
        identity = study_identity(self.config, space)
        self.study, new = self._optuna(
            lambda: claim_study(
                self.backend,
                self.storage,
                self.study_name,
                [self.direction],
                identity,
                self._wait_s,
                **options,
            )
        )
        check_not_merged(self.store, self.study, new, self.storage)
        if prunes(self.pruner):
            self.job_storage = self.storage

    def _settle_left(self) -> None:
        """Complete from MLflow the trials of the stored study that a process of it, now gone,
        left RUNNING, and fail those no process took (asked, then a kill before their owner was
        written); say so in one line."""
        if self.study_name is None or self.storage is None:
            return
        with self._study_turn():  # no process is between its ask and its owner
            gone = [
                trial
                for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if processes.owner_alive(trial.user_attrs.get(OWNER, "")) is False
            ]
            find = trial_run_finder(lambda: self.store, f"optuna:{self.study_name}")
            client = self.store.client
            done = settle(self.study, self.backend, gone, client, find)
            done |= self._fail_unowned("its sweep process stopped before it took the trial")
        if done:
            kinds = [outcome.kind for outcome in done.values()]
            counts = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
            print(
                f"study {self.study_name!r}: {len(done)} trial(s) left RUNNING by a process that "
                f"is gone, recorded from their MLflow runs: {counts} (trials "
                f"{sorted(done)})",
                file=sys.stderr,
            )

    # --- the loop ------------------------------------------------------------------------------

    def _loop(self, space: SearchSpace) -> None:
        """Ask, launch and record batches until the study holds its budget (``n_trials``)."""
        failures = 0
        while True:
            self.in_flight = self._ask_batch(space)
            if not self.in_flight:
                break
            overrides = [self._job_overrides(pending, space) for pending in self.in_flight]
            try:
                returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            except Exception as error:
                stopped = slurm.stopped_batch(error)
                if stopped is None:
                    raise
                raise stopped from error
            self.job_idx += len(returns)
            outcomes = [self._outcome(job) for job in returns]
            for pending, outcome in zip(self.in_flight, outcomes, strict=True):
                self._record(pending, outcome)
            self.in_flight = []
            failures += sum(outcome.kind == FAILED for outcome in outcomes)
            allowed = int(self.budget_rate * self.n_trials)
            if failures > allowed:
                first = next(o.reason for o in outcomes if o.kind == FAILED)
                raise SweepEnded(
                    f"sweep stopped: {failures} trials raised, more than "
                    f"hydra.sweeper.max_failure_rate={self.budget_rate:g} of "
                    f"n_trials={self.n_trials} allows ({allowed}); the last batch's first: "
                    f"{first}"
                )
        self._write_results()

    def _budget(self) -> Budget:
        """The study's trials counted against its budget, ``n_trials`` (gradalign.budget):
        results and trials in flight count, failed ones do not (a resume runs others)."""
        return self._optuna(lambda: budget(self.study, self.n_trials))

    def _ask_batch(self, space: SearchSpace) -> list[Pending]:
        """The next batch: up to ``n_jobs`` trials, no more than the study lacks to its budget,
        each with its values, its owner and its MLflow run. Asked in the study's turn, so that
        processes sharing it never ask past its budget, and a trial without an owner is always
        a leftover (see ``_ask``)."""
        with self._study_turn():
            trials = [self._ask(space) for _ in range(min(self.n_jobs, self._budget().left))]
        return [Pending(trial, self._create_run(trial)) for trial in trials]

    def _ask(self, space: SearchSpace) -> Trial:
        """A new trial with its values and its owner (this process).

        Optuna's ask is several writes (the trial, then each value). A store fault during one
        of them leaves a RUNNING trial that no process owns, and the retried ask makes another:
        the leftover is failed at once, so that it is never counted nor left RUNNING."""
        attempts = 0

        def ask() -> Trial:
            nonlocal attempts
            attempts += 1
            return self.study.ask(space.distributions)

        trial = self._optuna(ask)
        if attempts > 1:
            reason = "its ask was interrupted by a store fault and asked again"
            self._fail_unowned(reason, keep=trial.number)
        if self.extend is not None:
            self.extend(self.config, trial)
        self._optuna(lambda: trial.set_user_attr(OWNER, processes.owner_token()))
        return trial

    def _create_run(self, trial: Trial) -> str:
        """Create the trial's MLflow run and write its id on the trial."""
        run_id = create_trial_run(self.store, self.config, self.parent_run_id, trial.number)
        self._optuna(lambda: trial.set_user_attr(RUN_ID, run_id))
        return run_id

    def _fail_unowned(self, reason: str, keep: int | None = None) -> dict[int, Outcome]:
        """Fail the study's RUNNING trials that no process owns (asked, but a kill or a store
        fault came before their owner was written), but trial ``keep`` (just asked). Only in
        the study's turn: outside it, a trial another process has just asked has no owner
        yet."""
        unowned = [
            trial
            for trial in self._optuna(
                lambda: self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            )
            if OWNER not in trial.user_attrs and trial.number != keep
        ]
        client = self.store.client
        return self._optuna(
            lambda: settle(self.study, self.backend, unowned, client, lambda _: None, force=reason)
        )

    def _study_turn(self) -> Any:
        """The lock under which processes sharing the stored study ask trials (none for a study
        only this process works in)."""
        if self.storage is None:
            return contextlib.nullcontext()
        name = f"gradalign:asks {self.study_name}"
        return databases.store_lock(self.storage, name, self._wait_s)

    def _job_overrides(self, pending: Pending, space: SearchSpace) -> list[str]:
        """The overrides of the trial's job: its values, the fixed ones, and where it reports."""
        values = {**pending.trial.params, **space.fixed}
        where = []
        if self.job_storage is not None:
            where = [
                f"tracking.optuna_storage={hydra_quoted(self.job_storage)}",
                f"tracking.optuna_study={hydra_quoted(self.study.study_name)}",
            ]
        return [
            *(f"{key}={value}" for key, value in values.items()),
            f"tracking.optuna_trial={pending.trial.number}",
            f"tracking.parent_run_id={hydra_quoted(self.parent_run_id)}",
            f"tracking.run_id={hydra_quoted(pending.run_id)}",
            *where,
        ]

    @staticmethod
    def _outcome(job: JobReturn) -> Outcome:
        """A job's Outcome (its return value), or the failure it raised."""
        if job.status == JobStatus.COMPLETED and isinstance(job.return_value, Outcome):
            return job.return_value
        try:
            value = job.return_value  # raises what the job raised
        except databases.StoreUnavailable:
            raise  # a store that stays down stops the sweep: every trial would fail
        except Exception as error:
            return Outcome(FAILED, reason=tracking.failure_reason(error))
        return Outcome(FAILED, reason=f"its job returned {value!r}, not an Outcome")

    def _record(self, pending: Pending, outcome: Outcome) -> None:
        """Record ``outcome`` in both stores: a failed trial's run is ended FAILED if its job
        could not end it, then Optuna is told."""
        if outcome.kind == FAILED:
            client = self.store.client
            if client.get_run(pending.run_id).info.status == "RUNNING":
                client.set_tag(pending.run_id, Tag.FAILURE_REASON, outcome.reason)
                client.set_terminated(pending.run_id, "FAILED")
        self._optuna(lambda: record(self.study, pending.trial, outcome))

    # --- endings -------------------------------------------------------------------------------

    def _end(self, status: int, reason: str | None = None) -> None:
        """End the sweep: complete the trials in flight from MLflow, write the study's summary
        on the parent run and end it (if no other sweep process still works in it), print the
        sweep's last line. A store that fails here is logged, not raised: the sweep's own
        outcome is what the user must see."""
        if self.in_flight:
            self._settle_in_flight(reason or "interrupted")
        storage = self.storage if isinstance(self.storage, str) else None
        summary.finish(
            self.store, self.config, self.parent_run_id, self.study, status, reason, storage
        )

    def _store_down(self, error: databases.StoreUnavailable) -> str:
        """End what can be ended after a store stayed down past its wait (``error``): with the
        Optuna storage down, the parent run FAILED in MLflow; with MLflow down, nothing (every
        write would wait again). The sweep's last line: the store, what is left, how to resume."""
        left = ""
        if isinstance(error, tracking.TrackingUnavailable):
            left = self._counted() + (
                f" Its MLflow parent run {self.parent_run_id} and the trials in flight are left "
                "RUNNING: python -m gradalign.doctor ends them once the store answers."
            )
        else:
            self.in_flight = []  # their trials stay RUNNING in the storage: a resume settles them
            left = self._counted()  # a full disk still reads
            ended = summary.finish(
                self.store,
                self.config,
                self.parent_run_id,
                None,
                RunStatus.FAILED,
                tracking.failure_reason(error),
            )
            if not ended:
                left += f" Its MLflow parent run {self.parent_run_id} is left RUNNING."
        return f"sweep stopped: {error}.{left} {self._resume_hint()}"

    def _counted(self) -> str:
        """`` Its study holds 3 trials: 2 complete, ...``, as its storage has them (nothing when
        that cannot be read either)."""
        try:
            return f" Its study holds {summary.summarize(self.study).counts_text()}."
        except Exception as error:
            log.warning("could not count the study's trials: %s", error)
            return ""

    def _settle_in_flight(self, reason: str) -> None:
        """Stop the launcher's workers (SIGTERM; SLURM jobs: scancel), then record each trial
        in flight from its MLflow run: a run still open is ended KILLED with ``reason``, one
        that finished counts as finished."""
        left = processes.stop_children(STOP_CHILDREN_S)
        if left:
            log.warning("worker processes %s did not stop within %g s", left, STOP_CHILDREN_S)
        queued = slurm.cancel_jobs(self.config.hydra.launcher, STOP_CHILDREN_S)
        if queued:
            log.warning("SLURM jobs %s still queued %g s after scancel", queued, STOP_CHILDREN_S)
        runs = {pending.trial.number: pending.run_id for pending in self.in_flight}
        try:
            frozen = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            mine = [trial for trial in frozen if trial.number in runs]
            client = self.store.client
            done = settle(
                self.study,
                self.backend,
                mine,
                client,
                lambda trial: runs[trial.number],
                force=reason,
            )
        except Exception as error:
            log.warning("could not record the trials in flight %s: %s", sorted(runs), error)
            return
        self.in_flight = []
        log.warning(
            "%s: trials in flight recorded from their MLflow runs: %s",
            reason,
            ", ".join(f"{n} {o.kind}" for n, o in sorted(done.items())) or "none",
        )

    def _check_some_trial_converged(self) -> None:
        """Raise SweepEnded when no trial of the study has a finite objective: every one of
        them diverged, and the sweep found nothing."""
        found = summary.summarize(self.study)
        tried = len(found.trials) - found.count(PRUNED)
        if tried and found.best is None:
            raise SweepEnded(
                f"sweep failed: all {tried} trials diverged (non-finite loss), so there is "
                "no best configuration; narrow the search space (e.g. a lower top of "
                "optimizer.lr)"
            )

    def _write_results(self) -> None:
        """``optimization_results.yaml`` in the sweep directory, as hydra-optuna-sweeper writes
        it: the best values and objective."""
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            return
        best = self.study.best_trial
        results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
        OmegaConf.save(
            OmegaConf.create(results),
            Path(self.config.hydra.sweep.dir) / "optimization_results.yaml",
        )

    # --- stores --------------------------------------------------------------------------------

    @property
    def _wait_s(self) -> float:
        return float(self.config.tracking.store_wait_s)

    def _optuna(self, call: Any) -> Any:
        """``call()``, a call to the study's storage, retried while its database does not answer
        (a server restarting) for tracking.store_wait_s."""
        where = credentials.mask(str(self.storage or self.job_storage or "in memory"))
        return databases.retrying(f"Optuna storage {where}", self._wait_s, call)

    def _resume_hint(self) -> str:
        """How to go on: the same command (a stored study resumes)."""
        if self.storage is None:
            return "the study was in memory: a rerun starts a new one"
        command = credentials.mask(shlex.join(["python", *sys.argv]))
        return f"resume with: {command}"
