"""Kills, store faults and orphans, with real processes (slow): after kill -9 of a serial sweep,
a joblib sweep or a report with worker processes, no worker outlives its owner by more than 10 s
and every run and trial left open is ended by python -m gradalign.doctor; a store on a full disk
or locked by another process ends a run with one line, and a status, never a hang."""

import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from helpers import REPO_ROOT, TRAIN, runs
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from gradalign.schema import Metric

pytestmark = pytest.mark.slow
ORPHAN_S = 10  # the longest a worker may outlive its owner


def environment(uri):
    return {**os.environ, "MLFLOW_TRACKING_URI": uri}


def tiny(tmp_path, *overrides):
    return [
        "dataset.generation.num_samples=1000",
        f"paths.data_cache={tmp_path / 'data'}",
        f"paths.outputs={tmp_path / 'out'}",
        "tracking.flush_interval_s=0",
        *overrides,
    ]


def descendants(pid):
    """Live processes whose ancestry includes ``pid`` (found through /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in "ZX":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids):
    left = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in "ZX":
            left.append(pid)
    return left


def wait_until(condition, deadline_s, what):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"{what} did not happen in {deadline_s} s")


def running_runs(uri, stage):
    try:
        return [
            r
            for r in runs(uri)
            if r.data.tags.get("stage") == stage
            and r.info.status == "RUNNING"
            and Metric.VAL_LOSS in r.data.metrics
        ]
    except Exception:  # the store is being created
        return []


def kill_9_then_doctor(process, uri, storage=None):
    """SIGKILL ``process`` (and nothing else), check that its workers stop on their own within
    ORPHAN_S, then run the doctor; what it printed."""
    workers = descendants(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    wait_until(lambda: not alive(workers), ORPHAN_S + 5, "the workers stopping")
    doctor = [
        sys.executable,
        "-m",
        "gradalign.doctor",
        *(["--storage", storage] if storage else []),
    ]
    done = subprocess.run(
        doctor, cwd=REPO_ROOT, env=environment(uri), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def assert_nothing_running(uri, storage=None):
    assert [r.info.run_id for r in runs(uri) if r.info.status == "RUNNING"] == []
    if storage:
        for summary in optuna.get_all_study_summaries(storage):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            assert study.get_trials(states=(TrialState.RUNNING,)) == []


@pytest.mark.parametrize("preset", ["serial", "joblib"])
def test_kill_9_of_a_sweep_leaves_no_worker_and_the_doctor_ends_what_it_left(tmp_path, preset):
    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    command = [
        *TRAIN,
        "-m",
        *tiny(
            tmp_path,
            f"parallel={preset}",
            "parallel.workers=2",
            "hydra.sweeper.n_trials=4",
            "trainer.epochs=10000",
            f"hydra.sweep.dir={tmp_path / 's'}",
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=k",
        ),
    ]
    sweep = subprocess.Popen(
        command, env=environment(uri), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_until(lambda: running_runs(uri, "sweep"), 300, "a trial training")
    said = kill_9_then_doctor(sweep, uri, storage)
    assert "ended" in said and "-> KILLED" in said and "-> FAIL" in said
    assert_nothing_running(uri, storage)
    statuses = {r.data.tags["stage"]: r.info.status for r in runs(uri)}
    assert statuses == {"sweep": "KILLED", "sweep_parent": "KILLED"}
    reasons = {r.data.tags.get("failure_reason", "") for r in runs(uri)}
    assert all("is gone" in reason for reason in reasons)


def test_kill_9_of_a_report_stops_its_workers_and_a_rerun_resumes_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = tiny(tmp_path, "trainer.epochs=2")
    sweeps = [
        subprocess.run(
            [
                *TRAIN,
                "-m",
                f"optimizer={o}",
                "hydra.sweeper.n_trials=2",
                *base,
                f"hydra.sweep.dir={tmp_path / o}",
            ],
            env=environment(uri),
            capture_output=True,
            text=True,
            timeout=600,
        )
        for o in ("adam", "gao")
    ]
    assert [s.returncode for s in sweeps] == [0, 0], sweeps[0].stderr[-2000:]
    report = [
        sys.executable,
        "report.py",
        "--name",
        "r",
        "--seeds",
        "1",
        "2",
        "--jobs",
        "2",
        "--final-epochs",
        "300",
        "--",
        *base,
    ]
    first = subprocess.Popen(
        report,
        cwd=REPO_ROOT,
        env=environment(uri),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: len(running_runs(uri, "final")) >= 2, 300, "two final runs training")
    said = kill_9_then_doctor(first, uri)
    assert "-> KILLED" in said
    assert_nothing_running(uri)
    (killed,) = [r for r in runs(uri) if r.data.tags.get("stage") == "report"]
    assert killed.info.status == "KILLED"  # never FINISHED by its children

    other = [*report[: -len(base) - 3], "--final-epochs", "2", "--", *base]
    refused = subprocess.run(
        other, cwd=REPO_ROOT, env=environment(uri), capture_output=True, text=True, timeout=600
    )
    assert refused.returncode == 2 and "was started with other settings" in refused.stderr
    resumed = subprocess.run(
        report, cwd=REPO_ROOT, env=environment(uri), capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming report 'r'" in resumed.stderr
    (finished,) = [r for r in runs(uri) if r.data.tags.get("stage") == "report"]
    assert finished.info.run_id == killed.info.run_id and finished.info.status == "FINISHED"
    assert (tmp_path / "out" / "report" / "r" / "report.md").is_file()
    assert_nothing_running(uri)


def test_a_full_disk_ends_the_run_failed_with_one_line(tmp_path):
    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    client.create_experiment("gradient-alignment", artifact_location=str(tmp_path / "artifacts"))
    room = db.stat().st_size + 16384  # a few metric batches more, then the disk is "full"

    def full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (room, room))

    done = subprocess.run(
        [*TRAIN, *tiny(tmp_path, "trainer.epochs=500", f"hydra.run.dir={tmp_path / 'run'}")],
        env=environment(f"sqlite:///{db}"),
        preexec_fn=full_disk,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1].startswith(
        f"error: MLflow store sqlite:///{db} could not be written"
    )
    assert "Traceback" not in done.stderr
    (run,) = client.search_runs([client.get_experiment_by_name("gradient-alignment").experiment_id])
    assert run.info.status == "FAILED" and "could not be written" in run.data.tags["failure_reason"]


def test_a_store_another_process_keeps_locked_ends_a_run_in_bounded_time(tmp_path):
    db = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").create_experiment("gradient-alignment")
    holder = sqlite3.connect(db, timeout=0, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    start = time.monotonic()
    try:
        done = subprocess.run(
            [
                *TRAIN,
                *tiny(tmp_path, "tracking.store_wait_s=5", f"hydra.run.dir={tmp_path / 'run'}"),
            ],
            env=environment(f"sqlite:///{db}"),
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        holder.rollback()
        holder.close()
    assert time.monotonic() - start < 240  # bounded: the wait, MLflow's busy timeout, start-up
    assert done.returncode == 2
    assert f"error: MLflow store sqlite:///{db} stayed locked for 5 s" in done.stderr
    assert "Traceback" not in done.stderr
    assert_nothing_running(f"sqlite:///{db}")
