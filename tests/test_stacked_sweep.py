"""parallel=stacked: a sweep whose batches of trials train as one stacked model, in this
process, against the same sweep run serially (trial by trial): the same trials with the same
values, objectives and curves within float32 tolerance (rtol 1e-5, as tests/test_stacked.py
explains), each its own Optuna trial and complete MLflow run with its job's files; pruning per
trial against the trials of earlier batches; a study resumed from its storage; trials that
cannot stack train one by one."""

import math

import optuna
import pytest
from helpers import epoch_metrics, runs, train_in_process
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from gradalign import experiment
from gradalign.optuna_storage import open_storage
from gradalign.schema import Metric, Stage, Tag
from gradalign.sweep.pruning import JOURNAL
from gradalign.training import History

RTOL = 1e-5


def sweep(monkeypatch, tmp_path, tiny, name, parallel, *extra):
    """Run a 4-trial sweep (its first 4 TPE trials are its random start-up ones, so the values
    do not depend on the batching) into stores of its own; its (trials by number, runs by
    trial number, MLflow URI)."""
    uri = f"sqlite:///{tmp_path / f'{name}.db'}"
    storage = f"sqlite:///{tmp_path / f'{name}-optuna.db'}"
    code = train_in_process(
        monkeypatch,
        "-m",
        *parallel,
        *tiny,
        "hydra.sweeper.n_trials=4",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=s",
        f"hydra.sweep.dir={tmp_path / name}",
        f"tracking.uri={uri}",
        *extra,
    )
    assert code == 0
    trials = optuna.load_study(study_name="s", storage=storage).trials
    by_trial = {int(r.data.tags[Tag.OPTUNA_TRIAL]): r for r in runs(uri, "tags.stage = 'sweep'")}
    return trials, by_trial, uri


@pytest.mark.parametrize("optimizer", ["gao", "adamw", "sgd"])
def test_a_stacked_sweep_trains_the_trials_a_serial_sweep_trains(
    monkeypatch, tmp_path, tiny, optimizer
):
    """gao and adamw stack their trials (lr, beta, weight decay per model); sgd's trials differ
    in values SGD takes only for all models, so they train one by one, with the same results."""
    serial = sweep(monkeypatch, tmp_path, tiny, "serial", [f"optimizer={optimizer}"])
    stacked = sweep(
        monkeypatch,
        tmp_path,
        tiny,
        "stacked",
        [f"optimizer={optimizer}", "parallel=stacked", "parallel.workers=4"],
    )
    (serial_trials, serial_runs, serial_uri), (trials, by_trial, uri) = serial, stacked
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert [t.params for t in trials] == [t.params for t in serial_trials]
    assert len({t.params["optimizer.lr"] for t in trials}) == 4
    for trial, alone in zip(trials, serial_trials, strict=True):
        assert math.isclose(trial.value, alone.value, rel_tol=RTOL)
        run = by_trial[trial.number]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.info.status == "FINISHED"
        twin = serial_runs[trial.number]
        assert run.info.run_name == twin.info.run_name
        assert run.data.params == twin.data.params
        ignored = {"sweep_dir", "mlflow.parentRunId", "mlflow.note.content"}  # own stores, dirs
        tags = {k: v for k, v in run.data.tags.items() if k not in ignored}
        assert tags == {k: v for k, v in twin.data.tags.items() if k not in ignored}
        assert run.data.tags[Tag.HYDRA_JOB_NUM] == str(trial.number)
        note = run.data.tags["mlflow.note.content"]
        assert f"Trial {trial.number} of sweep" in note and "parallel=stacked" in note
        client, twin_client = MlflowClient(uri), MlflowClient(serial_uri)
        for metric in (Metric.TRAIN_LOSS, Metric.VAL_LOSS, Metric.TEST_ACC):
            mine = [m.value for m in client.get_metric_history(run.info.run_id, metric)]
            theirs = [m.value for m in twin_client.get_metric_history(twin.info.run_id, metric)]
            assert len(mine) == 2 and all(
                math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-6)
                for a, b in zip(mine, theirs, strict=True)
            )
        job_dir = tmp_path / "stacked" / str(trial.number)
        assert (job_dir / ".hydra" / "overrides.yaml").is_file()
        assert (
            f"tracking.optuna_trial={trial.number}"
            in (job_dir / ".hydra" / "overrides.yaml").read_text()
        )


# Median pruner after 2 complete trials, 3 epochs, batches of 2: trials 0 and 1 complete
# together; in the next batch trial 2 is worse than their median (1.1) at epoch 1 and trial 3
# at epoch 2 (1.5 > 1.0); trials 4 and 5, in the last batch, are better at every epoch.
PLANS = (
    [1.0, 0.9, 0.8],
    [1.2, 1.1, 1.0],
    [2.0, 1.9, 1.8],
    [1.05, 1.5, 0.1],
    [1.0, 0.95, 0.5],
    [0.9, 0.8, 0.7],
)


def planned_stacked_fits(monkeypatch):
    """Replace the stacked fit: model k of each call (its trials in order) follows the next
    plan's val losses, reporting and stopping as training.fit_models does."""
    plans = iter(PLANS)

    def planned(stack, optimizer, splits, *, epochs, data_seeds, on_epoch, should_stop, **_):
        losses = [next(plans) for _ in data_seeds]
        histories = [History([], False, None) for _ in data_seeds]
        for epoch in range(1, epochs + 1):
            for k, history in enumerate(histories):
                if history.stopped:
                    continue
                value = losses[k][epoch - 1]
                metrics = epoch_metrics(epoch, value, train_loss=value)
                history.epochs.append(metrics)
                on_epoch(k, metrics)
                if should_stop[k] is not None and should_stop[k](history) and epoch < epochs:
                    history.stopped = True
        return histories

    monkeypatch.setattr(experiment, "fit_models", planned)


def test_a_stacked_sweep_prunes_each_trial_against_the_earlier_batches(monkeypatch, tmp_path, tiny):
    planned_stacked_fits(monkeypatch)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = train_in_process(
        monkeypatch,
        "-m",
        "optimizer=gao",
        "parallel=stacked",
        "parallel.workers=2",
        *tiny,
        "trainer.epochs=3",
        "hydra/sweeper/pruner=median",
        "hydra.sweeper.pruner.n_startup_trials=2",
        "hydra.sweeper.n_trials=6",
        f"hydra.sweep.dir={tmp_path / 's'}",
        f"tracking.uri={uri}",
    )
    assert code == 0
    journal = open_storage(str(tmp_path / "s" / JOURNAL), 60)
    (name,) = optuna.get_all_study_names(journal)
    trials = optuna.load_study(study_name=name, storage=journal).trials
    assert [t.state.name for t in trials] == [
        "COMPLETE",
        "COMPLETE",
        "PRUNED",
        "PRUNED",
        "COMPLETE",
        "COMPLETE",
    ]
    assert [t.user_attrs.get("pruned_epoch") for t in trials] == [None, None, 1, 2, None, None]
    by_trial = {int(r.data.tags[Tag.OPTUNA_TRIAL]): r for r in runs(uri, "tags.stage = 'sweep'")}
    for trial in trials:
        run = by_trial[trial.number]
        assert run.info.status == "FINISHED"
        steps = MlflowClient(uri).get_metric_history(run.info.run_id, Metric.VAL_LOSS)
        assert sorted(m.step for m in steps) == sorted(trial.intermediate_values)
        pruned = trial.state == TrialState.PRUNED
        assert (run.data.tags.get(Tag.PRUNED) == "true") is pruned
        assert (Metric.OBJECTIVE in run.data.metrics) is not pruned


def test_a_stacked_sweep_resumes_its_stored_study(monkeypatch, tmp_path, tiny):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [
        "-m",
        "optimizer=gao",
        "parallel=stacked",
        "parallel.workers=3",
        *tiny,
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=r",
        f"tracking.uri={uri}",
    ]
    first = [*argv, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'a'}"]
    assert train_in_process(monkeypatch, *first) == 0
    resumed = [*argv, "hydra.sweeper.n_trials=5", f"hydra.sweep.dir={tmp_path / 'b'}"]
    assert train_in_process(monkeypatch, *resumed) == 0
    trials = optuna.load_study(study_name="r", storage=storage).trials
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]  # 3, then the budget of 5 grown by 2
    assert all(t.state == TrialState.COMPLETE for t in trials)
    sweep_runs = runs(uri, f"tags.stage = '{Stage.SWEEP}'")
    assert sorted(int(r.data.tags[Tag.OPTUNA_TRIAL]) for r in sweep_runs) == [0, 1, 2, 3, 4]
    assert {r.data.tags[Tag.SWEEP_ID] for r in sweep_runs} == {"optuna:r"}
    (parent,) = runs(uri, f"tags.stage = '{Stage.SWEEP_PARENT}'")
    assert {r.data.tags["mlflow.parentRunId"] for r in sweep_runs} == {parent.info.run_id}
