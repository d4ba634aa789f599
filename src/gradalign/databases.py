"""Stores on a database server (PostgreSQL): work that one process at a time may do on a
database, across processes and machines, and the race when a schema is created.

Optuna's storage and MLflow's tracking store create their schema on first use when they find
none. Several processes that start together on an empty PostgreSQL database race on it: the
second ``CREATE TABLE`` or ``CREATE TYPE`` of one name waits for the first and then fails with
``UniqueViolation ... pg_type_typname_nsp_index`` (or on ``alembic_version``). A file lock
cannot serialise that across machines; a PostgreSQL advisory lock, held by one session of the
database itself, can. ``exclusive(url, name)`` takes one (on its own connection, so the caller's
transactions are not involved); ``schema_created(url, create)`` creates a schema under it and
retries the race with a process that does not take it (an ``mlflow server`` starting at the same
moment, say). On a SQLite file, processes on one machine take turns under a file lock beside it
(``store_lock``): two sweeps starting together on a new Optuna storage would otherwise both
create its tables, and one fail on ``alembic_version``. A new SQLite store is made beside its
final name and renamed into place once its schema is complete (``created_aside``), so a process
killed while making it leaves no file, never a half-made one. For any other URL both just run.

A store on a server can restart under a running sweep. SQLAlchemy checks a pooled connection
before using it (``pool_pre_ping``: Optuna's storage is opened with it, MLflow's store sets it
itself), and ``retrying`` repeats a call that met a server that is down or restarting, for a
bounded time, then raises ``StoreUnavailable`` naming the store.

Optuna and MLflow cannot share one database: both keep their schema revision in a table named
``alembic_version``. ``check_separate`` says so before anything is created.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from filelock import FileLock
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)

from gradalign.checks import UserError
from gradalign.credentials import mask

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

log = logging.getLogger(__name__)
T = TypeVar("T")
_SQLITE = "sqlite:///"
SCHEMA = "gradalign:schema"  # the name of the lock held while a schema is created
# SQLSTATEs of the creation race: unique_violation (pg_type_typname_nsp_index,
# alembic_version_pkc), duplicate_table, duplicate_object, deadlock_detected.
RACE_SQLSTATES = frozenset({"23505", "42P07", "42710", "40P01"})
RACE_ATTEMPTS = 5
RACE_PAUSE_S = 0.5  # times the attempt number, plus up to as much again at random


# SQLite's answers that no retry changes: a full disk, a read-only or damaged file.
PERMANENT = (
    "disk I/O error",
    "database or disk is full",
    "attempt to write a readonly database",
    "database disk image is malformed",
)
_DOCTOR = "then python -m gradalign.doctor ends what this left open"
# What each of PERMANENT means, and what to do.
FAULTS = {
    "database or disk is full": "could not be written (database or disk is full): free space "
    f"on its disk, {_DOCTOR}",
    "attempt to write a readonly database": "could not be written (attempt to write a readonly "
    f"database): make the file and its folder writable, {_DOCTOR}",
    "disk I/O error": f"could not be read or written (disk I/O error): check its disk, {_DOCTOR}",
    "database disk image is malformed": "is damaged (database disk image is malformed): no "
    "command can use it. Move it aside (its records stay in the moved file; sqlite3's .recover "
    "may save them into a new one) or restore a backup, then rerun; a new store starts empty",
}
# Waits between attempts of a call that met a transient fault, with up to as much again at random
# (writers that collided do not retry in step); the last one repeats until the deadline.
RETRY_WAITS_S = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8)


class LockTimeout(RuntimeError):
    """An advisory lock was not granted in time: another process holds it."""


class StoreUnavailable(UserError, RuntimeError):
    """A store (Optuna's storage, MLflow's store) cannot be used now: the message names it
    (its password masked) and says what to do."""

    def __init__(self, message: str):
        super().__init__(mask(message))


def postgres_url(url: str) -> URL | None:
    """``url`` parsed, if it names a PostgreSQL database (any driver); else None."""
    try:
        parsed = make_url(url)
    except ArgumentError:  # not a database URL (http://, a path)
        return None
    return parsed if parsed.get_backend_name() == "postgresql" else None


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL; None for any other store."""
    return Path(url[len(_SQLITE) :]).resolve() if url.startswith(_SQLITE) else None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on the file ``path`` (created if absent), across processes of this
    machine; StoreUnavailable naming the folder when the lock file cannot be created there (a
    read-only folder or file system)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path)
        lock.acquire()
    except OSError as error:
        raise StoreUnavailable(
            f"store folder {path.parent} is not writable: cannot create the lock file "
            f"{path.name} ({error.strerror or error}); make the folder writable, or use a store "
            "elsewhere"
        ) from None
    try:
        yield
    finally:
        lock.release()


def lock_key(name: str) -> int:
    """The signed 64-bit advisory-lock key of ``name``, the same in every process."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def exclusive(url: str, name: str, timeout_s: float) -> Iterator[None]:
    """Hold the advisory lock ``name`` of the PostgreSQL database ``url`` for the block, waiting
    up to ``timeout_s`` for it (then LockTimeout); for other URLs, nothing.

    The lock belongs to a connection of its own, so it is released when the block ends or the
    process dies, whatever the block's own connections do.
    """
    parsed = postgres_url(url)
    if parsed is None:
        yield
        return
    import psycopg  # only PostgreSQL users need the driver (gradalign[postgres])
    from psycopg import errors

    dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)

    def connect() -> psycopg.Connection:
        try:
            return psycopg.connect(dsn, autocommit=True)
        except psycopg.OperationalError as error:  # a server down or restarting: transient
            raise OperationalError("connect", None, error) from None

    with retrying(mask(url), timeout_s, connect) as connection:
        connection.execute(
            "SELECT set_config('lock_timeout', %s, false)", (f"{int(timeout_s * 1000)}ms",)
        )
        try:
            connection.execute("SELECT pg_advisory_lock(%s)", (lock_key(name),))
        except errors.LockNotAvailable:
            raise LockTimeout(
                f"{mask(url)}: lock {name!r} not granted in {timeout_s:g} s; another process "
                "holds it (a stuck one can be found in pg_locks, locktype 'advisory')"
            ) from None
        try:
            yield
        finally:
            # A server that restarted meanwhile has ended the connection, and the lock with it.
            with contextlib.suppress(psycopg.OperationalError):
                connection.execute("SELECT pg_advisory_unlock(%s)", (lock_key(name),))


def store_lock(url: str, name: str, timeout_s: float) -> contextlib.AbstractContextManager[Any]:
    """The lock ``name`` of the store at ``url``, for work one process at a time may do on it:
    a PostgreSQL advisory lock (across machines; LockTimeout after ``timeout_s``), a file lock
    beside a SQLite file (``<name of the file>.lock``, on one machine, whatever ``name``), or
    none for any other store."""
    db = sqlite_file(url)
    if db is not None:
        return file_lock(db.parent / f"{db.name}.lock")
    return exclusive(url, name, timeout_s)


def is_creation_race(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is PostgreSQL's answer to two
    processes creating the same table, type or row at once."""
    seen: BaseException | None = error
    while seen is not None:
        orig = getattr(seen, "orig", None)  # SQLAlchemy's wrapper of the driver's error
        if getattr(orig, "sqlstate", None) in RACE_SQLSTATES:
            return True
        if getattr(seen, "sqlstate", None) in RACE_SQLSTATES:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def schema_created(url: str, create: Callable[[], T], timeout_s: float) -> T:
    """``create()`` (which opens the store at ``url``, creating its schema if there is none)
    under the lock ``SCHEMA`` of a PostgreSQL database, again after a pause when it lost the
    creation race to a process that does not take the lock; its result. On a SQLite file the
    lock is the file lock beside it (``store_lock``)."""
    with store_lock(url, SCHEMA, timeout_s):
        for attempt in range(1, RACE_ATTEMPTS + 1):
            try:
                return create()
            except Exception as error:
                if attempt == RACE_ATTEMPTS or not is_creation_race(error):
                    raise
                pause = RACE_PAUSE_S * attempt * (1 + random.random())
                log.warning(
                    "%s: another process created the schema at the same moment (attempt %d); "
                    "retrying in %.1f s",
                    mask(url),
                    attempt,
                    pause,
                )
                time.sleep(pause)
    raise AssertionError("unreachable")


def created_aside(db: Path, create: Callable[[str], None]) -> None:
    """Make the SQLite store ``db`` whole or not at all: ``create(url)`` builds it at a temporary
    name beside ``db`` (and must leave no connection open on it), which is then renamed to
    ``db``. A ``db`` that exists and is not empty is left alone; an empty one (a file touched, or
    one a process that was killed left) is replaced. Call it under ``store_lock``:
    leftovers of a killed creator are removed first."""
    if db.is_file() and db.stat().st_size > 0:
        return
    for leftover in db.parent.glob(f".{db.name}.*.creating*"):
        leftover.unlink(missing_ok=True)
    aside = db.parent / f".{db.name}.{os.getpid()}.creating"
    try:
        create(f"{_SQLITE}{aside}")
        os.replace(aside, db)
    finally:
        for left in db.parent.glob(f"{aside.name}*"):  # the file, a journal if any
            left.unlink(missing_ok=True)


def permanent_fault(error: BaseException) -> str | None:
    """Which of PERMANENT ``error`` (or an error it was raised from) is, if any."""
    seen: BaseException | None = error
    while seen is not None:
        found = next((fault for fault in PERMANENT if fault in str(seen)), None)
        if found is not None:
            return found
        seen = seen.__cause__ or seen.__context__
    return None


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is a database that did not answer now
    but may soon: a connection refused or lost (a server restarting), or a SQLite file locked by
    another writer; not a full disk, a read-only or damaged file, nor a bad query."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, StoreUnavailable):  # waited for already, by an inner retrying
            return False
        if isinstance(seen, OperationalError | InterfaceError) or (
            isinstance(seen, DBAPIError) and seen.connection_invalidated
        ):
            return not any(fault in str(seen) for fault in PERMANENT)
        seen = seen.__cause__ or seen.__context__
    return False


def retrying(
    what: str,
    wait_s: float,
    call: Callable[[], T],
    unavailable: type[StoreUnavailable] = StoreUnavailable,
) -> T:
    """``call()``, again after a backoff while it fails with a transient database error
    (``is_transient``), until ``wait_s`` have passed; then ``unavailable`` naming ``what`` (the
    store), the last error and what to do. A fault no retry changes (a full disk, a read-only
    or damaged file: ``permanent_fault``) is ``unavailable`` at once, naming SQLite's own
    reason. Retry only calls that are safe to repeat: a write whose transaction failed was
    rolled back whole."""
    deadline = time.monotonic() + wait_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except StoreUnavailable:
            raise
        except Exception as error:
            fault = permanent_fault(error)
            if fault is not None:
                raise unavailable(f"{what} {FAULTS[fault]}") from None
            if not is_transient(error):
                raise
            reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
            wait = RETRY_WAITS_S[min(attempt, len(RETRY_WAITS_S)) - 1] * (1 + random.random())
            if time.monotonic() + wait > deadline:
                advice = (
                    "another process holds its write lock: stop it, or wait and rerun"
                    if "locked" in reason
                    else "start it again (or wait for it) and rerun"
                )
                raise unavailable(
                    f"{what} did not answer for {wait_s:g} s ({attempt} "
                    f"attempt{'s' * (attempt > 1)}; {reason}): "
                    f"{advice}"
                ) from None
            log.warning("%s: %s (attempt %d); retrying in %.1f s", what, reason, attempt, wait)
            time.sleep(wait)


def check_separate(optuna_url: str, mlflow_url: str) -> None:
    """Raise ValueError if the Optuna storage and the MLflow store are one PostgreSQL database."""
    optuna_db, mlflow_db = postgres_url(optuna_url), postgres_url(mlflow_url)
    if optuna_db is None or mlflow_db is None:
        return
    where = ("host", "port", "database")
    if [getattr(optuna_db, k) for k in where] == [getattr(mlflow_db, k) for k in where]:
        raise ValueError(
            f"the Optuna storage and the MLflow store are one database ({mask(optuna_url)}): "
            "both keep their schema revision in a table alembic_version, so each needs its own "
            "database (CREATE DATABASE optuna; CREATE DATABASE mlflow)"
        )


def schema_revision(url: str) -> str | None:
    """The alembic revision of the schema in the database at ``url`` (Optuna and MLflow each
    keep theirs in ``alembic_version``), read without changing anything: a SQLite file is opened
    read-only and never created. None for a database with no schema yet."""
    db = sqlite_file(url)
    if db is not None and not db.is_file():
        return None
    engine = (
        create_engine(url)
        if db is None
        else create_engine(
            "sqlite://", creator=lambda: sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
        )
    )
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except SQLAlchemyError:  # no such table (an empty database), or not a database at all
        return None
    finally:
        engine.dispose()


def check_schema(
    url: str,
    script: ScriptDirectory,
    program: str,
    upgrade: str,
    unavailable: type[StoreUnavailable] = StoreUnavailable,
) -> None:
    """Raise ``unavailable`` if the database at ``url`` has a schema other than the installed
    ``program``'s head revision (in ``script``), naming the command that upgrades it: an older
    schema would otherwise be migrated silently, one way, on first use."""
    current = schema_revision(url)
    head = script.get_current_head()
    if current is None or current == head:
        return
    where = mask(url)
    if current in {revision.revision for revision in script.walk_revisions()}:
        raise unavailable(
            f"{where} was written by an older {program} (schema {current}; the installed one "
            f"needs {head}, and would migrate it one way, so the older one can no longer read "
            f"it). Back it up, then run: {upgrade}"
        )
    raise unavailable(
        f"{where} was written by a newer {program} (schema {current} is unknown to the "
        "installed one): install that version, or use another store"
    )
