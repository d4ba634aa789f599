"""One trial in both stores (gradalign.sweep.trial): the outcome a job returns is the one its
MLflow run records, and a trial left RUNNING in Optuna is completed from its MLflow run: a
finished run with an objective makes it COMPLETE with that value (never FAIL), a pruned one
PRUNED, a diverged one COMPLETE with inf, a killed or failed one FAIL; a run still open is ended
KILLED when its process is gone (or the sweep says so), and left alone while its process lives."""

import math
import socket

import optuna
import pytest
from helpers import epoch_metrics
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from gradalign import processes, tracking
from gradalign.schema import Metric as M
from gradalign.sweep.trial import Outcome, outcome_of_history, outcome_of_run, settle
from gradalign.training import History

GONE = f"{socket.gethostname()}:1:0.00"  # pid 1 did not start at 0: a process that is gone


def test_an_owner_that_is_no_process_token_is_unknown_not_gone():
    """A trial another process has just asked has no owner yet: nobody may settle it."""
    assert processes.owner_alive("") is None and processes.owner_alive("x:y") is None
    assert processes.owner_alive(GONE) is False and processes.owner_alive(processes.owner_token())


def epoch(n, val_loss):
    return epoch_metrics(n, val_loss)


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    return client, experiment


def job_run(store, history, objective="last"):
    """A trial's run as its job leaves it (tracking.Run.finish); its id."""
    client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    run = tracking.Run(client, run_id, params={}, flush_interval_s=0)
    for metrics in history.epochs:
        run.log_epoch(metrics)
    run.finish(history, history.objective(objective))
    return run_id


HISTORIES = {
    "complete": History([epoch(1, 1.5), epoch(2, 1.25)], False, None),
    "best": History([epoch(1, 1.25), epoch(2, 1.5)], False, None),
    "pruned": History([epoch(1, 1.5), epoch(2, 1.25)], False, None, stopped=True),
    "diverged": History([epoch(1, 1.5)], True, "non-finite train loss at 2"),
}


@pytest.mark.parametrize("name", HISTORIES)
def test_the_outcome_a_job_returns_is_the_one_its_mlflow_run_records(store, name):
    objective = "best" if name == "best" else "last"
    history = HISTORIES[name]
    run_id = job_run(store, history, objective)
    from_job = outcome_of_history(history, objective)
    assert outcome_of_run(store[0].get_run(run_id)) == from_job
    assert from_job.kind == {"best": "complete"}.get(name, name)
    if name in ("complete", "best"):
        assert from_job.value == 1.25  # exactly: MLflow keeps the float64
    if name == "diverged":
        assert from_job == Outcome("diverged", math.inf, "non-finite train loss at 2")


def trial_with_run(study, client, experiment, *, status=None, objective=None, tags=None):
    """A RUNNING trial of ``study`` whose MLflow run has ``status``/``objective``/``tags``."""
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    run_id = client.create_run(experiment, tags=tags or {}).info.run_id
    if objective is not None:
        client.log_batch(run_id, metrics=[Metric(M.OBJECTIVE, objective, 0, 0)])
    if status is not None:
        client.set_terminated(run_id, status)
    return trial.number, run_id


def test_trials_left_running_take_the_outcome_their_mlflow_runs_record(store):
    client, experiment = store
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage)
    me = processes.owner_token()
    records = [  # (status, objective, tags) of each trial's run
        ("FINISHED", 1.2345, {}),
        ("FINISHED", None, {"pruned": "true", "pruned_epoch": "3"}),
        ("FAILED", None, {"diverged": "true", "failure_reason": "nan"}),
        ("KILLED", None, {}),
        (None, None, {"owner": GONE}),  # still RUNNING
        (None, None, {"owner": me}),  # its job still runs
    ]
    runs = dict(
        trial_with_run(study, client, experiment, status=status, objective=value, tags=tags)
        for status, value, tags in records
    )
    runs[study.ask().number] = None  # killed before its run was created
    running = study.get_trials(states=(TrialState.RUNNING,))
    done = settle(study, storage, running, client, lambda trial: runs[trial.number])
    assert {n: o.kind for n, o in done.items()} == {
        0: "complete",
        1: "pruned",
        2: "diverged",
        3: "failed",
        4: "failed",
        6: "failed",
    }
    trials = study.get_trials()
    assert [t.state.name for t in trials] == [
        "COMPLETE",
        "PRUNED",
        "COMPLETE",
        "FAIL",
        "FAIL",
        "RUNNING",
        "FAIL",
    ]
    assert trials[0].value == 1.2345 and trials[2].value == math.inf
    assert trials[1].user_attrs["pruned_epoch"] == 3
    assert trials[2].user_attrs == {"diverged": True, "failure_reason": "nan"}
    assert trials[4].user_attrs["failure_reason"] == f"interrupted: its process {GONE} is gone"
    assert client.get_run(runs[4]).info.status == "KILLED"  # MLflow first
    assert client.get_run(runs[5]).info.status == "RUNNING"  # left to its live process

    forced = settle(study, storage, [trials[5]], client, lambda t: runs[5], force="interrupted")
    assert forced[5] == Outcome("failed", reason="interrupted")
    assert client.get_run(runs[5]).data.tags["failure_reason"] == "interrupted"


def test_a_dry_run_says_what_it_would_record_and_writes_nothing(store):
    client, experiment = store
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage)
    number, run_id = trial_with_run(study, client, experiment, status="FINISHED", objective=2.5)
    running = study.get_trials(states=(TrialState.RUNNING,))
    done = settle(study, storage, running, client, lambda t: run_id, dry_run=True)
    assert done == {number: Outcome("complete", 2.5)}
    assert study.get_trials()[0].state == TrialState.RUNNING
