"""The only module that talks to MLflow.

Store: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``tracking.default_uri`` (SQLite in
``mlruns/``). Experiments created in a SQLite store keep their artifacts beside the database file,
in ``artifacts/``, so a temporary store (tests) never writes into the repository.

Cost: every MLflow call on SQLite takes ~5-10 ms (mostly SQLAlchemy, not disk), against ~25 ms
per epoch of training, so a run makes a fixed handful of calls: create (with its tags), artifacts,
then the params and per-epoch metrics buffered and sent in one ``log_batch`` at most every
``tracking.flush_interval_s`` seconds (0: every epoch), the last batch carrying the run's summary,
and the status. A 25-epoch trial makes 4 calls (5 in a sweep). Clients and experiment ids are
cached per process, so a sweep pays for the ~2 s MLflow import and store set-up once.

Sweeps: the first job of a sweep creates a parent run (stage ``sweep_parent``, tag ``sweep_id``)
under a file lock in the sweep directory; later jobs, in this process or in other processes of a
parallel launcher, find it by tag. Each trial nests under it and moves its end time forward.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from omegaconf import DictConfig

from gradalign.training import EpochMetrics, History

# MLflow's per-call limits (mlflow.utils.validation).
_MAX_PARAMS_OR_TAGS = 100
_MAX_ENTITIES = 1000
_MAX_REASON = 1000  # characters of an exception message kept in the failure_reason tag
_SQLITE = "sqlite:///"
_parent_runs: dict[tuple[str, str, str], str] = {}


class Terminated(BaseException):
    """SIGTERM arrived while a run was open; raised so the run ends KILLED, then propagated."""


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


@functools.cache
def _client(uri: str) -> MlflowClient:
    """A client per store and process. Creating one creates or migrates a SQLite schema, which
    processes starting together on a fresh store would race on: they take turns."""
    db = _sqlite_file(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    with _file_lock(db.parent / f"{db.name}.lock"):
        return MlflowClient(tracking_uri=uri)


@functools.cache
def _experiment_id(uri: str, name: str) -> str:
    """Id of experiment ``name``, created if absent (tolerating a concurrent creator)."""
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        db = _sqlite_file(uri)
        try:
            return client.create_experiment(
                name, artifact_location=str(db.parent / "artifacts") if db else None
            )
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage != "active":
        raise ValueError(
            f"MLflow experiment {name!r} is deleted in {uri}: restore it or set "
            "tracking.experiment to another name"
        )
    return experiment.experiment_id


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


def _now_ms() -> int:
    return int(time.time() * 1000)


def sweep_parent(
    tracking: DictConfig,
    *,
    sweep_id: str,
    lock_dir: Path,
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
) -> str:
    """Run id of the sweep's parent run, created by the first job of the sweep to get here.

    Jobs of one sweep share ``lock_dir`` (the sweep directory), so the look-up-or-create is
    serialised across processes there; the answer is then cached for this process.
    """
    if "'" in sweep_id:
        raise ValueError(f"sweep id {sweep_id!r} must not contain a single quote")
    uri = tracking_uri(tracking)
    key = (uri, tracking.experiment, sweep_id)
    if key not in _parent_runs:
        with _file_lock(lock_dir / ".mlflow_parent.lock"):
            client = _client(uri)
            experiment_id = _experiment_id(uri, tracking.experiment)
            found = client.search_runs(
                [experiment_id],
                f"tags.stage = 'sweep_parent' and tags.sweep_id = '{sweep_id}'",
                max_results=1,
            )
            if found:
                _parent_runs[key] = found[0].info.run_id
            else:
                parent_tags = {**tags, "stage": "sweep_parent", "sweep_id": sweep_id}
                run = client.create_run(experiment_id, tags=parent_tags, run_name=run_name)
                _log_batch(client, run.info.run_id, params=params)
                _parent_runs[key] = run.info.run_id
    return _parent_runs[key]


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

    def _flush(self, tags: Mapping[str, str] | None = None) -> None:
        _log_batch(self.client, self.run_id, metrics=self._pending, params=self._params, tags=tags)
        self._pending, self._params = [], None
        self._last_flush = time.perf_counter()

    def finish(self, history: History, objective: float) -> None:
        """End the run: FINISHED, or FAILED with tag failure_reason if the fit diverged.

        Summary metrics objective, best_val_loss, best_epoch are logged when finite (a diverged
        run has no objective; one without a completed epoch has no best).
        """
        summary = {"objective": objective}
        if history.epochs:
            summary.update(best_val_loss=history.best_val_loss, best_epoch=history.best_epoch)
        timestamp = _now_ms()
        self._pending += [
            Metric(k, v, timestamp, 0) for k, v in summary.items() if math.isfinite(v)
        ]
        if history.diverged:
            self.end(RunStatus.FAILED, failure_reason=history.reason or "diverged")
        else:
            self.end(RunStatus.FINISHED)

    def end(self, status: int, failure_reason: str | None = None) -> None:
        """Send the buffer, set ``status`` (a RunStatus value), move the parent's end time."""
        self._flush(tags={"failure_reason": failure_reason} if failure_reason else None)
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))
        if self.parent_run_id is not None:
            self.client.set_terminated(self.parent_run_id, "FINISHED")
        self.ended = True


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into ``Terminated`` in the main thread (signals cannot be set elsewhere)."""
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
    KILLED on KeyboardInterrupt or SIGTERM; FAILED with tag failure_reason on any other
    exception. Exceptions are re-raised.
    """
    uri = tracking_uri(tracking)
    client = _client(uri)
    experiment_id = _experiment_id(uri, tracking.experiment)
    run_tags = dict(tags)
    if parent_run_id is not None:
        run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    info = client.create_run(experiment_id, tags=run_tags, run_name=run_name).info
    run = Run(
        client,
        info.run_id,
        params=params,
        parent_run_id=parent_run_id,
        flush_interval_s=tracking.flush_interval_s,
    )
    with _sigterm_raises():
        try:
            if artifacts_dir is not None:
                client.log_artifacts(run.run_id, str(artifacts_dir), artifacts_dir.name)
            yield run
        except (KeyboardInterrupt, Terminated):
            if not run.ended:
                run.end(RunStatus.KILLED)
            raise
        except BaseException as error:
            if not run.ended:
                reason = f"{type(error).__name__}: {error}"[:_MAX_REASON]
                run.end(RunStatus.FAILED, failure_reason=reason)
            raise
    if not run.ended:
        run.end(RunStatus.FINISHED)
