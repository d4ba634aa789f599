"""The only module that talks to MLflow.

Store: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``tracking.default_uri`` (SQLite in
``mlruns/``). Experiments created in a SQLite store keep their artifacts beside the database file,
in ``artifacts/``, so a temporary store (tests) never writes into the repository. A tracking
server (``http(s)://``) is probed once per process before anything is written, so an unreachable
one fails in seconds with its URI in the message instead of after MLflow's minutes of retries.

Cost: every MLflow call on SQLite takes ~5-10 ms (mostly SQLAlchemy, not disk), against ~25 ms
per epoch of training, so a run makes a fixed handful of calls: create (with its tags), artifacts,
then the params and per-epoch metrics buffered and sent in one ``log_batch`` at most every
``tracking.flush_interval_s`` seconds (0: every epoch), the last batch carrying the run's summary,
and the status. A 25-epoch trial makes 4 calls (5 in a sweep). Clients and experiment ids are
cached per process, so a sweep pays for the ~2 s MLflow import and store set-up once.

Concurrency: parallel workers share one SQLite file, which admits one writer at a time; a call
that still finds it locked after the 20 s MLflow lets SQLite wait (``busy_timeout``) is retried
with jittered exponential backoff (``client`` wraps every call), so a busy store delays a trial
but never loses it.

Sweeps: the first job of a sweep creates a parent run (stage ``sweep_parent``, tag ``sweep_id``)
under a file lock; later jobs, in this process or in other processes (parallel launchers,
several sweep processes sharing one Optuna study), find it by tag. Each trial nests under it and
moves its end time forward; an interrupted trial marks it KILLED.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import math
import os
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH as _MAX_ENTITIES
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH as _MAX_PARAMS_OR_TAGS
from omegaconf import DictConfig

from gradalign.training import EpochMetrics, History

log = logging.getLogger(__name__)

_MAX_REASON = 1000  # characters of an exception message kept in the failure_reason tag
_SQLITE = "sqlite:///"
_LOCKED = "database is locked"
# Waits between attempts of a call that found the SQLite store locked (each attempt already
# waited MLflow's 20 s SQLite busy_timeout): ~25 s of backoff, ~3.5 min in all, before giving up.
RETRY_WAITS_S = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8)
# How long the probe of a tracking server may take before the run fails.
CONNECT_TIMEOUT_S = 10.0
_parent_runs: dict[tuple[str, str, str], str] = {}


class Terminated(BaseException):
    """SIGTERM arrived while a run was open; raised so the run ends KILLED, then propagated."""


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer; the message names its URI."""


class _LockedMessages(logging.Filter):
    """Drop MLflow's error traceback for a locked SQLite store: the call is retried and
    ``_retrying`` logs one warning line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _LOCKED not in record.getMessage()


logging.getLogger("mlflow.store.db.utils").addFilter(_LockedMessages())


def tracking_uri(tracking: DictConfig) -> str:
    """The store URI: tracking.uri, else $MLFLOW_TRACKING_URI, else tracking.default_uri."""
    return tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_uri


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len(_SQLITE) :]).resolve() if uri.startswith(_SQLITE) else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if absent), across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to the handlers in place.

    A Ctrl-C landing inside a store call can stop SQLite mid-transaction and leave this
    process's own pooled connection holding the write lock: every later call of the process
    (ending the run KILLED, first of all) then waits for a lock that is never released. Only
    the main thread receives signals, so elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda signum, frame: received.append(signum))
        for signum in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(signum) is not None  # None: a handler Python cannot restore
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:  # re-sent while blocked, so a handler that raises cannot stop the others
            held = set(received)
            signal.pthread_sigmask(signal.SIG_BLOCK, held)
            for signum in held:
                signal.raise_signal(signum)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def _retrying(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)`` with signals held (see ``_signals_held``), again after a
    backoff while the SQLite store is locked.

    Safe for writes: a locked SQLite transaction is rolled back whole before MLflow raises.
    """
    for attempt, wait in enumerate(RETRY_WAITS_S, 1):
        try:
            with _signals_held():
                return call(*args, **kwargs)
        except MlflowException as error:
            if _LOCKED not in str(error):
                raise
            wait *= 1 + random.random()  # jitter: writers that collided do not retry in step
            log.warning("MLflow store locked (attempt %d); retrying in %.1f s", attempt, wait)
            time.sleep(wait)
    with _signals_held():
        return call(*args, **kwargs)  # the last attempt: its error propagates


class _RetryingClient:
    """An MlflowClient whose every method retries while the SQLite store is locked."""

    def __init__(self, client: MlflowClient):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute
        return functools.partial(_retrying, attribute)


def check_reachable(uri: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise TrackingUnavailable unless the tracking server at ``uri`` answers its ``/health``
    within ``timeout_s`` (401/403 count as an answer: credentials are MLflow's business);
    stores that are not servers are not probed."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
        return
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            return
        problem = f"HTTP {error.code} on /health: not an MLflow tracking server"
    except (urllib.error.URLError, OSError) as error:
        problem = f"unreachable: {getattr(error, 'reason', error)}; waited at most {timeout_s:g} s"
    raise TrackingUnavailable(
        f"MLflow tracking server {uri} ({problem}): start it, or point tracking.uri / "
        "MLFLOW_TRACKING_URI at a running one. Nothing was logged."
    )


@functools.cache
def client(uri: str) -> MlflowClient:
    """The client of store ``uri`` for this process, retrying while SQLite is locked.

    A server is probed first (check_reachable). Creating a client creates or migrates a SQLite
    schema, which processes starting together on a fresh store would race on: they take turns.
    """
    check_reachable(uri)
    db = _sqlite_file(uri)
    if db is None:
        return _RetryingClient(MlflowClient(tracking_uri=uri))
    with _file_lock(db.parent / f"{db.name}.lock"):
        return _RetryingClient(MlflowClient(tracking_uri=uri))


@functools.cache
def experiment_id(uri: str, name: str) -> str:
    """Id of experiment ``name``, created if absent (tolerating a concurrent creator)."""
    mlflow = client(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        db = _sqlite_file(uri)
        try:
            return mlflow.create_experiment(
                name, artifact_location=str(db.parent / "artifacts") if db else None
            )
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = mlflow.get_experiment_by_name(name)
    if experiment.lifecycle_stage != "active":
        raise ValueError(
            f"MLflow experiment {name!r} is deleted in {uri}: restore it or set "
            "tracking.experiment to another name"
        )
    return experiment.experiment_id


def connect(tracking: DictConfig) -> tuple[MlflowClient, str]:
    """(client, experiment id) of the configured store and experiment; see ``client``."""
    uri = tracking_uri(tracking)
    return client(uri), experiment_id(uri, tracking.experiment)


def _log_batch(
    client: MlflowClient,
    run_id: str,
    *,
    metrics: Sequence[Metric] = (),
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> None:
    """Log everything in as few calls as MLflow's batch limits allow (one, usually)."""
    param_list = [Param(key, str(value)) for key, value in (params or {}).items()]
    tag_list = [RunTag(key, str(value)) for key, value in (tags or {}).items()]
    metric_list = list(metrics)
    n = _MAX_PARAMS_OR_TAGS
    while param_list or tag_list or metric_list:
        chunk_params, param_list = param_list[:n], param_list[n:]
        chunk_tags, tag_list = tag_list[:n], tag_list[n:]
        room = _MAX_ENTITIES - len(chunk_params) - len(chunk_tags)
        chunk_metrics, metric_list = metric_list[:room], metric_list[room:]
        client.log_batch(run_id, metrics=chunk_metrics, params=chunk_params, tags=chunk_tags)


def failure_reason(error: BaseException) -> str:
    """``error`` as the failure_reason of a run's tag and its Optuna trial's user attr."""
    return f"{type(error).__name__}: {error}"[:_MAX_REASON]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _summary_metrics(values: Mapping[str, float]) -> list[Metric]:
    """The finite ``values`` as step-0 metrics (a NaN or inf summary means "none")."""
    timestamp = _now_ms()
    return [Metric(k, v, timestamp, 0) for k, v in values.items() if math.isfinite(v)]


def _quoted(value: str) -> str:
    if "'" in value:
        raise ValueError(f"{value!r} must not contain a single quote (used in MLflow filters)")
    return f"'{value}'"


def _find_parent(mlflow: MlflowClient, experiment: str, sweep_id: str) -> str | None:
    found = mlflow.search_runs(
        [experiment],
        f"tags.stage = 'sweep_parent' and tags.sweep_id = {_quoted(sweep_id)}",
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
        db = _sqlite_file(uri)
        lock = db.parent / f"{db.name}.parents.lock" if db else lock_dir / ".mlflow_parent.lock"
        with _file_lock(lock):
            mlflow, experiment = connect(tracking)
            run_id = _find_parent(mlflow, experiment, sweep_id)
            if run_id is None:
                parent_tags = {**tags, "stage": "sweep_parent", "sweep_id": sweep_id}
                run_id = mlflow.create_run(experiment, tags=parent_tags, run_name=run_name)
                run_id = run_id.info.run_id
                _log_batch(mlflow, run_id, params=params)
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
        f"tags.sweep_id = {_quoted(sweep_id)} and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    killed = 0
    for run in running:
        if run.data.tags.get("optuna_trial") in numbers:
            mlflow.set_tag(run.info.run_id, "failure_reason", reason)
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
            "train_loss": metrics.train_loss,
            "val_loss": metrics.val_loss,
            "val_acc": metrics.val_acc,
            "test_loss": metrics.test_loss,
            "test_acc": metrics.test_acc,
            "epoch_time": metrics.epoch_time,
            **{f"alignment/{name}": scale for name, scale in metrics.alignment.items()},
        }
        timestamp = _now_ms()
        self._pending += [Metric(k, v, timestamp, metrics.epoch) for k, v in values.items()]
        if time.perf_counter() - self._last_flush >= self.flush_interval_s:
            self._flush()

    def log_summary(self, values: Mapping[str, float], tags: Mapping[str, str]) -> None:
        """Send the finite ``values`` as step-0 metrics, and ``tags``, now."""
        _log_batch(self.client, self.run_id, metrics=_summary_metrics(values), tags=tags)

    def _flush(self, tags: Mapping[str, str] | None = None) -> None:
        _log_batch(self.client, self.run_id, metrics=self._pending, params=self._params, tags=tags)
        self._pending, self._params = [], None
        self._last_flush = time.perf_counter()

    def finish(self, history: History, objective: float) -> None:
        """End the run: FINISHED, or FAILED with tags failure_reason and diverged=true if the fit
        diverged (deterministic for its config and seeds, so a report can reuse it).

        Summary metrics objective, best_val_loss, best_epoch are logged when finite (a diverged
        run has no objective; one without a completed epoch has no best).
        """
        summary = {"objective": objective}
        if history.epochs:
            summary.update(best_val_loss=history.best_val_loss, best_epoch=history.best_epoch)
        self._pending += _summary_metrics(summary)
        if history.diverged:
            self.end(RunStatus.FAILED, failure_reason=history.reason or "diverged", diverged=True)
        else:
            self.end(RunStatus.FINISHED)

    def end(self, status: int, failure_reason: str | None = None, diverged: bool = False) -> None:
        """Send the buffer, set ``status`` (a RunStatus value) and move the parent's end time:
        the parent ends KILLED with a KILLED trial (its sweep was interrupted), else FINISHED
        (a failed trial does not stop a sweep)."""
        tags = {"failure_reason": failure_reason} if failure_reason else {}
        if diverged:
            tags["diverged"] = "true"
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
