"""PostgreSQL for real (slow, services): the server .ci/run starts on 127.0.0.1
(scripts/ci/postgres.sh). Schemas created by processes that start at the same moment on empty
databases; two sweep processes sharing one Optuna study on a fresh database, tracked by an
`mlflow server` whose store is PostgreSQL too: every trial in both stores, once, one parent,
nothing RUNNING, and no password in any record."""

import multiprocessing
import shlex
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from services import fresh_database, mlflow_server, postgres, postgres_server
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from test_faults import assert_stores_agree
from test_scale import (
    assert_complete_and_tracked,
    environment,
    run_together,
    runs,
    study_trials,
    sweep_command,
)

from gradalign import stores
from gradalign.schema import Metric

pytestmark = [pytest.mark.slow, pytest.mark.services]
OPTUNA_HEAD = "v3.2.0.a"  # Optuna 4.9 - 5.x


@pytest.fixture(scope="module")
def server():
    url = postgres_server()
    password = make_url(url).password or ""
    assert len(password) >= 12, "the test server's password must be distinctive (postgres.sh)"
    return url


def rows(url, query):
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(query))]
    finally:
        engine.dispose()


def mlflow_head():
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    return ScriptDirectory.from_config(_get_alembic_config(db_url="")).get_current_head()


def _init_at_barrier(barrier, optuna_url, mlflow_url, results):
    """One of several processes: imports done, wait for the others, then init both stores."""
    barrier.wait(timeout=300)
    try:
        stores.init(optuna_url, mlflow_url, wait_s=300)
        results.put("ok")
    except BaseException as error:
        results.put(f"{type(error).__name__}: {error}")


def test_stores_init_started_at_once_on_empty_databases_creates_each_schema_once(server):
    """Without the lock, 2 starters failed 8 times in 10 on Optuna's schema and 10 in 10 on
    MLflow's (UniqueViolation on pg_type_typname_nsp_index)."""
    optuna_url = fresh_database(server, "init_optuna")
    mlflow_url = fresh_database(server, "init_mlflow")
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(3), context.Queue()
    starters = [
        context.Process(target=_init_at_barrier, args=(barrier, optuna_url, mlflow_url, results))
        for _ in range(3)
    ]
    for starter in starters:
        starter.start()
    outcomes = [results.get(timeout=600) for _ in starters]
    for starter in starters:
        starter.join(timeout=60)
    assert outcomes == ["ok"] * 3
    assert rows(optuna_url, "SELECT version_num FROM alembic_version") == [(OPTUNA_HEAD,)]
    assert rows(mlflow_url, "SELECT version_num FROM alembic_version") == [(mlflow_head(),)]
    assert rows(mlflow_url, "SELECT name FROM experiments") == [("Default",)]
    assert optuna.get_all_study_summaries(optuna_url) == []  # a schema, no study

    again = subprocess.run(
        [sys.executable, "-m", "gradalign.stores", "init", "--optuna", optuna_url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    masked = make_url(optuna_url).render_as_string(hide_password=True)
    assert again.stdout == f"Optuna storage {masked}: schema {OPTUNA_HEAD} (already there)\n"


def test_one_database_for_optuna_and_mlflow_is_refused_before_anything_is_created(server):
    shared = fresh_database(server, "init_shared")
    result = subprocess.run(
        [sys.executable, "-m", "gradalign.stores", "init", "--optuna", shared, "--mlflow", shared],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "alembic_version" in result.stderr and make_url(shared).password not in result.stderr
    assert rows(shared, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]


def recorded(client, run):
    """{"params": ..., "tags": ..., <artifact path>: <its text>} of ``run``, every value a str
    (a binary artifact, such as a figure, decoded with replacement: any text in it still shows)."""
    data = client.get_run(run.info.run_id).data
    found = {"params": str(data.params), "tags": str(data.tags)}
    pending = client.list_artifacts(run.info.run_id)
    while pending:
        artifact = pending.pop()
        if artifact.is_dir:
            pending += client.list_artifacts(run.info.run_id, artifact.path)
        else:
            local = Path(client.download_artifacts(run.info.run_id, artifact.path))
            found[artifact.path] = local.read_bytes().decode("utf-8", errors="replace")
    return found


def test_two_sweeps_share_a_fresh_postgres_study_and_a_postgres_tracking_server(server, tmp_path):
    """Started at the same moment on an empty Optuna database: 6 trials, each COMPLETE in
    Optuna and FINISHED in MLflow, once, under one parent; passwords of the Optuna storage and
    of the tracking URL are in no record and no output."""
    backend = fresh_database(server, "sweeps_mlflow")
    storage = fresh_database(server, "sweeps_optuna")
    password = make_url(storage).password
    artifacts, log = tmp_path / "server-artifacts", tmp_path / "server.log"
    with mlflow_server(backend, artifacts, log) as uri:
        # the tracking URL with a user and password (the server ignores them), as an override,
        # so that it is in every trial's .hydra/ files too
        parts = urllib.parse.urlsplit(uri)
        secret = f"tracking-{password}"
        with_credentials = parts._replace(netloc=f"gradalign:{secret}@{parts.netloc}").geturl()
        command = sweep_command(
            tmp_path / "sweep",
            "optimizer=gao",
            "hydra.sweeper.n_trials=6",  # the study's budget, which both processes fill
            "trainer.epochs=2",
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=shared-pg",
            f"tracking.uri={with_credentials}",
        )
        outputs = run_together(command, environment(uri), copies=2, timeout=900)

        trials = study_trials(storage, "shared-pg")
        assert len(trials) == 6
        sweep_runs = assert_complete_and_tracked(uri, trials, epochs=2)
        client, (parent,) = runs(uri, "sweep_parent")
        assert parent.info.status == "FINISHED"
        assert {r.data.tags["mlflow.parentRunId"] for r in sweep_runs} == {parent.info.run_id}
        assert parent.data.params["sweeper.storage"] == make_url(storage).render_as_string()

        records = [recorded(client, run) for run in [parent, *sweep_runs]]
    for record in records[1:]:  # each trial logged its Hydra config, with the URLs masked
        assert "postgresql+psycopg://ci:***@127.0.0.1" in record[".hydra/hydra.yaml"]
        assert f"uri: http://gradalign:***@127.0.0.1:{parts.port}" in record[".hydra/config.yaml"]
        assert f"gradalign\\:***@127.0.0.1\\:{parts.port}" in record[".hydra/overrides.yaml"]
    assert "Storage: postgresql+psycopg://ci:***@" in outputs[0] + outputs[1]
    for where in [*(v for r in records for v in r.values()), *outputs]:
        assert password not in where and secret not in where
    job_logs = [log for sweep_dir in tmp_path.glob("sweep*") for log in sweep_dir.rglob("*.log")]
    assert len(job_logs) == 6
    for job_log in job_logs:
        assert password not in job_log.read_text() and secret not in job_log.read_text()


def restart_once(ready, down_s):
    """A thread that stops the PostgreSQL server once ``ready()`` is true, keeps it down for
    ``down_s`` and starts it again (as a crash and a restart of the database host would)."""

    def restart():
        deadline = time.monotonic() + 600
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.5)
        postgres("stop")
        time.sleep(down_s)
        postgres("start")

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    return thread


def finished_trial_runs(uri, count):
    def ready():
        try:
            _, found = runs(uri, "sweep")
        except Exception:  # the store is being created
            return False
        return sum(r.info.status == "FINISHED" for r in found) >= count

    return ready


def sweep_through_a_restart(tmp_path, uri, storage, down_s, extra=()):
    """A 6-trial sweep into ``uri`` and ``storage`` whose PostgreSQL server is stopped for
    ``down_s`` once two trials finished; (its command, what it did)."""
    command = sweep_command(
        tmp_path / "sweep",
        "hydra.sweeper.n_trials=6",
        "trainer.epochs=30",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=restart",
        f"tracking.uri={uri}",
        *extra,
    )
    restarting = restart_once(finished_trial_runs(uri, 2), down_s=down_s)
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    restarting.join(timeout=300)
    return command, result


def test_a_postgres_restart_mid_sweep_delays_it_and_loses_nothing(server, tmp_path):
    """Both stores on PostgreSQL, stopped for 20 s mid-sweep and started again: the pooled
    connections the restart killed are replaced, the writes that met it are retried, and the
    sweep ends as if nothing had happened."""
    uri = fresh_database(server, "restart_mlflow")
    storage = fresh_database(server, "restart_optuna")
    command, result = sweep_through_a_restart(tmp_path, uri, storage, down_s=20)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "did not answer" not in result.stderr and "Traceback" not in result.stderr
    trials = assert_stores_agree(uri, storage)
    complete = [n for n, t in trials.items() if t.state == TrialState.COMPLETE]
    assert len(complete) == 6
    # A restart that met an ask (several writes) leaves that trial RUNNING without an owner and
    # the retried ask makes another: the leftover is failed at once, with no run, never counted
    # (as test_faults' lost-reply test shows); no other trial may fail.
    for number in set(trials) - set(complete):
        assert trials[number].state == TrialState.FAIL
        assert trials[number].user_attrs["failure_reason"] == (
            "its ask was interrupted by a store fault and asked again"
        ), trials[number].user_attrs
        assert "mlflow_run_id" not in trials[number].user_attrs
    _, (parent,) = runs(uri, "sweep_parent")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics[Metric.TRIALS_COMPLETE] == 6


def test_a_postgres_outage_past_store_wait_s_stops_the_sweep_in_one_line_and_it_resumes(
    server, tmp_path
):
    """The Optuna storage down for longer than tracking.store_wait_s: one line names it, the
    parent run ends, the line gives the command that resumes, and that command does."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = fresh_database(server, "outage_optuna")
    command, stopped = sweep_through_a_restart(
        tmp_path, uri, storage, down_s=40, extra=["tracking.store_wait_s=5"]
    )
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    last = stopped.stderr.strip().splitlines()[-1]
    masked = make_url(storage).render_as_string()  # the password as ***
    assert last.startswith(f"sweep stopped: Optuna storage {masked} did not answer for 5 s (")
    assert last.endswith(
        shlex.join(["python", *command[1:]]).replace(make_url(storage).password, "***")
    )
    assert "Traceback" not in stopped.stderr
    _, (parent,) = runs(uri, "sweep_parent")
    assert parent.info.status == "FAILED"
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = assert_stores_agree(uri, storage)
    assert len(trials) >= 6
