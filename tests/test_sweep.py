"""Optuna sweeps through train.py: one MLflow parent per sweep with the trials nested under it,
the chosen optimizer's search space, and studies that resume without repeating trials."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.samplers import TPESampler
from optuna.trial import TrialState

from gradalign.sampler import ResumableTPESampler

REPO_ROOT = Path(__file__).resolve().parents[1]
SEARCHED = {"adam": {"optimizer.lr"}, "gao": {"optimizer.lr", "optimizer.beta"}}


def suggestions(study, sampler, n):
    """Ask ``n`` trials of a study loaded with ``sampler`` (as a new sweeper process would)."""
    study = optuna.load_study(study_name=study.study_name, storage=study._storage, sampler=sampler)
    values = []
    for _ in range(n):
        trial = study.ask()
        values.append(trial.suggest_float("lr", 1e-4, 1e-1, log=True))
        study.tell(trial, values[-1])
    return values


def test_resumed_study_continues_the_seeded_stream_instead_of_replaying_it():
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage)
    first = suggestions(study, ResumableTPESampler(seed=0), 3)
    assert first == suggestions(optuna.create_study(), TPESampler(seed=0), 3)  # new study: TPE
    resumed = suggestions(study, ResumableTPESampler(seed=0), 3)
    assert not set(resumed) & set(first)
    replayed = suggestions(study, TPESampler(seed=0), 3)  # what the stock sampler would do
    assert replayed == first


def sweep_command(sweep_dir, *overrides):
    return [
        sys.executable, str(REPO_ROOT / "train.py"), "-m", f"hydra.sweep.dir={sweep_dir}",
        "dataset.generation.num_samples=1000", f"paths.data_cache={sweep_dir.parent / 'data'}",
        *overrides,
    ]


def environment(tmp_path):
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def runs(tmp_path, stage):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("gradient-alignment").experiment_id
    return client, client.search_runs([experiment_id], f"tags.stage = '{stage}'")


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adam", "gao"])
def test_three_trial_sweep_nests_trials_under_one_parent(tmp_path, optimizer):
    sweep_dir = tmp_path / "sweep"
    command = sweep_command(
        sweep_dir, f"optimizer={optimizer}", "hydra.sweeper.n_trials=3", "trainer.epochs=2"
    )
    result = subprocess.run(
        command, env=environment(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr

    client, (parent,) = runs(tmp_path, "sweep_parent")
    _, trials = runs(tmp_path, "sweep")
    assert parent.data.tags["sweep_id"] == str(sweep_dir)
    assert parent.data.params["sweeper.n_trials"] == "3"
    assert set(parent.data.params) >= {f"sweeper.params.{key}" for key in SEARCHED[optimizer]}
    assert len(trials) == 3
    assert sorted(t.data.tags["hydra_job_num"] for t in trials) == ["0", "1", "2"]
    for trial in trials:
        assert trial.info.status == "FINISHED"
        assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert trial.data.tags["sweep_id"] == str(sweep_dir)
        assert trial.data.tags["optimizer"] == optimizer
        assert len(client.get_metric_history(trial.info.run_id, "val_loss")) == 2
    for key in SEARCHED[optimizer]:  # each trial carries its own suggestion
        assert len({t.data.params[key] for t in trials}) == 3, key
    assert "optimizer.beta" not in trials[0].data.params or optimizer == "gao"
    best = (sweep_dir / "optimization_results.yaml").read_text()
    assert str(min(t.data.metrics["objective"] for t in trials)) in best


def study_trials(storage, name):
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


@pytest.mark.slow
def test_interrupted_study_resumes_without_repeating_finished_trials(tmp_path):
    """Interrupt a stored study inside its second trial, then run it again with the same
    command: finished trials stay, new trials are new points, the killed run ends KILLED."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    overrides = [
        "optimizer=gao", "trainer.epochs=100", "tracking.flush_interval_s=0",
        f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=resume",
    ]
    env = environment(tmp_path)
    first = subprocess.Popen(
        sweep_command(tmp_path / "first", "hydra.sweeper.n_trials=5", *overrides),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    # Wait until job 1 trains (has logged an epoch). Its directory appears after job 0 ended,
    # so both stores exist by then and polling them cannot race their schema creation.
    deadline = time.monotonic() + 240
    while not (tmp_path / "first" / "1" / ".hydra").is_dir() and time.monotonic() < deadline:
        time.sleep(0.2)
    client, _ = runs(tmp_path, "sweep")
    experiment_id = client.get_experiment_by_name("gradient-alignment").experiment_id
    while time.monotonic() < deadline:
        trials = client.search_runs([experiment_id], "tags.hydra_job_num = '1'")
        if trials and "val_loss" in trials[0].data.metrics:
            break
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=60) != 0

    before = study_trials(storage, "resume")
    finished = [t for t in before if t.state == TrialState.COMPLETE]
    assert [t.number for t in finished] == [0]
    assert [t.state for t in before[1:]] == [TrialState.RUNNING]  # stale; TPE ignores it

    second = subprocess.run(
        sweep_command(tmp_path / "second", "hydra.sweeper.n_trials=2", *overrides),
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert second.returncode == 0, second.stderr
    after = study_trials(storage, "resume")
    assert after[0].params == finished[0].params and after[0].value == finished[0].value
    new = [t for t in after if t.number >= 2]
    assert [t.state for t in new] == [TrialState.COMPLETE] * 2
    assert all(t.params != finished[0].params for t in new)

    _, trials = runs(tmp_path, "sweep")
    statuses = sorted(t.info.status for t in trials)
    assert statuses == ["FINISHED", "FINISHED", "FINISHED", "KILLED"]
    _, parents = runs(tmp_path, "sweep_parent")
    assert len(parents) == 2  # one per invocation (sweep directory)

