"""Sweeps as real processes (slow): trials nested under one MLflow parent, parallel launchers
(joblib, submitit's local executor), two sweep processes sharing one Optuna study, a tracking
server on 127.0.0.1, Ctrl-C / SIGTERM mid-trial and the resumed study, and a store locked by
another writer. Across all of them: no trial lost, no run left RUNNING."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from helpers import REPO_ROOT
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from services import mlflow_server

from gradalign import tracking
from gradalign.schema import Metric
from gradalign.tracking.store import experiment_id

pytestmark = pytest.mark.slow
SEARCHED = {"adam": {"optimizer.lr"}, "gao": {"optimizer.lr", "optimizer.beta"}}


def sweep_command(sweep_dir, *overrides):
    """train.py -m on 1000 samples, writing to ``sweep_dir`` (data cached beside it)."""
    return [
        sys.executable,
        str(REPO_ROOT / "train.py"),
        "-m",
        f"hydra.sweep.dir={sweep_dir}",
        "dataset.generation.num_samples=1000",
        f"paths.data_cache={sweep_dir.parent / 'data'}",
        *overrides,
    ]


def environment(uri):
    return {**os.environ, "MLFLOW_TRACKING_URI": uri}


def sqlite_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def run(command, uri, timeout=300):
    result = subprocess.run(
        command, env=environment(uri), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def runs(uri, stage=None):
    """(client, runs of the experiment, of ``stage`` if given, oldest first)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("gradient-alignment")
    if experiment is None:
        return client, []
    found = client.search_runs(
        [experiment.experiment_id],
        f"tags.stage = '{stage}'" if stage else "",
        order_by=["attributes.start_time ASC"],
    )
    return client, found


def run_together(command: list[str], env: dict[str, str], copies: int, timeout: float) -> list[str]:
    """Run ``copies`` processes of ``command`` at once (sweeps sharing a study); assert that
    each exits 0, showing the ends of their outputs otherwise; their outputs."""
    processes = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(copies)
    ]
    outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    assert [p.returncode for p in processes] == [0] * copies, "".join(o[-2000:] for o in outputs)
    return outputs


def study_trials(storage, name):
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def assert_complete_and_tracked(uri, trials, epochs):
    """Every trial of the study is COMPLETE and has one FINISHED MLflow run, tagged with its
    number, holding its params and ``epochs`` points of every per-epoch metric; nothing RUNNING.
    Returns the sweep runs."""
    client, all_runs = runs(uri)
    assert not [r for r in all_runs if r.info.status == "RUNNING"]
    sweep_runs = [r for r in all_runs if r.data.tags.get("stage") == "sweep"]
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))  # none duplicated, none missing
    assert sorted(int(r.data.tags["optuna_trial"]) for r in sweep_runs) == numbers
    by_number = {int(r.data.tags["optuna_trial"]): r for r in sweep_runs}
    for trial in trials:
        assert trial.state == TrialState.COMPLETE
        tracked = by_number[trial.number]
        assert tracked.info.status == "FINISHED"
        assert trial.user_attrs["mlflow_run_id"] == tracked.info.run_id
        for key, value in trial.params.items():
            assert float(tracked.data.params[key]) == value, key
        for key in Metric.PER_EPOCH:
            steps = sorted(m.step for m in client.get_metric_history(tracked.info.run_id, key))
            assert steps == list(range(1, epochs + 1)), key
    return sweep_runs


@pytest.mark.parametrize("optimizer", ["adam", "gao"])
def test_three_trial_sweep_nests_trials_under_one_parent(tmp_path, optimizer):
    sweep_dir, uri = tmp_path / "sweep", sqlite_uri(tmp_path)
    run(
        sweep_command(
            sweep_dir, f"optimizer={optimizer}", "hydra.sweeper.n_trials=3", "trainer.epochs=2"
        ),
        uri,
    )
    client, (parent,) = runs(uri, "sweep_parent")
    _, trials = runs(uri, "sweep")
    assert parent.data.tags["sweep_id"] == str(sweep_dir)
    assert parent.data.params["sweeper.n_trials"] == "3"
    assert set(parent.data.params) >= {f"sweeper.params.{key}" for key in SEARCHED[optimizer]}
    assert len(trials) == 3
    assert sorted(t.data.tags["hydra_job_num"] for t in trials) == ["0", "1", "2"]
    assert sorted(t.data.tags["optuna_trial"] for t in trials) == ["0", "1", "2"]
    for trial in trials:
        assert trial.info.status == "FINISHED"
        assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert trial.data.tags["sweep_id"] == trial.data.tags["sweep_dir"] == str(sweep_dir)
        assert trial.data.tags["optimizer"] == optimizer
        assert len(client.get_metric_history(trial.info.run_id, Metric.VAL_LOSS)) == 2
    for key in SEARCHED[optimizer]:  # each trial carries its own suggestion
        assert len({t.data.params[key] for t in trials}) == 3, key
    assert "optimizer.beta" not in trials[0].data.params or optimizer == "gao"
    best = (sweep_dir / "optimization_results.yaml").read_text()
    assert str(min(t.data.metrics["objective"] for t in trials)) in best


def overlapping(a, b):
    return a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time


@pytest.mark.parametrize("preset", ["joblib", "submitit_local", "stacked"])
def test_parallel_launcher_runs_trials_at_once_and_tracks_every_one(tmp_path, preset):
    uri, storage = sqlite_uri(tmp_path), f"sqlite:///{tmp_path / 'optuna.db'}"
    run(
        sweep_command(
            tmp_path / "sweep",
            f"parallel={preset}",
            "parallel.workers=2",
            "hydra.sweeper.n_trials=4",
            "trainer.epochs=300",
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=parallel",
        ),
        uri,
    )
    sweep_runs = assert_complete_and_tracked(uri, study_trials(storage, "parallel"), epochs=300)
    _, (parent,) = runs(uri, "sweep_parent")
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in sweep_runs} == {parent.info.run_id}
    by_number = {int(r.data.tags["optuna_trial"]): r for r in sweep_runs}
    # the trials of a batch train at once (each longer than start-up jitter)
    assert overlapping(by_number[0], by_number[1]) or overlapping(by_number[2], by_number[3])


def test_two_sweep_processes_share_one_study_and_one_parent(tmp_path):
    """The idle-free pattern: independent `train.py -m` processes on one Optuna storage, here
    started together with the same sweep directory (the second claims <dir>-1), fill the
    study's one budget (n_trials) together, never past it."""
    uri, storage = sqlite_uri(tmp_path), f"sqlite:///{tmp_path / 'optuna.db'}"
    command = sweep_command(
        tmp_path / "sweep",
        "optimizer=gao",
        "hydra.sweeper.n_trials=6",
        "trainer.epochs=2",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=shared",
    )
    run_together(command, environment(uri), copies=2, timeout=300)

    trials = study_trials(storage, "shared")
    assert len(trials) == 6  # the study's budget, not 6 per process
    sweep_runs = assert_complete_and_tracked(uri, trials, epochs=2)
    _, (parent,) = runs(uri, "sweep_parent")
    assert parent.data.tags["sweep_id"] == "optuna:shared"
    assert {r.data.tags["mlflow.parentRunId"] for r in sweep_runs} == {parent.info.run_id}
    sweep_dirs = {r.data.tags["sweep_dir"] for r in sweep_runs}
    assert sweep_dirs == {str(tmp_path / "sweep"), str(tmp_path / "sweep-1")}
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # no point twice


@pytest.fixture
def tracking_server(tmp_path):
    """`mlflow server` on 127.0.0.1 (a free port), SQLite-backed, stopped afterwards; its URI."""
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    with mlflow_server(backend, tmp_path / "server-artifacts", tmp_path / "server.log") as uri:
        yield uri


def test_parallel_sweep_against_a_tracking_server(tmp_path, tracking_server):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    run(
        sweep_command(
            tmp_path / "sweep",
            "parallel=joblib",
            "parallel.workers=2",
            "hydra.sweeper.n_trials=2",
            "trainer.epochs=2",
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=served",
        ),
        tracking_server,
    )
    sweep_runs = assert_complete_and_tracked(
        tracking_server, study_trials(storage, "served"), epochs=2
    )
    client = MlflowClient(tracking_server)
    for tracked in sweep_runs:  # artifacts went through the server
        artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id, ".hydra")}
        assert ".hydra/config.yaml" in artifacts


def wait_for_epochs(uri, trials, sweep, deadline_s=240):
    """Poll the store until the runs of Optuna trials ``trials`` each logged an epoch; the
    number of val_loss points each has then, by run id. (The trials must last long enough for
    a poll to see them training: the callers give them far more epochs than they let them run.)
    Fails at once, with its exit status, if the ``sweep`` process ends first."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if sweep.poll() is not None:
            output = sweep.communicate()[0] if sweep.stdout else ""
            raise AssertionError(
                f"the sweep exited ({sweep.returncode}) before trials {trials} trained: "
                f"{output[-3000:]}"
            )
        try:
            client, found = runs(uri, "sweep")
        except Exception:  # the store is being created, or is busy with the sweep's writes
            found = []
        found = [r for r in found if int(r.data.tags["optuna_trial"]) in trials]
        if len(found) == len(trials) and all(Metric.VAL_LOSS in r.data.metrics for r in found):
            return {
                r.info.run_id: len(client.get_metric_history(r.info.run_id, Metric.VAL_LOSS))
                for r in found
            }
        time.sleep(0.3)
    raise AssertionError(f"trials {trials} did not start training in {deadline_s} s")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_sweep_ends_killed_and_resumes_without_repeating_trials(tmp_path, signum):
    """Interrupt a stored study inside its second trial: that run ends KILLED with what it
    logged, its parent too, its trial FAIL; the same command then resumes the study: finished
    trials stay, new trials are new points, all under the study's one parent."""
    uri, storage = sqlite_uri(tmp_path), f"sqlite:///{tmp_path / 'optuna.db'}"
    overrides = [
        "optimizer=gao",
        "trainer.epochs=100",
        "tracking.flush_interval_s=0",  # every epoch reaches the store at once
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=resume",
    ]
    first = subprocess.Popen(
        sweep_command(tmp_path / "first", "hydra.sweeper.n_trials=5", *overrides),
        env=environment(uri),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        logged = wait_for_epochs(uri, {1}, first)
    finally:
        first.send_signal(signum)
        assert first.wait(timeout=60) != 0

    ((killed_id, epochs_before),) = logged.items()
    client, killed = MlflowClient(uri), MlflowClient(uri).get_run(killed_id)
    reason = "KeyboardInterrupt" if signum == signal.SIGINT else "Terminated"
    assert killed.info.status == "KILLED"
    assert killed.data.tags["failure_reason"] == f"interrupted ({reason})"
    assert len(client.get_metric_history(killed_id, Metric.VAL_LOSS)) >= epochs_before
    _, (parent,) = runs(uri, "sweep_parent")
    assert parent.info.status == "KILLED"
    before = study_trials(storage, "resume")
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.FAIL]
    assert before[1].user_attrs["failure_reason"] == f"interrupted ({reason})"

    # a budget of 3: 1 trial done, so the 2 missing run
    run(sweep_command(tmp_path / "second", "hydra.sweeper.n_trials=3", *overrides), uri)
    after = study_trials(storage, "resume")
    assert after[0].params == before[0].params and after[0].value == before[0].value
    assert [t.state for t in after[2:]] == [TrialState.COMPLETE] * 2
    assert all(t.params != before[0].params for t in after[2:])
    _, all_runs = runs(uri)
    assert sorted(r.info.status for r in all_runs if r.data.tags["stage"] == "sweep") == [
        "FINISHED",
        "FINISHED",
        "FINISHED",
        "KILLED",
    ]
    assert not [r for r in all_runs if r.info.status == "RUNNING"]
    _, (parent,) = runs(uri, "sweep_parent")  # one parent per study, across invocations
    assert parent.info.status == "FINISHED"


def session_processes(session):
    """Pids of the live processes in session ``session``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] not in "ZX":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("preset", ["joblib", "submitit_local", "stacked"])
def test_sigterm_to_a_parallel_sweep_leaves_no_run_running_and_no_worker(tmp_path, preset):
    uri, storage = sqlite_uri(tmp_path), f"sqlite:///{tmp_path / 'optuna.db'}"
    sweep = subprocess.Popen(
        sweep_command(
            tmp_path / "sweep",
            f"parallel={preset}",
            "parallel.workers=2",
            "hydra.sweeper.n_trials=4",
            "trainer.epochs=10000",
            "tracking.flush_interval_s=0",
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=stopped",
        ),
        env=environment(uri),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        logged = wait_for_epochs(uri, {0, 1}, sweep)
    finally:
        sweep.send_signal(signal.SIGTERM)
        assert sweep.wait(timeout=90) != 0
    client, all_runs = runs(uri)
    statuses = {r.data.tags["stage"]: set() for r in all_runs}
    for r in all_runs:
        statuses[r.data.tags["stage"]].add(r.info.status)
    assert statuses == {"sweep": {"KILLED"}, "sweep_parent": {"KILLED"}}
    for run_id, epochs in logged.items():
        assert len(client.get_metric_history(run_id, Metric.VAL_LOSS)) >= epochs
    trials = study_trials(storage, "stopped")
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    deadline = time.monotonic() + 20
    while session_processes(sweep.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_processes(sweep.pid) == []  # no worker left training


def test_a_store_locked_by_another_writer_delays_a_run_but_loses_nothing(tmp_path, caplog):
    """Locked longer than the 20 s MLflow lets SQLite wait, so the retry carries the call."""
    uri = sqlite_uri(tmp_path)
    client = tracking.client(uri, 60)
    experiment = experiment_id(uri, 60, "locked")
    other = sqlite3.connect(tmp_path / "mlflow.db", timeout=0, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(22.0, other.commit)
    release.start()
    start = time.monotonic()
    try:
        run_id = client.create_run(experiment, run_name="patient").info.run_id
    finally:
        release.join()
        other.close()
    assert time.monotonic() - start >= 22.0
    assert MlflowClient(uri).get_run(run_id).info.run_name == "patient"
    assert "database is locked (attempt 1); retrying in" in caplog.text
