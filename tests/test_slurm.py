"""SLURM for real (slow, services): `parallel=slurm` sweeps through sbatch on the one-node
cluster .ci/run starts (scripts/ci/slurm.sh), with the Optuna study on PostgreSQL and MLflow
behind a tracking server, as docs/scaling.md tells a cluster user. Trials run as SLURM array jobs
and are tracked once each; `scancel` of a running sweep's jobs ends their runs KILLED (each job
ends its own, on SLURM's SIGTERM), stops the sweep, and the study resumes."""

import os
import re
import subprocess

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from services import fresh_database, mlflow_server, postgres_server, slurm_cluster
from test_scale import (
    assert_complete_and_tracked,
    environment,
    runs,
    study_trials,
    sweep_command,
    wait_for_epochs,
)

from gradalign.schema import Metric

pytestmark = [pytest.mark.slow, pytest.mark.services]
# The scancelled sweep and its resumption: one configuration (the study refuses another), with
# trials long enough to be seen training before the scancel and short enough to resume.
SAME_STUDY = ("trainer.epochs=400", "tracking.flush_interval_s=0")


@pytest.fixture
def served(tmp_path):
    """(Optuna storage, MLflow tracking server URI): two fresh PostgreSQL databases, one behind
    an `mlflow server` on 127.0.0.1."""
    slurm_cluster()
    server = postgres_server()
    storage = fresh_database(server, "slurm_optuna")
    backend = fresh_database(server, "slurm_mlflow")
    with mlflow_server(backend, tmp_path / "artifacts", tmp_path / "server.log") as uri:
        yield storage, uri


def slurm_command(sweep_dir, storage, *overrides):
    return sweep_command(
        sweep_dir,
        "parallel=slurm",
        "parallel.workers=2",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=on-slurm",
        *overrides,
    )


def array_jobs(sweep_dir):
    """The SLURM array job ids the sweep submitted, and its job folders (<id>_<task>)."""
    folders = sorted(
        p.name for p in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)
    )
    return sorted({name.split("_")[0] for name in folders}, key=int), folders


def sacct_states(job_ids):
    result = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(line.split("|") for line in result.stdout.splitlines())


def queued(job_ids):
    result = subprocess.run(
        ["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True
    )
    return result.stdout.split()


def test_a_slurm_sweep_runs_each_trial_as_a_job_and_tracks_it_once(tmp_path, served):
    storage, uri = served
    sweep_dir = tmp_path / "sweep"
    command = slurm_command(sweep_dir, storage, "hydra.sweeper.n_trials=4", "trainer.epochs=2")
    result = subprocess.run(
        command, env=environment(uri), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    sweep_runs = assert_complete_and_tracked(uri, study_trials(storage, "on-slurm"), epochs=2)
    _, (parent,) = runs(uri, "sweep_parent")
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in sweep_runs} == {parent.info.run_id}
    arrays, folders = array_jobs(sweep_dir)
    assert len(arrays) == 2 and len(folders) == 4  # two batches of two trials, one job each
    states = sacct_states(arrays)
    assert sorted(states) == folders and set(states.values()) == {"COMPLETED"}


def test_scancel_ends_the_runs_killed_stops_the_sweep_and_the_study_resumes(tmp_path, served):
    storage, uri = served
    sweep_dir = tmp_path / "first"
    sweep = subprocess.Popen(
        slurm_command(
            sweep_dir,
            storage,
            "hydra.sweeper.n_trials=4",
            *SAME_STUDY,
        ),
        env=environment(uri),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        logged = wait_for_epochs(uri, {0, 1}, sweep, deadline_s=600)
        arrays, _ = array_jobs(sweep_dir)
        subprocess.run(["scancel", *arrays], check=True)
        output = sweep.communicate(timeout=300)[0]
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    assert sweep.returncode == 1, output[-3000:]
    assert "sweep stopped: Job" in output and "CANCELLED" in output, output[-3000:]
    assert queued(arrays) == []
    scancelled = f"CANCELLED by {os.getuid()}"  # the uid of whoever ran scancel: this test
    assert set(sacct_states(arrays).values()) == {scancelled}

    client = MlflowClient(uri)
    for run_id, epochs in logged.items():  # each job ended its own run, on SLURM's SIGTERM
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert run.data.tags["failure_reason"] == "interrupted (Terminated)"  # the job's own
        assert len(client.get_metric_history(run_id, Metric.VAL_LOSS)) >= epochs
    before = study_trials(storage, "on-slurm")
    assert [t.state for t in before] == [TrialState.FAIL] * 2
    for trial in before:  # one record: the trial's reason is its run's, in both stores
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert trial.user_attrs["failure_reason"] == run.data.tags["failure_reason"]
    _, (parent,) = runs(uri, "sweep_parent")  # the sweep's reason names SLURM's job state
    assert parent.info.status == "KILLED"
    assert parent.data.tags["failure_reason"].startswith("stopped by SLURM: Job ")
    assert scancelled in parent.data.tags["failure_reason"]

    resumed = subprocess.run(
        slurm_command(tmp_path / "second", storage, "hydra.sweeper.n_trials=2", *SAME_STUDY),
        env=environment(uri),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    after = study_trials(storage, "on-slurm")
    assert [t.state for t in after] == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    _, all_runs = runs(uri)
    statuses = sorted(r.info.status for r in all_runs if r.data.tags["stage"] == "sweep")
    assert statuses == ["FINISHED", "FINISHED", "KILLED", "KILLED"]
    assert not [r for r in all_runs if r.info.status == "RUNNING"]
    _, (parent,) = runs(uri, "sweep_parent")  # one parent for the study, FINISHED again
    assert parent.info.status == "FINISHED"
