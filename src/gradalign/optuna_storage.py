"""Opening an Optuna storage, the one way every process does: the sweep, a trial's job that
reports epochs to its pruner, the report, a study, the doctor and the store check.

A storage is a database URL (``sqlite:///...``, ``postgresql+psycopg://...``), opened with pooled
connections checked before use, its schema created once (gradalign.databases), a new SQLite file
whole or not at all; or a journal file (a pruned sweep without a storage). A module of its own
below both the sweep and the report, which never import each other, and apart from
gradalign.databases, so that a plain training run never loads Optuna.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from gradalign import databases


def _rdb(url: str) -> RDBStorage:
    """Optuna's storage at the database ``url``, its pooled connections checked before use (a
    database server that restarted has closed them)."""
    return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def _create_rdb(url: str) -> None:
    _rdb(url).engine.dispose()  # the schema made, no connection left open on the file


def open_storage(spec: str, wait_s: float) -> BaseStorage:
    """The Optuna storage ``spec``: a database URL (its schema created if the database has
    none, by one process at a time, waiting up to ``wait_s`` for another creator; a new SQLite
    file made aside and renamed into place), or the path of a journal file."""
    if "://" not in spec:
        return JournalStorage(JournalFileBackend(spec))
    db = databases.sqlite_file(spec)

    def create() -> RDBStorage:
        if db is not None:
            databases.created_aside(db, _create_rdb)
        return _rdb(spec)

    try:
        return databases.schema_created(spec, create, wait_s)
    except databases.LockTimeout as error:
        raise ValueError(f"hydra.sweeper.storage: {error}") from None


@contextlib.contextmanager
def opened(spec: str, wait_s: float) -> Iterator[BaseStorage]:
    """``open_storage(spec, wait_s)`` for the block, its pooled connections closed when the block
    ends (a reader holds none while the report trains after it)."""
    storage = open_storage(spec, wait_s)
    try:
        yield storage
    finally:
        if isinstance(storage, RDBStorage):
            storage.engine.dispose()
