"""Kills, interruptions, store faults and orphans, with real processes (slow). Each fault ends
with the two stores agreeing, after a resume or python -m gradalign.doctor (assert_stores_agree):
every MLflow trial run FINISHED with an objective is a COMPLETE Optuna trial with the same value,
nothing is RUNNING, no trial number appears twice under a parent. No worker outlives its owner
by more than 10 s, even one whose owner died before it started; a store on a full disk or locked
by another process ends a run or a sweep with one line and a status, never a hang; a kill while a
store is created leaves no store or a whole one.

Faults at exact moments come from tests/fault_hooks (``GRADALIGN_FAULT``)."""

import collections
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
from helpers import REPO_ROOT, TRAIN, runs
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from gradalign.schema import Metric

pytestmark = pytest.mark.slow
ORPHAN_S = 10  # the longest a worker may outlive its owner
HOOKS = Path(__file__).parent / "fault_hooks"


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


def with_fault(env, fault):
    """``env`` for a process that runs ``fault`` (tests/fault_hooks)."""
    path = os.pathsep.join(p for p in (str(HOOKS), env.get("PYTHONPATH")) if p)
    return {**env, "GRADALIGN_FAULT": fault, "PYTHONPATH": path}


def descendants(pid):
    """The live processes started by process ``pid``, its children's children included."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def command_line(process):
    """``process``'s command line, or "" once it has exited (a zombie has none to read)."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def alive(processes):
    left = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(process.pid)
        except psutil.NoSuchProcess:
            continue
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


def kill_9(process):
    """SIGKILL ``process`` (and nothing else), and check that its workers stop on their own
    within ORPHAN_S."""
    workers = descendants(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    wait_until(lambda: not alive(workers), ORPHAN_S, "the workers stopping")


def kill_9_then_doctor(process, uri, storage=None):
    """``kill_9(process)``, then run the doctor; what it printed."""
    kill_9(process)
    return doctor(uri, storage)


def doctor(uri, storage=None):
    """Run python -m gradalign.doctor on the store ``uri`` (and ``storage``); what it printed."""
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


def assert_stores_agree(uri, storage):
    """Every MLflow trial run FINISHED with an objective is a COMPLETE Optuna trial with the same
    value, nothing is RUNNING in either store, and no trial number appears twice under a parent.
    The trials of the study (by number)."""
    assert_nothing_running(uri, storage)
    trial_runs = [r for r in runs(uri) if r.data.tags.get("stage") == "sweep"]
    numbers = collections.defaultdict(list)
    for run in trial_runs:
        numbers[run.data.tags["mlflow.parentRunId"]].append(run.data.tags["optuna_trial"])
    for parent, found in numbers.items():
        assert len(found) == len(set(found)), f"a trial number twice under {parent}: {found}"
    trials = {}
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials |= {(summary.study_name, t.number): t for t in study.trials}
    for run in trial_runs:
        if run.info.status == "FINISHED" and Metric.OBJECTIVE in run.data.metrics:
            trial = trials[(run.data.tags["optuna_study"], int(run.data.tags["optuna_trial"]))]
            assert (trial.state, trial.value) == (
                TrialState.COMPLETE,
                run.data.metrics[Metric.OBJECTIVE],
            ), f"trial {trial.number}: {trial.state.name} in Optuna, FINISHED in MLflow"
    return {number: trial for (_, number), trial in trials.items()}


@pytest.mark.parametrize("preset", ["serial", "joblib", "submitit_local"])
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
    assert "ended" in said and "-> KILLED" in said and "-> FAIL (from its MLflow run)" in said
    assert_stores_agree(uri, storage)
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
    # a write past RLIMIT_FSIZE fails with EFBIG, which SQLite reports as an I/O error (a full
    # disk's ENOSPC as "database or disk is full"): the line names SQLite's own reason
    said = f"error: MLflow store sqlite:///{db} could not be read or written (disk I/O error)"
    assert done.returncode == 2 and lines[-1].startswith(said), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    (run,) = client.search_runs([client.get_experiment_by_name("gradient-alignment").experiment_id])
    assert run.info.status == "FAILED"
    assert "could not be read or written (disk I/O error)" in run.data.tags["failure_reason"]


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
    assert f"error: MLflow store sqlite:///{db} did not answer for 5 s (" in done.stderr
    assert "database is locked): another process holds its write lock" in done.stderr
    assert "Traceback" not in done.stderr
    assert_nothing_running(f"sqlite:///{db}")


def stored_sweep_command(tmp_path, storage, *overrides):
    """train.py -m of a tiny study ``k`` kept in ``storage``, its sweep directory tmp_path/s."""
    return [
        *TRAIN,
        "-m",
        *tiny(
            tmp_path,
            "trainer.epochs=2",
            f"hydra.sweep.dir={tmp_path / 's'}",
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=k",
            *overrides,
        ),
    ]


def stores(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"


def resume(command, uri):
    """Run a sweep's ``command`` again (it resumes its stored study); what it said on stderr."""
    resumed = subprocess.run(
        command, env=environment(uri), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return resumed.stderr


@pytest.mark.parametrize("repair", ["doctor", "resume"])
def test_a_trial_that_finished_before_a_kill_9_is_complete_after_resume_or_doctor(tmp_path, repair):
    """Killed after the trial's MLflow run ended FINISHED and before Optuna was told: the trial
    is COMPLETE with the run's objective, never FAIL."""
    uri, storage = stores(tmp_path)
    command = stored_sweep_command(tmp_path, storage, "hydra.sweeper.n_trials=2")
    killed = subprocess.run(
        command,
        env=with_fault(environment(uri), "kill_after_job"),
        capture_output=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL
    (run,) = [r for r in runs(uri) if r.data.tags.get("stage") == "sweep"]
    assert run.info.status == "FINISHED" and Metric.OBJECTIVE in run.data.metrics
    study = optuna.load_study(study_name="k", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.RUNNING]  # the fault's moment
    if repair == "doctor":
        said = doctor(uri, storage)
        assert f"trial 0 of study k -> COMPLETE {run.data.metrics[Metric.OBJECTIVE]:.4g}" in said
    else:
        said = resume(command, uri)
        assert (
            "study 'k': 1 trial(s) left RUNNING by a process that is gone, recorded from their "
            "MLflow runs: 1 complete (trials [0])"
        ) in said
        assert (  # the study's budget is 2 trials: 1 more, not 2
            "study 'k': 1 of 2 trials done (hydra.sweeper.n_trials, the study's budget), running "
            "the 1 missing"
        ) in said
    trials = assert_stores_agree(uri, storage)
    assert trials[0].value == run.data.metrics[Metric.OBJECTIVE]
    assert len(trials) == (1 if repair == "doctor" else 2)


def test_writes_whose_reply_a_restart_lost_make_no_second_trial_or_run(tmp_path):
    """A server restart exactly as the store commits: the sweep sees an error for a write that
    was made, and retries. The first trial asked is committed unanswered: it is failed at once
    and never counted (the budget of 2 still gets 2 results). The sweep's parent and a trial's
    run, created unanswered, are found again rather than made twice."""
    uri, storage = stores(tmp_path)
    done = subprocess.run(
        stored_sweep_command(tmp_path, storage, "hydra.sweeper.n_trials=2"),
        env=with_fault(environment(uri), "lost_replies"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout + done.stderr
    assert said.count("server closed the connection unexpectedly (attempt 1); retrying") == 3
    trials = assert_stores_agree(uri, storage)
    assert [t.state for t in trials.values()] == [
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert trials[0].user_attrs["failure_reason"] == (
        "its ask was interrupted by a store fault and asked again"
    )
    assert "mlflow_run_id" not in trials[0].user_attrs
    (parent,) = [r for r in runs(uri) if r.data.tags.get("stage") == "sweep_parent"]
    assert parent.data.params["sweeper.n_trials"] == "2"
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics[Metric.TRIALS_COMPLETE] == 2
    assert parent.data.metrics[Metric.TRIALS_FAILED] == 1
    trial_runs = [r for r in runs(uri) if r.data.tags.get("stage") == "sweep"]
    assert sorted(r.data.tags["optuna_trial"] for r in trial_runs) == ["1", "2"]
    assert {trials[int(r.data.tags["optuna_trial"])].user_attrs["mlflow_run_id"] for r in
            trial_runs} == {r.info.run_id for r in trial_runs}  # fmt: skip


def test_ctrl_c_after_a_stacked_batch_trained_records_its_trials_complete(tmp_path):
    """Ctrl-C after a stacked batch's runs ended FINISHED, before Optuna was told (make study's
    stacked sweeps): the trials are COMPLETE, not FAIL, and the study resumes."""
    uri, storage = stores(tmp_path)
    command = stored_sweep_command(
        tmp_path, storage, "parallel=stacked", "parallel.workers=3", "hydra.sweeper.n_trials=3"
    )
    interrupted = subprocess.run(
        command,
        env=with_fault(environment(uri), "interrupt_after_stacked_batch"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert interrupted.returncode == 130, interrupted.stderr[-2000:]
    assert interrupted.stderr.strip().splitlines()[-1].startswith("interrupted: the study 'k'")
    trials = assert_stores_agree(uri, storage)
    assert [t.state for t in trials.values()] == [TrialState.COMPLETE] * 3
    assert (
        "study 'k': 3 of 3 trials done (hydra.sweeper.n_trials, the study's budget), so no "
        "trial runs; a larger hydra.sweeper.n_trials adds trials"
    ) in resume(command, uri)
    assert len(assert_stores_agree(uri, storage)) == 3


def test_a_kill_9_while_the_mlflow_store_is_created_leaves_none_and_the_next_run_works(tmp_path):
    """A user's first run, killed halfway through creating mlruns/mlflow.db's schema: no store
    is left half-made (every command would refuse it), so the next run simply works."""
    db = tmp_path / "mlflow.db"
    run = [*TRAIN, *tiny(tmp_path, "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}")]
    env = environment(f"sqlite:///{db}")
    killed = subprocess.run(
        run, env=with_fault(env, "kill_in_migration"), capture_output=True, timeout=600
    )
    assert killed.returncode == -signal.SIGKILL
    assert not db.exists()
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [r.info.status for r in runs(f"sqlite:///{db}")] == ["FINISHED"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".mlflow.db")] == []
    assert "ended 0 record(s)" in doctor(f"sqlite:///{db}")


def test_the_sweeps_of_a_study_killed_as_it_starts_them_stop_within_10_s(tmp_path):
    """study.py killed while its sweeps start (before they could watch it): none of them trains
    on."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = subprocess.Popen(
        [
            sys.executable,
            "study.py",
            "--quick",
            "--name",
            "q",
            "--",
            f"paths.outputs={tmp_path / 'out'}",
            f"paths.data_cache={tmp_path / 'data'}",
        ],
        cwd=REPO_ROOT,
        env=environment(uri),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sweeps = wait_until(lambda: descendants(study.pid), 300, "the study starting its sweeps")
    study.send_signal(signal.SIGKILL)
    study.wait(timeout=30)
    wait_until(lambda: not alive(sweeps), ORPHAN_S, "the sweeps stopping")
    time.sleep(2)
    assert not alive(sweeps)


def test_submitit_jobs_whose_sweep_died_before_they_started_stop_within_10_s(tmp_path):
    uri, storage = stores(tmp_path)
    command = stored_sweep_command(
        tmp_path,
        storage,
        "parallel=submitit_local",
        "parallel.workers=2",
        "hydra.sweeper.n_trials=2",
        "trainer.epochs=10000",
    )
    sweep = subprocess.Popen(
        command, env=environment(uri), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def jobs_starting():
        return [p for p in descendants(sweep.pid) if "submitit" in command_line(p)]

    jobs = wait_until(jobs_starting, 300, "submitit starting the jobs")
    assert not running_runs(uri, "sweep")  # no job has begun training yet
    workers = descendants(sweep.pid)
    sweep.send_signal(signal.SIGKILL)
    sweep.wait(timeout=30)
    wait_until(lambda: not alive([*jobs, *workers]), ORPHAN_S, "the jobs stopping")
    doctor(uri, storage)
    assert_stores_agree(uri, storage)


def test_a_store_locked_mid_sweep_stops_it_with_one_line_that_says_what_is_left(tmp_path):
    uri, storage = stores(tmp_path)
    command = stored_sweep_command(
        tmp_path, storage, "hydra.sweeper.n_trials=50", "tracking.store_wait_s=5"
    )
    sweep = subprocess.Popen(
        command, env=environment(uri), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    def finished():
        return [r for r in runs(uri, "tags.stage = 'sweep'") if r.info.status == "FINISHED"]

    wait_until(finished, 300, "a trial finishing")
    holder = sqlite3.connect(tmp_path / "mlflow.db", timeout=60, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        _, err = sweep.communicate(timeout=400)
    finally:
        holder.rollback()
        holder.close()
    assert sweep.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"sweep stopped: MLflow store {uri} did not answer for 5 s (")
    assert "left RUNNING: python -m gradalign.doctor ends them once the store answers" in last
    assert f"resume with: python {TRAIN[1]} -m " in last
    said = doctor(uri, storage)
    assert "-> KILLED" in said
    assert_stores_agree(uri, storage)
