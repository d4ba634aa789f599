"""Access to the MLflow store: which store, a client that survives a busy SQLite file, probes.

Store: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``tracking.default_uri`` (SQLite in
``mlruns/``). Experiments created in a SQLite store keep their artifacts beside the database file,
in ``artifacts/``, so a temporary store (tests) never writes into the repository. A tracking
server (``http(s)://``) is probed once per process before anything is written, so an unreachable
one fails in seconds with its URI in the message instead of after MLflow's minutes of retries.

Concurrency and restarts: parallel workers share one SQLite file, which admits one writer at a
time; a call that still finds it locked after the time MLflow lets SQLite wait (``busy_timeout``),
or that meets a database server that is down or restarting, is retried with jittered exponential
backoff for ``tracking.store_wait_s`` (``client`` wraps every call; gradalign.databases), so a
busy or restarted store delays a trial but never loses it. A new SQLite store is created whole
or not at all (``databases.created_aside``). Clients and experiment ids are cached per process,
so a sweep pays for MLflow's import and the store's set-up once.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import logging
import os
import shlex
import signal
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from alembic.script import ScriptDirectory
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH as _MAX_ENTITIES
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH as _MAX_PARAMS_OR_TAGS
from omegaconf import DictConfig
from sqlalchemy.exc import SQLAlchemyError

from gradalign import databases
from gradalign.config import ConfigError, anchored_uri
from gradalign.credentials import mask
from gradalign.tracking.labels import experiment_tags

log = logging.getLogger(__name__)

_POOL_CLASS = "MLFLOW_SQLALCHEMYSTORE_POOLCLASS"
# How long the probe of a tracking server may take before the run fails.
CONNECT_TIMEOUT_S = 10.0
# MLflow's own HTTP retries (7, doubling, 120 s timeouts: minutes of silence on a failing
# server), bounded unless the user set them.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
for _name, _value in _HTTP_DEFAULTS.items():
    os.environ.setdefault(_name, _value)


class TrackingUnavailable(databases.StoreUnavailable):
    """The MLflow store cannot be used (a server that does not answer, a file that is not a
    usable database, a lock that is not released); the message names it (its password masked)
    and what to do."""


def _unhandled(record: logging.LogRecord) -> bool:
    """Whether to keep an MLflow log record: not the error tracebacks of store faults this
    module handles, a locked SQLite store or a database server that went away (the call is
    retried, and one warning line says so) and one that cannot take a write
    (TrackingUnavailable says so in one line)."""
    error = record.exc_info[1] if record.exc_info else None
    if error is not None and databases.is_transient(error):
        return False
    return not any(fault in record.getMessage() for fault in databases.PERMANENT)


logging.getLogger("mlflow.store.db.utils").addFilter(_unhandled)
# urllib3 warns of each retry of MLflow's HTTP calls (ten lines before a server's refusal is
# raised); the call's outcome is what the user sees, in one line.
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def tracking_uri(tracking: DictConfig) -> str:
    """The store URI: tracking.uri, else $MLFLOW_TRACKING_URI, else tracking.default_uri; a
    relative SQLite path is taken from ``tracking.root`` (the repository root), as every path of
    the config is."""
    uri = tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_uri
    return anchored_uri(uri, tracking.root)


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


def _retrying(uri: str, wait_s: float, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)`` with signals held (see ``_signals_held``), again after a
    backoff while the store is locked or its server does not answer, until ``wait_s`` have
    passed (``databases.retrying``); then TrackingUnavailable naming the store. A store that
    cannot take a write (a full disk, a read-only or damaged file) is TrackingUnavailable at
    once, with SQLite's reason and what to do (databases.FAULTS).

    Safe for writes: a failed transaction is rolled back whole before MLflow raises.
    """

    def attempt() -> Any:
        with _signals_held():
            return call(*args, **kwargs)

    return databases.retrying(f"MLflow store {uri}", wait_s, attempt, TrackingUnavailable)


@dataclasses.dataclass(frozen=True)
class _RetryingClient:
    """An MlflowClient whose every method retries while the SQLite store is locked."""

    _client: MlflowClient
    _uri: str
    _wait_s: float

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute
        return functools.partial(_retrying, self._uri, self._wait_s, attribute)

    def create_run_once(
        self, experiment_id: str, *, tags: Mapping[str, str], run_name: str, key: Mapping[str, str]
    ) -> str:
        """Create a run with ``tags`` (which include ``key``: tags no other run has) and
        ``run_name``; its id. Exactly once: a fault can hide whether the store created it (a
        server that restarted as it committed), so each retry first looks for the run by
        ``key``."""
        attempts = 0

        def create() -> str:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                found = self._client.search_runs([experiment_id], tag_filter(key), max_results=1)
                if found:
                    return found[0].info.run_id
            created = self._client.create_run(experiment_id, tags=tags, run_name=run_name)
            return created.info.run_id

        return _retrying(self._uri, self._wait_s, create)


def check_reachable(uri: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise TrackingUnavailable unless the tracking server at ``uri`` answers its ``/health``
    and one read of its API within ``timeout_s`` each (401/403 count as an answer: credentials
    are MLflow's business); stores that are not servers are not probed."""
    if not uri.startswith(("http://", "https://")):
        return
    base, headers = _without_credentials(uri.rstrip("/"))
    api = "/api/2.0/mlflow/experiments/search?max_results=1"
    for path, what in (("/health", "not an MLflow tracking server"), (api, "its API fails")):
        try:
            request = urllib.request.Request(f"{base}{path}", headers=headers)
            urllib.request.urlopen(request, timeout=timeout_s).close()
            continue
        except urllib.error.HTTPError as error:
            if error.code in (401, 403):
                return
            problem = f"HTTP {error.code} on {path.split('?')[0]}: {what}"
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            problem = f"unreachable: {reason}; waited at most {timeout_s:g} s"
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} ({problem}): start it, or point tracking.uri / "
            "MLFLOW_TRACKING_URI at a running one. Nothing was logged."
        )


def _without_credentials(url: str) -> tuple[str, dict[str, str]]:
    """(``url`` without its ``user:password@``, the basic-auth header that carries them), as
    MLflow's client sends them; urllib would take them for part of the host."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, {}
    netloc = parts.netloc.rpartition("@")[2]
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return parts._replace(netloc=netloc).geturl(), {"Authorization": f"Basic {token}"}


@functools.cache
def client(uri: str, wait_s: float) -> MlflowClient:
    """The client of store ``uri`` for this process, retrying for up to ``wait_s`` while SQLite
    is locked.

    A server is probed first (check_reachable). Creating a client creates the schema of an empty
    database store, which processes starting together on a fresh store would race on: they take
    turns, under a file lock beside a SQLite file, or under the database's own lock on a server
    (gradalign.databases).
    """
    check_reachable(uri)
    if mask(uri) != uri:  # MLflow prints a server run's URL as it ends: with the password
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    db = databases.sqlite_file(uri)
    if db is None:
        try:
            created = databases.schema_created(uri, lambda: MlflowClient(tracking_uri=uri), wait_s)
        except databases.LockTimeout as error:
            raise TrackingUnavailable(f"MLflow store {error}") from None
        return _RetryingClient(created, uri, wait_s)
    if not db.parent.is_dir():
        raise TrackingUnavailable(
            f"MLflow store {uri}: directory {db.parent} does not exist (a relative path is taken "
            "from the repository root). Create it, or fix tracking.uri / MLFLOW_TRACKING_URI"
        )
    with databases.store_lock(uri, databases.SCHEMA, wait_s):  # held while a schema is made
        try:
            databases.created_aside(db, _create_store)  # whole, or no file at all
        except (SQLAlchemyError, MlflowException, OSError) as error:
            raise TrackingUnavailable(_unusable(db, error)) from None
        _check_mlflow_schema(uri)
        try:
            opened = _retrying(uri, wait_s, MlflowClient, tracking_uri=uri)
        except (SQLAlchemyError, MlflowException) as error:
            raise TrackingUnavailable(_unusable(db, error)) from None
    return _RetryingClient(opened, uri, wait_s)


def _create_store(url: str) -> None:
    """Create the MLflow store at the SQLite ``url`` (its schema and default experiment),
    keeping no connection to it open (MLflow's documented pool setting), so it can be moved.
    MLflow's and alembic's loggers are held at WARNING meanwhile: a new store's creation logs
    a line per migration step, which says nothing a user needs."""
    previous = os.environ.get(_POOL_CLASS)
    os.environ[_POOL_CLASS] = "NullPool"
    loggers = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        MlflowClient(tracking_uri=url)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if previous is None:
            del os.environ[_POOL_CLASS]
        else:
            os.environ[_POOL_CLASS] = previous


def _check_mlflow_schema(uri: str) -> None:
    from mlflow.store.db.utils import _get_alembic_config  # MLflow's migrations (no public API)

    script = ScriptDirectory.from_config(_get_alembic_config(db_url=""))
    databases.check_schema(uri, script, "MLflow", f"mlflow db upgrade {uri}", TrackingUnavailable)


def _unusable(db: Path, error: Exception) -> str:
    """Why the SQLite file ``db`` cannot be opened as an MLflow store, and what to do."""
    reason = str(getattr(error, "orig", None) or error).splitlines()[0]
    if "readonly" in reason or "read-only" in reason:
        return f"MLflow store {db} is read-only ({reason}): make it writable, or use another store"
    return (
        f"MLflow store {db} cannot be opened ({reason}): it is not an MLflow SQLite database or "
        f"it is damaged. Move it aside (mv {db} {db}.broken) or point tracking.uri elsewhere"
    )


@dataclasses.dataclass(frozen=True)
class Store:
    """The MLflow store and experiment a process writes to, made by ``connect`` (its client
    and experiment once per process). The sweeper makes it in its pre-flight check and passes
    it to every write of its own; a job and the report call ``connect`` where they start."""

    uri: str
    wait_s: float  # how long a call waits for a locked or restarting store (tracking.store_wait_s)
    experiment: str  # its name
    experiment_id: str
    client: MlflowClient


def connect(tracking: DictConfig) -> Store:
    """The configured store and experiment (created if absent); see ``client`` and
    ``experiment_id``, which make each once per process."""
    uri = tracking_uri(tracking)
    wait_s = tracking.store_wait_s
    mlflow = client(uri, wait_s)
    experiment = experiment_id(uri, wait_s, tracking.experiment)
    return Store(uri, wait_s, tracking.experiment, experiment, mlflow)


@functools.cache
def experiment_id(uri: str, wait_s: float, name: str) -> str:
    """Id of experiment ``name``, created if absent (tolerating a concurrent creator), with the
    tags for MLflow's UI it lacks (labels.experiment_tags; a description or view a user wrote
    is never replaced)."""
    mlflow = client(uri, wait_s)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        db = databases.sqlite_file(uri)
        try:
            return mlflow.create_experiment(
                name,
                artifact_location=str(db.parent / "artifacts") if db else None,
                tags=experiment_tags(),
            )
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = mlflow.get_experiment_by_name(name)
    if experiment.lifecycle_stage != "active":
        raise ConfigError(
            f"invalid config value tracking.experiment={name!r}: the MLflow experiment is "
            f"deleted in {mask(uri)}: restore it (mlflow experiments restore) or set "
            "tracking.experiment to another name"
        )
    for key, value in experiment_tags().items():
        if key not in experiment.tags:
            mlflow.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def ui_url(tracking: DictConfig) -> str:
    """The MLflow UI that shows the configured store: tracking.ui_url; else the tracking server
    itself, without the user and password a tracking URI may carry (a printed link must not
    show them); else tracking.default_ui_url (where ``mlflow ui`` serves by default)."""
    if tracking.ui_url:
        return str(tracking.ui_url).rstrip("/")
    uri = tracking_uri(tracking)
    if uri.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(uri)
        return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl().rstrip("/")
    return str(tracking.default_ui_url).rstrip("/")


def serve_command(tracking: DictConfig) -> str | None:
    """The command that serves the UI of the configured store, when it is not a server:
    gradalign.ui, which starts it fast and prints the links to each experiment's runs."""
    uri = tracking_uri(tracking)
    if uri.startswith(("http://", "https://")):
        return None
    chosen = f" -- {shlex.quote(f'tracking.uri={uri}')}" if tracking.uri else ""
    return mask(f"python -m gradalign.ui{chosen}")


def log_batch(
    client: MlflowClient,
    run_id: str,
    *,
    metrics: Sequence[Metric] = (),
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> None:
    """Log everything in as few calls as MLflow's batch limits allow (one, usually); passwords
    in params and tags masked (gradalign.credentials)."""
    param_list = [Param(key, mask(str(value))) for key, value in (params or {}).items()]
    tag_list = [RunTag(key, mask(str(value))) for key, value in (tags or {}).items()]
    metric_list = list(metrics)
    n = _MAX_PARAMS_OR_TAGS
    while param_list or tag_list or metric_list:
        chunk_params, param_list = param_list[:n], param_list[n:]
        chunk_tags, tag_list = tag_list[:n], tag_list[n:]
        room = _MAX_ENTITIES - len(chunk_params) - len(chunk_tags)
        chunk_metrics, metric_list = metric_list[:room], metric_list[room:]
        client.log_batch(run_id, metrics=chunk_metrics, params=chunk_params, tags=chunk_tags)


def tag_filter(tags: Mapping[str, str]) -> str:
    """An MLflow search filter matching runs with all of ``tags``."""
    return " and ".join(f"tags.{key} = {quoted(value)}" for key, value in tags.items())


def quoted(value: str) -> str:
    """``value`` quoted for an MLflow search filter (in double quotes if it holds a single one)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' in value:
        raise ValueError(f"{value!r} holds both quote characters: MLflow filters cannot match it")
    return f'"{value}"'
