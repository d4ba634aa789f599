"""MLflow runs as the pipeline writes them: one run per job, buffered metrics, an end status
whatever happens, and the parent run a sweep's trials nest under.

A run makes a fixed handful of store calls: create (with its tags), artifacts, then the params
and per-epoch metrics buffered and sent in one ``log_batch`` at most every
``tracking.flush_interval_s`` seconds (0: every epoch), the last batch carrying the run's summary,
and the status (docs/benchmarks.md has what a call costs).

Sweeps: the first job of a sweep creates a parent run (stage ``sweep_parent``, tag ``sweep_id``)
under a file lock; later jobs, in this process or in other processes (parallel launchers,
several sweep processes sharing one Optuna study), find it by tag. Each trial nests under it and
moves its end time forward; an interrupted trial marks it KILLED.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from omegaconf import DictConfig

from gradalign.schema import Metric as M
from gradalign.schema import Stage, Tag
from gradalign.tracking.store import (
    connect,
    file_lock,
    log_batch,
    sqlite_file,
    tag_filter,
    tracking_uri,
)
from gradalign.training import EpochMetrics, History

_MAX_REASON = 1000  # characters of an exception message kept in the failure_reason tag
_parent_runs: dict[tuple[str, str, str], str] = {}


class Terminated(BaseException):
    """SIGTERM arrived while a run was open; raised so the run ends KILLED, then propagated."""


def failure_reason(error: BaseException) -> str:
    """``error`` as the failure_reason of a run's tag and its Optuna trial's user attr."""
    return f"{type(error).__name__}: {error}"[:_MAX_REASON]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _summary_metrics(values: Mapping[str, float]) -> list[Metric]:
    """The finite ``values`` as step-0 metrics (a NaN or inf summary means "none")."""
    timestamp = _now_ms()
    return [Metric(k, v, timestamp, 0) for k, v in values.items() if math.isfinite(v)]


def _find_parent(mlflow: MlflowClient, experiment: str, sweep_id: str) -> str | None:
    found = mlflow.search_runs(
        [experiment],
        tag_filter({Tag.STAGE: Stage.SWEEP_PARENT, Tag.SWEEP_ID: sweep_id}),
        max_results=1,
    )
    return found[0].info.run_id if found else None


def sweep_parent(
    tracking: DictConfig,
    *,
    sweep_id: str,
    lock_dir: Path,
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
) -> str:
    """Run id of the parent run of sweep ``sweep_id``, created by the first job to get here.

    The look-up-or-create is serialised across processes by a lock beside a SQLite store (every
    writer of the store can see it), else in ``lock_dir`` (which the caller shares between the
    jobs that share the parent); the answer is then cached for this process.
    """
    uri = tracking_uri(tracking)
    key = (uri, tracking.experiment, sweep_id)
    if key not in _parent_runs:
        db = sqlite_file(uri)
        lock = db.parent / f"{db.name}.parents.lock" if db else lock_dir / ".mlflow_parent.lock"
        with file_lock(lock):
            mlflow, experiment = connect(tracking)
            run_id = _find_parent(mlflow, experiment, sweep_id)
            if run_id is None:
                parent_tags = {**tags, Tag.STAGE: Stage.SWEEP_PARENT, Tag.SWEEP_ID: sweep_id}
                run_id = mlflow.create_run(experiment, tags=parent_tags, run_name=run_name)
                run_id = run_id.info.run_id
                log_batch(mlflow, run_id, params=params)
            _parent_runs[key] = run_id
    return _parent_runs[key]


def kill_sweep_runs(
    tracking: DictConfig, *, sweep_id: str, trials: Iterable[int], reason: str
) -> int:
    """End KILLED, with tag failure_reason ``reason``, the runs of sweep ``sweep_id`` whose
    ``optuna_trial`` tag is one of ``trials`` and that are still RUNNING (their process was
    stopped before it could end them), and the sweep's parent run; how many trial runs.

    For the sweeper process, after an interruption: what those runs flushed stays logged.
    """
    mlflow, experiment = connect(tracking)
    numbers = {str(n) for n in trials}
    running = mlflow.search_runs(
        [experiment],
        tag_filter({Tag.SWEEP_ID: sweep_id}) + " and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    killed = 0
    for run in running:
        if run.data.tags.get(Tag.OPTUNA_TRIAL) in numbers:
            mlflow.set_tag(run.info.run_id, Tag.FAILURE_REASON, reason)
            mlflow.set_terminated(run.info.run_id, "KILLED")
            killed += 1
    parent = _find_parent(mlflow, experiment, sweep_id)
    if parent is not None:
        mlflow.set_terminated(parent, "KILLED")
    return killed


class Run:
    """An open MLflow run: params and per-epoch metrics are buffered and flushed in batches."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        *,
        params: Mapping[str, Any],
        parent_run_id: str | None,
        flush_interval_s: float,
    ):
        self.client = client
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.flush_interval_s = flush_interval_s
        self.ended = False
        self._params: Mapping[str, Any] | None = params  # sent with the first flush
        self._pending: list[Metric] = []
        self._last_flush = time.perf_counter()

    def log_epoch(self, metrics: EpochMetrics) -> None:
        """Record one epoch (step = epoch); send the buffer if flush_interval_s has passed."""
        values = {
            M.TRAIN_LOSS: metrics.train_loss,
            M.VAL_LOSS: metrics.val_loss,
            M.VAL_ACC: metrics.val_acc,
            M.TEST_LOSS: metrics.test_loss,
            M.TEST_ACC: metrics.test_acc,
            M.EPOCH_TIME: metrics.epoch_time,
            **{f"{M.ALIGNMENT_PREFIX}{name}": s for name, s in metrics.alignment.items()},
        }
        timestamp = _now_ms()
        self._pending += [Metric(k, v, timestamp, metrics.epoch) for k, v in values.items()]
        if time.perf_counter() - self._last_flush >= self.flush_interval_s:
            self._flush()

    def log_summary(self, values: Mapping[str, float], tags: Mapping[str, str]) -> None:
        """Send the finite ``values`` as step-0 metrics, and ``tags``, now."""
        log_batch(self.client, self.run_id, metrics=_summary_metrics(values), tags=tags)

    def _flush(self, tags: Mapping[str, str] | None = None) -> None:
        log_batch(self.client, self.run_id, metrics=self._pending, params=self._params, tags=tags)
        self._pending, self._params = [], None
        self._last_flush = time.perf_counter()

    def finish(self, history: History, objective: float) -> None:
        """End the run: FINISHED, or FAILED with tags failure_reason and diverged=true if the fit
        diverged (deterministic for its config and seeds, so a report can reuse it).

        Summary metrics objective, best_val_loss, best_epoch are logged when finite (a diverged
        run has no objective; one without a completed epoch has no best).
        """
        summary = {M.OBJECTIVE: objective}
        if history.epochs:
            summary[M.BEST_VAL_LOSS] = history.best_val_loss
            summary[M.BEST_EPOCH] = history.best_epoch
        self._pending += _summary_metrics(summary)
        if history.diverged:
            self.end(RunStatus.FAILED, failure_reason=history.reason or "diverged", diverged=True)
        else:
            self.end(RunStatus.FINISHED)

    def end(self, status: int, failure_reason: str | None = None, diverged: bool = False) -> None:
        """Send the buffer, set ``status`` (a RunStatus value) and move the parent's end time:
        the parent ends KILLED with a KILLED trial (its sweep was interrupted), else FINISHED
        (a failed trial does not stop a sweep)."""
        tags = {Tag.FAILURE_REASON: failure_reason} if failure_reason else {}
        if diverged:
            tags[Tag.DIVERGED] = "true"
        self._flush(tags=tags)
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))
        if self.parent_run_id is not None:
            parent = "KILLED" if status == RunStatus.KILLED else "FINISHED"
            self.client.set_terminated(self.parent_run_id, parent)
        self.ended = True


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into ``Terminated`` in the main thread (signals cannot be set elsewhere),
    so that ``finally`` and ``except`` blocks run as they do for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def start_run(
    tracking: DictConfig,
    *,
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
    parent_run_id: str | None = None,
    artifacts_dir: Path | None = None,
) -> Iterator[Run]:
    """Open a run with its tags and (if given) ``artifacts_dir``; params go with the first flush.

    Leaving the block ends the run: as ``Run.finish`` decided; FINISHED if it was not called;
    KILLED (and its parent too) on KeyboardInterrupt or SIGTERM; FAILED with tag failure_reason
    on any other exception. What was logged is flushed first. Exceptions are re-raised.
    """
    mlflow, experiment = connect(tracking)
    run_tags = dict(tags)
    if parent_run_id is not None:
        run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    info = mlflow.create_run(experiment, tags=run_tags, run_name=run_name).info
    run = Run(
        mlflow,
        info.run_id,
        params=params,
        parent_run_id=parent_run_id,
        flush_interval_s=tracking.flush_interval_s,
    )
    with sigterm_raises():
        try:
            if artifacts_dir is not None:
                mlflow.log_artifacts(run.run_id, str(artifacts_dir), artifacts_dir.name)
            yield run
        except (KeyboardInterrupt, Terminated) as error:
            if not run.ended:
                run.end(RunStatus.KILLED, failure_reason=f"interrupted ({type(error).__name__})")
            raise
        except BaseException as error:
            if not run.ended:
                run.end(RunStatus.FAILED, failure_reason=failure_reason(error))
            raise
    if not run.ended:
        run.end(RunStatus.FINISHED)
