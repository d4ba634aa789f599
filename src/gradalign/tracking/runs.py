"""MLflow runs as the pipeline writes them: one run per job, buffered metrics, an end status
whatever happens, and the parent run a sweep's trials nest under.

A run makes a fixed handful of store calls: create (with its tags), artifacts, then the params
and per-epoch metrics buffered and sent in one ``log_batch`` at most every
``tracking.flush_interval_s`` seconds (0: every epoch), the last batch carrying the run's summary,
and the status (docs/benchmarks.md has what a call costs).

Sweeps: the sweep process opens the sweep's parent run (stage ``sweep_parent``, tag
``sweep_id``) before its first trial, finding the one that exists when several sweep processes
share one Optuna study, and ends it when its own work is done; it creates each trial's run
(gradalign.sweep.runs), which the trial's job then fills and ends (``start_run`` with
``resume_run_id``); trials never change their parent's status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from gradalign import databases, processes
from gradalign.credentials import mask, masked, masked_copy
from gradalign.schema import Metric as M
from gradalign.schema import MlflowTag, Stage, Tag
from gradalign.tracking.store import Store, TrackingUnavailable, connect, log_batch, tag_filter
from gradalign.training import EpochMetrics, History

log = logging.getLogger(__name__)
_MAX_REASON = 1000  # characters of an exception message kept in the failure_reason tag


class Terminated(BaseException):
    """SIGTERM arrived while a run was open; raised so the run ends KILLED, then propagated."""


@dataclasses.dataclass(frozen=True)
class DatasetRecord:
    """A run's data set as MLflow records a dataset input: the runs table's Dataset column shows
    ``name (digest)``, and its drawer the ``profile`` (split sizes), the ``source`` and the
    tensor ``schema`` (name -> (dtype, shape), -1 for the number of examples)."""

    name: str
    digest: str  # at most 36 characters: what identifies the data (its generation arguments)
    source: str  # where the data lives (a path shown as "Local")
    profile: Mapping[str, Any]
    schema: Mapping[str, tuple[str, Sequence[int]]]
    context: str = "training"  # what the run used it for (MLflow shows it as a chip)

    def entity(self) -> DatasetInput:
        """The MLflow dataset input."""
        spec = {
            name: json.dumps([{"type": "tensor", "tensor-spec": {"dtype": d, "shape": list(s)}}])
            for name, (d, s) in self.schema.items()
        }
        dataset = Dataset(
            name=self.name,
            digest=self.digest,
            source_type="local",
            source=json.dumps({"uri": self.source}),
            schema=json.dumps({"mlflow_tensorspec": spec}),
            profile=json.dumps(dict(self.profile)),
        )
        return DatasetInput(dataset, tags=[InputTag(MlflowTag.DATA_CONTEXT, self.context)])


def failure_reason(error: BaseException) -> str:
    """``error`` as the failure_reason of a run's tag and its Optuna trial's user attr: its
    first line (passwords masked)."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return mask(f"{type(error).__name__}: {first_line}")[:_MAX_REASON]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _summary_metrics(values: Mapping[str, float]) -> list[Metric]:
    """The finite ``values`` as step-0 metrics (a NaN or inf summary means "none")."""
    timestamp = _now_ms()
    return [Metric(k, v, timestamp, 0) for k, v in values.items() if math.isfinite(v)]


def outcome_line(history: History, objective: float) -> str:
    """The first line of a finished run's description: its objective, best val loss and the
    last epoch's test accuracy, named as the runs table's columns are."""
    last = history.epochs[-1]
    return (
        f"**{M.OBJECTIVE} {objective:.4f}** · {M.BEST_VAL_LOSS} {history.best_val_loss:.4f} "
        f"(epoch {history.best_epoch}) · test accuracy {last[M.TEST_ACC]:.2%} at epoch {last.epoch}"
    )


def _parents(store: Store, sweep_id: str) -> list[Any]:
    """The parent runs of sweep ``sweep_id``, oldest first (normally one)."""
    found = store.client.search_runs(
        [store.experiment_id],
        tag_filter({Tag.STAGE: Stage.SWEEP_PARENT, Tag.SWEEP_ID: sweep_id}),
        max_results=100,
    )
    return sorted(found, key=lambda run: (run.info.start_time, run.info.run_id))


def find_sweep_parent(store: Store, sweep_id: str) -> Any:
    """The parent run of sweep ``sweep_id`` (the oldest, if processes on several machines made
    one each), or None."""
    parents = _parents(store, sweep_id)
    return parents[0] if parents else None


def _owner_key(token: str) -> str:
    host, pid, _ = token.rsplit(":", 2)
    return f"{Tag.OWNER_PREFIX}{host}.{pid}"


def _parents_lock(
    store: Store, sweep_id: str, storage: str | None
) -> contextlib.AbstractContextManager[None]:
    """The lock under which sweep processes look for sweep ``sweep_id``'s parent and create it:
    the advisory lock of a PostgreSQL database they all use (the MLflow store, else the Optuna
    ``storage`` of a shared study), which works across machines; else a file lock on this
    machine, beside a SQLite store or in the temporary directory."""
    name = f"gradalign:sweep-parent {store.experiment} {sweep_id}"
    for url in (store.uri, storage):
        if url and databases.postgres_url(url) is not None:
            return databases.exclusive(url, name, store.wait_s)
    db = databases.sqlite_file(store.uri)
    if db is not None:
        return databases.file_lock(db.parent / f"{db.name}.parents.lock")
    digest = hashlib.sha256(f"{store.uri} {name}".encode()).hexdigest()
    return databases.file_lock(
        Path(tempfile.gettempdir()) / "gradalign-locks" / f"{digest[:16]}.lock"
    )


def open_sweep_parent(
    store: Store,
    *,
    sweep_id: str,
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
    storage: str | None = None,
) -> str:
    """The run id of sweep ``sweep_id``'s parent run, created if there is none, RUNNING, with
    this process registered as one of its owners (tag ``owner.<host>.<pid>``).

    Several sweep processes may share a parent (a shared or resumed Optuna study, kept in
    ``storage``). They take turns (``_parents_lock``): under the lock of a PostgreSQL database
    they share, also across machines; else under a file lock on one machine. Processes on
    several machines with no such database may each create one, so every process then keeps
    the oldest parent and deletes its own younger duplicate.
    """
    mlflow = store.client
    try:
        with _parents_lock(store, sweep_id, storage):
            parents = _parents(store, sweep_id)
            if not parents:
                key = {Tag.STAGE: Stage.SWEEP_PARENT, Tag.SWEEP_ID: sweep_id}
                created = mlflow.create_run_once(
                    store.experiment_id, tags=masked({**tags, **key}), run_name=run_name, key=key
                )
                log_batch(mlflow, created, params=params)
                parents = _parents(store, sweep_id)
                for duplicate in parents[1:]:
                    if duplicate.info.run_id == created:
                        mlflow.delete_run(duplicate.info.run_id)
            run_id = parents[0].info.run_id
            mlflow.update_run(run_id, status="RUNNING")
            token = processes.owner_token()
            mlflow.set_tag(run_id, _owner_key(token), token)
    except databases.LockTimeout as error:
        raise TrackingUnavailable(f"sweep parent: {error}") from None
    return run_id


def close_sweep_parent(
    store: Store,
    run_id: str,
    status: int,
    failure_reason: str | None = None,
    storage: str | None = None,
    first: Callable[[], None] | None = None,
) -> bool:
    """Unregister this process as an owner of the sweep parent ``run_id``; if no other owner
    is alive (owners on other hosts count as alive), end the parent with ``status`` (and tag
    failure_reason). Whether it was ended.

    Under the lock ``open_sweep_parent`` takes (``storage`` as there): two owners leaving at
    once would each see the other and leave the parent RUNNING. ``first()`` (the sweep's
    summary of its study) runs under the same lock, so that the summary read last is the
    summary written last: two processes summarising a shared study at once could otherwise
    write an older count over a newer one."""
    sweep_id = store.client.get_run(run_id).data.tags.get(Tag.SWEEP_ID, run_id)
    try:
        with _parents_lock(store, sweep_id, storage):
            if first is not None:
                first()
            return _leave_parent(store.client, run_id, status, failure_reason)
    except databases.LockTimeout as error:
        raise TrackingUnavailable(f"sweep parent: {error}") from None


def _leave_parent(
    mlflow: MlflowClient, run_id: str, status: int, failure_reason: str | None
) -> bool:
    mine = _owner_key(processes.owner_token())
    tags = mlflow.get_run(run_id).data.tags
    if mine in tags:
        mlflow.delete_tag(run_id, mine)
    owners = [
        token for key, token in tags.items() if key.startswith(Tag.OWNER_PREFIX) and key != mine
    ]
    if any(processes.owner_alive(token) is not False for token in owners):
        return False
    if failure_reason:
        mlflow.set_tag(run_id, Tag.FAILURE_REASON, mask(failure_reason)[:_MAX_REASON])
    mlflow.set_terminated(run_id, RunStatus.to_string(status))
    return True


@dataclasses.dataclass
class Run:
    """An open MLflow run: params and per-epoch metrics are buffered and flushed in batches."""

    client: MlflowClient
    run_id: str
    _: dataclasses.KW_ONLY
    params: Mapping[str, Any] | None  # sent with the first flush, then None
    flush_interval_s: float
    description: str | None = None  # what the run is; its end puts the outcome above it
    ended: bool = dataclasses.field(default=False, init=False)
    _pending: list[Metric] = dataclasses.field(default_factory=list, init=False)
    _last_flush: float = dataclasses.field(default_factory=time.perf_counter, init=False)

    def log_epoch(self, metrics: EpochMetrics) -> None:
        """Record one epoch (step = epoch); send the buffer if flush_interval_s has passed."""
        timestamp = _now_ms()
        self._pending += [Metric(k, v, timestamp, metrics.epoch) for k, v in metrics.values.items()]
        if time.perf_counter() - self._last_flush >= self.flush_interval_s:
            self._flush()

    def log_summary(self, values: Mapping[str, float], tags: Mapping[str, str]) -> None:
        """Send the finite ``values`` as step-0 metrics, and ``tags``, now."""
        log_batch(self.client, self.run_id, metrics=_summary_metrics(values), tags=tags)

    def _flush(self, tags: Mapping[str, str] | None = None) -> None:
        log_batch(self.client, self.run_id, metrics=self._pending, params=self.params, tags=tags)
        self._pending, self.params = [], None
        self._last_flush = time.perf_counter()

    def finish(self, history: History, objective: float) -> None:
        """End the run: FINISHED, or FAILED with tags failure_reason and diverged=true if the fit
        diverged (deterministic for its config and seeds, so a report can reuse it). A fit its
        pruner stopped is FINISHED with tags pruned=true and pruned_epoch (its last epoch).

        Summary metrics objective, best_val_loss, best_epoch are logged when finite (a diverged
        run has no objective; one without a completed epoch has no best); a pruned run has no
        objective either: it did not train the budget the objective is defined over.
        """
        summary = {} if history.stopped else {M.OBJECTIVE: objective}
        if history.epochs:
            summary[M.BEST_VAL_LOSS] = history.best_val_loss
            summary[M.BEST_EPOCH] = history.best_epoch
        self._pending += _summary_metrics(summary)
        if history.diverged:
            self.end(RunStatus.FAILED, failure_reason=history.reason or "diverged", diverged=True)
        elif history.stopped:
            epoch = history.epochs[-1].epoch
            pruned = {Tag.PRUNED: "true", Tag.PRUNED_EPOCH: str(epoch)}
            self.end(RunStatus.FINISHED, outcome=f"**pruned** at epoch {epoch}", tags=pruned)
        else:
            self.end(RunStatus.FINISHED, outcome=outcome_line(history, objective))

    def end(
        self,
        status: int,
        failure_reason: str | None = None,
        diverged: bool = False,
        outcome: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Set ``status`` (a RunStatus value) and send what is buffered, with ``tags``.

        A run that finished sends its metrics first and then its status, so FINISHED always
        means complete. A run that failed or was stopped writes its status and reason first, in
        calls of their own, then the metrics it had: whatever the store does to those (a full
        disk, a lock), the run does not stay RUNNING. Only the run itself is ended: a parent run
        ends when its own work does. A run with a description gets the ``outcome`` (or the
        status and reason) as its first line.
        """
        tags = {**(tags or {})}
        if failure_reason:
            tags[Tag.FAILURE_REASON] = failure_reason
        if diverged:
            tags[Tag.DIVERGED] = "true"
        if self.description is not None:
            if outcome is None and status != RunStatus.FINISHED:
                word = "diverged" if diverged else RunStatus.to_string(status)
                outcome = f"**{word}**" + (f": {failure_reason}" if failure_reason else "")
            note = f"{outcome}\n\n{self.description}" if outcome else self.description
            tags[MlflowTag.NOTE] = note
        if status == RunStatus.FINISHED:
            self._flush(tags=tags)
            self.client.set_terminated(self.run_id, RunStatus.to_string(status))
            self.ended = True
            return
        log_batch(self.client, self.run_id, tags=tags)
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))
        self.ended = True
        try:
            self._flush()
        except Exception as error:  # the status is written; the metrics are a bonus
            log.warning("could not send the last metrics of MLflow run %s: %s", self.run_id, error)


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
    resume_run_id: str | None = None,
    created_run_id: str | None = None,
    description: str | None = None,
    dataset: DatasetRecord | None = None,
) -> Iterator[Run]:
    """Open a run with its tags (and the ``owner`` tag: this process), its ``description``
    (markdown, MLflow's tag mlflow.note.content; the run's end puts its outcome above it) and,
    if given, ``dataset`` (a dataset input) and ``artifacts_dir``; params go with the first
    flush. Passwords in tags, params and the artifacts are masked (gradalign.credentials).
    ``resume_run_id`` reopens that run (RUNNING again) instead of creating one;
    ``created_run_id`` is a RUNNING run made for this one (a sweep trial's, by its sweep loop),
    which gets its name and tags.

    Leaving the block ends the run: as ``Run.finish`` decided; FINISHED if it was not called;
    KILLED on KeyboardInterrupt or SIGTERM (its owner process gone, say); FAILED with tag
    failure_reason on any other exception. Exceptions are re-raised; if the store itself fails
    while the run is being ended, the store's error is raised instead (the run is left for
    ``python -m gradalign.doctor``), after a log line naming the run.
    """
    store = connect(tracking)
    mlflow = store.client
    run_tags = {**tags, Tag.OWNER: processes.owner_token()}
    if parent_run_id is not None:
        run_tags[MlflowTag.PARENT_RUN_ID] = parent_run_id
    if description is not None:
        run_tags[MlflowTag.NOTE] = description
    if created_run_id is not None:
        run_id = created_run_id
        log_batch(mlflow, run_id, tags={**run_tags, MlflowTag.RUN_NAME: run_name})
    elif resume_run_id is not None:
        run_id = resume_run_id
        mlflow.update_run(run_id, status="RUNNING")
        log_batch(mlflow, run_id, tags=run_tags)
    else:
        run_id = mlflow.create_run(
            store.experiment_id, tags=masked(run_tags), run_name=run_name
        ).info.run_id
    run = Run(
        mlflow,
        run_id,
        params=params,
        flush_interval_s=tracking.flush_interval_s,
        description=description,
    )
    with sigterm_raises():
        try:
            if dataset is not None:
                log_dataset(mlflow, run_id, dataset)
            if artifacts_dir is not None:
                _log_masked_artifacts(mlflow, run.run_id, artifacts_dir)
            yield run
        except (KeyboardInterrupt, Terminated) as error:
            error.mlflow_run_id = run.run_id  # for the one line that says what happened
            _end_after(run, RunStatus.KILLED, interruption_reason(error), error)
            raise
        except BaseException as error:
            error.mlflow_run_id = run.run_id
            _end_after(run, RunStatus.FAILED, failure_reason(error), error)
            raise
    if not run.ended:
        run.end(RunStatus.FINISHED)


def log_dataset(mlflow: MlflowClient, run_id: str, dataset: DatasetRecord) -> None:
    """Record ``dataset`` as the run's input. MLflow's SQL store looks the dataset up, then
    inserts it if absent, so two runs that start at once on a store new to this dataset (a
    sweep's first batch, a report's parallel finals) can both insert it, and the later one fails
    on the datasets table's primary key. Its second attempt finds the row the first wrote; a store
    that fails for any other reason fails the second attempt too, and that error is raised."""
    entity = dataset.entity()
    try:
        mlflow.log_inputs(run_id, datasets=[entity])
    except MlflowException as collision:
        log.info("dataset input of run %s collided (%s); logging it again", run_id, collision)
        mlflow.log_inputs(run_id, datasets=[entity])


def _log_masked_artifacts(mlflow: MlflowClient, run_id: str, directory: Path) -> None:
    """Log ``directory`` as the run's artifact folder of the same name, passwords masked (the
    Hydra config holds the store URLs; the files on disk are left as they are)."""
    with tempfile.TemporaryDirectory(prefix="gradalign-artifacts-") as scratch:
        copy = masked_copy(directory, Path(scratch) / directory.name)
        mlflow.log_artifacts(run_id, str(copy), directory.name)


def interruption_reason(error: BaseException) -> str:
    """The failure_reason of a run stopped by ``error`` (Ctrl-C, SIGTERM, its owner's death)."""
    if processes.orphaned:
        return f"interrupted: its owner process {processes.orphaned[0]} is gone"
    return f"interrupted ({type(error).__name__})"


def _end_after(run: Run, status: int, reason: str, error: BaseException) -> None:
    """End ``run`` with ``status`` after ``error``, unless it already ended; a store failure
    here is logged with the run's id and raised in place of nothing else."""
    if run.ended:
        return
    try:
        run.end(status, failure_reason=reason)
    except Exception as store_error:
        log.error(
            "could not mark MLflow run %s %s (%s); python -m gradalign.doctor will",
            run.run_id,
            RunStatus.to_string(status),
            store_error,
        )
        if isinstance(error, Exception):  # an interruption stays an interruption
            raise store_error from error
