"""gradalign.databases without a server: which URLs are PostgreSQL, the lock key, what counts as
the schema-creation race and how often it is retried, and one database for two programs refused.
The real server is exercised by tests/test_postgres.py."""

import hashlib
import multiprocessing

import optuna
import pytest
from sqlalchemy.exc import IntegrityError

from gradalign import databases, optuna_storage


@pytest.mark.parametrize(
    ("url", "is_postgres"),
    [
        ("postgresql+psycopg://u:p@127.0.0.1:5432/db", True),
        ("postgresql://u@h/db", True),
        ("postgresql+psycopg2://h/db", True),
        ("sqlite:////tmp/x.db", False),
        ("mysql://h/db", False),
        ("http://127.0.0.1:5000", False),
        ("/a/path", False),
    ],
)
def test_postgres_urls_are_recognised_whatever_the_driver(url, is_postgres):
    assert (databases.postgres_url(url) is not None) == is_postgres


def test_the_lock_key_is_a_fixed_signed_64_bit_number_per_name():
    key = databases.lock_key(databases.SCHEMA)
    assert key == int.from_bytes(
        hashlib.sha256(b"gradalign:schema").digest()[:8], "big", signed=True
    )
    assert -(2**63) <= key < 2**63
    assert databases.lock_key("other") != key


class DriverError(Exception):
    def __init__(self, sqlstate):
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


def wrapped(sqlstate):
    """What SQLAlchemy raises for a driver error, raised again by the caller (as MLflow does)."""
    try:
        raise IntegrityError("CREATE TYPE studydirection", {}, DriverError(sqlstate))
    except IntegrityError as error:
        try:
            raise RuntimeError("could not create the store") from error
        except RuntimeError as outer:
            return outer


@pytest.mark.parametrize("sqlstate", ["23505", "42P07", "42710", "40P01"])
def test_the_creation_race_is_recognised_through_wrapping_errors(sqlstate):
    assert databases.is_creation_race(wrapped(sqlstate))


def test_other_database_errors_are_not_the_race():
    assert not databases.is_creation_race(wrapped("28P01"))  # wrong password
    assert not databases.is_creation_race(ValueError("no"))


def test_a_lost_race_is_retried_and_other_errors_are_not(monkeypatch):
    monkeypatch.setattr(databases.time, "sleep", lambda s: None)
    attempts = []

    def create():
        attempts.append(1)
        if len(attempts) < 3:
            raise wrapped("23505")
        return "store"

    assert databases.schema_created("sqlite:////tmp/x.db", create, 1) == "store"
    assert len(attempts) == 3

    def broken():
        attempts.append(1)
        raise wrapped("28P01")

    attempts.clear()
    with pytest.raises(RuntimeError):
        databases.schema_created("sqlite:////tmp/x.db", broken, 1)
    assert len(attempts) == 1

    def always_racing():
        attempts.append(1)
        raise wrapped("42P07")

    attempts.clear()
    with pytest.raises(RuntimeError):
        databases.schema_created("sqlite:////tmp/x.db", always_racing, 1)
    assert len(attempts) == databases.RACE_ATTEMPTS


def test_optuna_and_mlflow_in_one_database_are_refused_naming_no_password():
    with pytest.raises(ValueError, match="alembic_version") as error:
        databases.check_separate(
            "postgresql+psycopg://ci:s3cret@h:5432/study", "postgresql://ci:s3cret@h:5432/study"
        )
    assert "s3cret" not in str(error.value)
    databases.check_separate("postgresql://h:5432/optuna", "postgresql://h:5432/mlflow")
    databases.check_separate("sqlite:////tmp/o.db", "http://127.0.0.1:5000")


def _open_after(barrier, url, opener, results):
    barrier.wait()  # every process opens the fresh file at the same moment
    try:
        opener(url)
        results.put("ok")
    except Exception as error:  # the failure is the result: reported to the test
        results.put(f"{type(error).__name__}: {str(error).splitlines()[0]}")


def _lock_and_open(url):
    optuna_storage.open_storage(url, 60)


def _open_bare(url):
    optuna.storages.RDBStorage(url)


def _open_together(tmp_path, opener, processes=4):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    started = [
        context.Process(target=_open_after, args=(barrier, url, opener, results))
        for _ in range(processes)
    ]
    for process in started:
        process.start()
    for process in started:
        process.join(120)
    return sorted(results.get(timeout=5) for _ in started)


def test_sweeps_opening_a_new_sqlite_storage_together_create_its_schema_once(tmp_path):
    """Sweeps a study starts side by side on a new Optuna storage (two at once by default):
    each opens it, and without the lock beside the file more than one creates its tables and
    the later ones fail on alembic_version."""
    assert _open_together(tmp_path, _lock_and_open) == ["ok"] * 4
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert storage.get_all_studies() == []  # a complete, current schema


def test_a_new_sqlite_store_is_whole_or_absent_whatever_stops_its_creation(tmp_path):
    db = tmp_path / "optuna.db"

    def interrupted(url):
        optuna.storages.RDBStorage(url).engine.dispose()  # a schema, made aside
        raise KeyboardInterrupt  # stopped before the rename

    with pytest.raises(KeyboardInterrupt):
        databases.created_aside(db, interrupted)
    assert list(tmp_path.iterdir()) == []  # no store, no leftover
    (tmp_path / ".optuna.db.123.creating").write_bytes(b"half")  # a creator killed (kill -9)
    db.write_bytes(b"")  # and an empty file where the store goes
    databases.created_aside(db, lambda url: optuna.storages.RDBStorage(url).engine.dispose())
    assert [p.name for p in tmp_path.iterdir()] == ["optuna.db"]
    assert optuna.storages.RDBStorage(f"sqlite:///{db}").get_all_studies() == []
    before = db.read_bytes()
    databases.created_aside(db, lambda url: pytest.fail("a store that exists is made again"))
    assert db.read_bytes() == before


def test_a_sqlite_store_s_schema_revision_is_read_without_touching_it(tmp_path):
    folder = tmp_path / "a dir?#"  # characters a SQLite URI would otherwise take as its own
    folder.mkdir()
    absent, junk, storage = folder / "absent.db", folder / "junk.db", folder / "optuna.db"
    assert databases.schema_revision(f"sqlite:///{absent}") is None
    assert not absent.exists()  # read-only: never created
    junk.write_text("not a database")
    assert databases.schema_revision(f"sqlite:///{junk}") is None
    optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    (tmp_path / "optuna.db").rename(storage)
    before = hashlib.sha256(storage.read_bytes()).hexdigest()
    assert databases.schema_revision(f"sqlite:///{storage}") == "v3.2.0.a"  # Optuna 5's head
    assert hashlib.sha256(storage.read_bytes()).hexdigest() == before


def test_stores_init_creates_each_sqlite_schema_once(tmp_path):
    from gradalign import stores

    optuna_url, mlflow_url = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'm.db'}"
    first = stores.init(optuna_url, mlflow_url, wait_s=60)
    assert [line.endswith("(created)") for line in first] == [True, True]
    again = stores.init(optuna_url, mlflow_url, wait_s=60)
    assert again == [line.replace("(created)", "(already there)") for line in first]
