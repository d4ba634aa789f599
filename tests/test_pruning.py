"""Trial pruning (hydra/sweeper/pruner): the pruner configs, the fit's early stop, the per-epoch
reports, a pruned sweep in this process (serial, and a resumed study) with planned val losses so
that what the median rule prunes is known exactly, study.py's option, and (slow) real sweeps in
joblib workers, in stacked batches and in two processes sharing one study."""

import hashlib
import math
import runpy
import subprocess

import optuna
import pytest
from helpers import (
    REPO_ROOT,
    TRAIN,
    compose_config,
    epoch_metrics,
    options,
    runs,
    train_in_process,
)
from mlflow.tracking import MlflowClient
from optuna.pruners import (
    HyperbandPruner,
    MedianPruner,
    NopPruner,
    PercentilePruner,
    SuccessiveHalvingPruner,
)
from optuna.trial import TrialState

from gradalign import experiment, processes
from gradalign.components import build_dataset, build_optimizer
from gradalign.experiment import seeded_model
from gradalign.optuna_storage import open_storage
from gradalign.report.study import StudySweep, trials_left
from gradalign.schema import Metric, Stage, Tag
from gradalign.sweep.pruning import JOURNAL, EpochPruning, build_pruner
from gradalign.training import History, fit

PRUNERS = {
    "none": NopPruner,
    "median": MedianPruner,
    "percentile": PercentilePruner,
    "successive_halving": SuccessiveHalvingPruner,
    "hyperband": HyperbandPruner,
}


def test_every_pruner_option_builds_its_optuna_class_with_overridable_arguments():
    assert options("hydra/sweeper/pruner") == sorted(PRUNERS)
    for name, cls in PRUNERS.items():
        cfg = compose_config(f"hydra/sweeper/pruner={name}", hydra=True)
        assert type(build_pruner(cfg.hydra.sweeper.pruner)) is cls
    assert compose_config(hydra=True).hydra.sweeper.pruner._target_.endswith("NopPruner")
    cfg = compose_config(
        "hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_warmup_steps=5", hydra=True
    )
    assert build_pruner(cfg.hydra.sweeper.pruner)._n_warmup_steps == 5
    cfg = compose_config("hydra/sweeper/pruner=hyperband", "trainer.epochs=40", hydra=True)
    assert build_pruner(cfg.hydra.sweeper.pruner)._max_resource == 40  # the trial's budget


def test_bad_pruner_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"pruner for MedianPruner \{'n_warmup_steps': -1\}"):
        build_pruner({"_target_": "optuna.pruners.MedianPruner", "n_warmup_steps": -1})
    with pytest.raises(ValueError, match=r"_target_='optuna.samplers.TPESampler': must name"):
        build_pruner({"_target_": "optuna.samplers.TPESampler"})


def test_a_bad_pruner_setting_stops_the_sweep_before_its_first_trial(
    monkeypatch, capsys, tmp_path, tiny
):
    tmp = tmp_path
    code = train_in_process(
        monkeypatch,
        "-m",
        "hydra/sweeper/pruner=percentile",
        "hydra.sweeper.pruner.percentile=150",
        f"hydra.sweep.dir={tmp / 's'}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        *tiny,
    )
    assert code == 2
    err = capsys.readouterr().err
    assert (
        "sweep not started, no trial run: invalid hydra.sweeper.pruner for PercentilePruner" in err
    )
    assert "150" in err
    assert not (tmp / "s" / JOURNAL).exists()
    assert not runs(f"sqlite:///{tmp / 'mlflow.db'}")


def test_fit_stops_after_the_epoch_should_stop_says_and_not_at_the_last(compose_cfg, tiny):
    cfg = compose_cfg(*tiny)
    splits = build_dataset(cfg)
    seen = []

    def stop_at(epoch):
        def should_stop(history):
            seen.append([m.epoch for m in history.epochs])
            return history.epochs[-1].epoch >= epoch

        return should_stop

    def run(should_stop):
        model = seeded_model(cfg, splits)
        optimizer = build_optimizer(cfg, model.parameters())
        return fit(
            model, optimizer, splits, epochs=4, batch_size=100, data_seed=0, device="cpu",
            should_stop=should_stop,
        )  # fmt: skip

    stopped = run(stop_at(2))
    assert stopped.stopped and [m.epoch for m in stopped.epochs] == [1, 2]
    assert seen == [[1], [1, 2]]
    seen.clear()
    full = run(stop_at(4))  # asked at the last epoch too, but a finished fit is not "stopped"
    assert not full.stopped and len(full.epochs) == 4 and seen[-1] == [1, 2, 3, 4]
    assert [m[Metric.VAL_LOSS] for m in full.epochs[:2]] == [
        m[Metric.VAL_LOSS] for m in stopped.epochs
    ]


def epochs_of(*val_losses):
    return [epoch_metrics(i, v, train_loss=v) for i, v in enumerate(val_losses, 1)]


@pytest.mark.parametrize(("objective", "expected"), [("last", [3, 1, 2]), ("best", [3, 1, 1])])
def test_each_epoch_reports_the_objective_so_far(objective, expected):
    study = optuna.create_study(pruner=NopPruner())
    trial = study.ask()
    report = EpochPruning(trial, objective)
    losses = [3.0, 1.0, 2.0]
    for n in range(1, 4):
        assert report(History(epochs_of(*losses[:n]), False, None)) is False
    assert study.trials[0].intermediate_values == dict(enumerate(map(float, expected), 1))


def planned_fits(monkeypatch, *plans):
    """Make the k-th fit of this process (one model each) log val losses plans[k], one per
    epoch, asking its should_stop after each as training.fit_models does."""
    calls = []

    def planned(models, optimizer, splits, *, epochs, on_epoch, should_stop, **kwargs):
        (stopping,) = should_stop
        plan = plans[len(calls)]
        calls.append(plan)
        assert len(plan) == epochs
        done = []
        for metrics in epochs_of(*plan):
            done.append(metrics)
            on_epoch(0, metrics)
            stop = stopping is not None and stopping(History(done, False, None))
            if stop and metrics.epoch < epochs:
                return [History(done, False, None, stopped=True)]
        return [History(done, False, None)]

    monkeypatch.setattr(experiment, "fit_models", planned)
    return calls


# Median pruner after 2 complete trials, 3 epochs: trial 2 is worse than the median of the two
# (1.1) at epoch 1; trial 3 is better at epoch 1 but worse than the median (1.0) at epoch 2;
# trial 4 is better at every epoch.
PLANS = ([1.0, 0.9, 0.8], [1.2, 1.1, 1.0], [2.0, 1.9, 1.8], [1.05, 1.5, 0.1], [1.0, 0.95, 0.5])
STATES = ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED", "COMPLETE"]
PRUNED_EPOCHS = [None, None, 1, 2, None]


def median_sweep(tmp_path, tiny, *extra):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, [
        "-m",
        "optimizer=sgd",
        *tiny,
        "trainer.epochs=3",
        "hydra/sweeper/pruner=median",
        "hydra.sweeper.pruner.n_startup_trials=2",
        "hydra.sweeper.max_failure_rate=0",  # a pruned trial is no failure
        f"tracking.uri={uri}",
        *extra,
    ]


def check_records(uri, trials, sweep_id):
    """Each trial's MLflow run agrees with its Optuna trial; the parent counts the study."""
    client = MlflowClient(uri)
    by_number = {
        int(r.data.tags[Tag.OPTUNA_TRIAL]): r
        for r in runs(
            uri, f"tags.{Tag.STAGE} = '{Stage.SWEEP}' and tags.{Tag.SWEEP_ID} = '{sweep_id}'"
        )
    }
    assert sorted(by_number) == [t.number for t in trials]
    for trial in trials:
        run = by_number[trial.number]
        assert run.info.status == "FINISHED"
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        steps = [m.step for m in client.get_metric_history(run.info.run_id, Metric.VAL_LOSS)]
        assert sorted(steps) == sorted(trial.intermediate_values)  # its curve so far
        if trial.state == TrialState.PRUNED:
            epoch = trial.user_attrs["pruned_epoch"]
            assert epoch == max(trial.intermediate_values) == max(steps)
            assert run.data.tags[Tag.PRUNED] == "true"
            assert run.data.tags[Tag.PRUNED_EPOCH] == str(epoch)
            assert Metric.OBJECTIVE not in run.data.metrics  # it did not train the budget
            assert trial.value == trial.intermediate_values[epoch]
        else:
            assert trial.state == TrialState.COMPLETE
            assert Tag.PRUNED not in run.data.tags and "pruned_epoch" not in trial.user_attrs
            assert run.data.metrics[Metric.OBJECTIVE] == trial.value
    (parent,) = runs(
        uri, f"tags.{Tag.STAGE} = '{Stage.SWEEP_PARENT}' and tags.{Tag.SWEEP_ID} = '{sweep_id}'"
    )
    assert parent.info.status == "FINISHED"
    states = [t.state for t in trials]
    assert {k: v for k, v in parent.data.metrics.items() if k.startswith("trials_")} == {
        Metric.TRIALS_COMPLETE: states.count(TrialState.COMPLETE),
        Metric.TRIALS_PRUNED: states.count(TrialState.PRUNED),
        Metric.TRIALS_FAILED: states.count(TrialState.FAIL),
        Metric.TRIALS_DIVERGED: 0,  # none diverged: complete counts those with a finite value
    }


def test_a_serial_sweep_prunes_what_the_median_rule_prunes(monkeypatch, tmp_path, tiny):
    planned_fits(monkeypatch, *PLANS)
    uri, argv = median_sweep(
        tmp_path, tiny, f"hydra.sweep.dir={tmp_path / 's'}", "hydra.sweeper.n_trials=5"
    )
    assert train_in_process(monkeypatch, *argv) == 0
    journal = tmp_path / "s" / JOURNAL  # no storage given: the sweeper kept the study here
    (name,) = optuna.get_all_study_names(open_storage(str(journal), 60))
    trials = optuna.load_study(study_name=name, storage=open_storage(str(journal), 60)).trials
    assert [t.state.name for t in trials] == STATES
    assert [t.user_attrs.get("pruned_epoch") for t in trials] == PRUNED_EPOCHS
    assert [len(t.intermediate_values) for t in trials] == [3, 3, 1, 2, 3]
    check_records(uri, trials, str((tmp_path / "s").resolve()))


def test_a_sweep_without_pruner_reports_nothing_and_keeps_its_study_in_memory(
    monkeypatch, tmp_path, tiny
):
    planned_fits(monkeypatch, *PLANS[:3])  # the third is the one the median rule prunes
    uri, argv = median_sweep(
        tmp_path, tiny, f"hydra.sweep.dir={tmp_path / 's'}", "hydra.sweeper.n_trials=3"
    )
    argv[argv.index("hydra/sweeper/pruner=median")] = "hydra/sweeper/pruner=none"
    argv.remove("hydra.sweeper.pruner.n_startup_trials=2")
    assert train_in_process(monkeypatch, *argv) == 0
    assert not (tmp_path / "s" / JOURNAL).exists()
    trials = runs(uri, "tags.stage = 'sweep'")
    assert len(trials) == 3 and all(Metric.OBJECTIVE in r.data.metrics for r in trials)
    assert all(Tag.PRUNED not in r.data.tags for r in trials)


def test_a_resumed_study_prunes_against_the_trials_stored_before(monkeypatch, tmp_path, tiny):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    planned_fits(monkeypatch, *PLANS)
    uri, argv = median_sweep(
        tmp_path, tiny, f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=r"
    )
    first = [*argv, f"hydra.sweep.dir={tmp_path / 'a'}", "hydra.sweeper.n_trials=2"]
    assert train_in_process(monkeypatch, *first) == 0  # the two trials the median needs
    resumed = [*argv, f"hydra.sweep.dir={tmp_path / 'b'}", "hydra.sweeper.n_trials=5"]  # 3 more
    assert train_in_process(monkeypatch, *resumed) == 0
    trials = optuna.load_study(study_name="r", storage=storage).trials
    assert [t.state.name for t in trials] == STATES
    assert [t.user_attrs.get("pruned_epoch") for t in trials] == PRUNED_EPOCHS
    assert not (tmp_path / "b" / JOURNAL).exists()  # the user's storage is the one reported to
    check_records(uri, trials, "optuna:r")


def test_study_py_sweeps_with_a_pruner_only_when_asked(tmp_path):
    overrides = ("trainer.epochs=3",)
    plain, pruned = StudySweep("gao", overrides, 0), StudySweep("gao", overrides, 0, "median")
    assert plain.study_name != pruned.study_name
    digest = hashlib.sha256(b'[["trainer.epochs=3"], 0]').hexdigest()[:10]
    assert plain.study_name == f"gao-{digest}"  # unpruned studies keep their stored names
    assert "hydra/sweeper/pruner=median" in pruned.command(tmp_path, 5, tmp_path)
    assert not any("pruner" in a for a in plain.command(tmp_path, 5, tmp_path))
    storage = tmp_path / "optuna.db"
    study = optuna.create_study(study_name=pruned.study_name, storage=f"sqlite:///{storage}")
    study.tell(study.ask(), 1.0)
    trial = study.ask()
    trial.report(2.0, 1)
    study.tell(trial, state=TrialState.PRUNED)  # a pruned trial is done: not swept again
    assert trials_left(open_storage(f"sqlite:///{storage}", 5), [pruned], 5) == {pruned: 3}


def test_study_py_refuses_an_unknown_pruner(capsys, monkeypatch):
    monkeypatch.delenv(processes.OWNER_ENV, raising=False)  # main adopts this process
    study_py = runpy.run_path(str(REPO_ROOT / "study.py"), run_name="study")
    assert study_py["main"](["--pruner", "nope"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: invalid setting pruner='nope': must be one of [")
        and "'median'" in err
    )


def real_sweep_checks(uri, storage, study_name, sweep_id, n):
    trials = optuna.load_study(study_name=study_name, storage=storage).trials
    assert len(trials) == n
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert any(t.state == TrialState.PRUNED for t in trials)
    assert not runs(uri, "attributes.status = 'RUNNING'")
    check_records(uri, trials, sweep_id)
    for trial in trials:
        losses = list(trial.intermediate_values.values())
        assert all(math.isfinite(v) for v in losses)
    return trials


REAL = [
    "optimizer=adam",
    "trainer.epochs=4",
    "hydra/sweeper/pruner=median",
    "hydra.sweeper.pruner.n_startup_trials=2",
]


@pytest.mark.slow
@pytest.mark.parametrize("preset, workers", [("joblib", 2), ("stacked", 3)])
def test_parallel_trials_report_through_the_journal_the_sweeper_provides(
    tmp_path, tiny, preset, workers
):
    """joblib's workers report their epochs through the journal in the sweep directory; a
    stacked batch (adam's lr per model) prunes trials of its later batches out of their stacks.
    Either way the real median rule prunes some trials, and every record agrees."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_dir = tmp_path / "s"
    result = subprocess.run(
        [*TRAIN, "-m", *tiny, *REAL, f"parallel={preset}", f"parallel.workers={workers}",
         "hydra.sweeper.n_trials=6", f"tracking.uri={uri}", f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    if preset == "stacked":
        assert "training jobs [3, 4, 5] as one stacked model" in result.stdout
    storage = open_storage(str(sweep_dir / JOURNAL), 60)
    (name,) = optuna.get_all_study_names(storage)
    real_sweep_checks(uri, storage, name, str(sweep_dir.resolve()), 6)


@pytest.mark.slow
def test_processes_sharing_a_study_prune_against_each_others_trials(tmp_path, tiny):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # n_trials is the shared study's whole budget: the two processes fill its 8 trials together
    common = [*TRAIN, "-m", *tiny, *REAL, "hydra.sweeper.n_trials=8", f"tracking.uri={uri}",
              f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=shared"]  # fmt: skip
    processes = [
        subprocess.Popen(
            [*common, f"hydra.sweep.dir={tmp_path / name}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name in ("a", "b")
    ]
    errors = [p.communicate(timeout=900)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    trials = real_sweep_checks(uri, storage, "shared", "optuna:shared", 8)
    owners = {t.user_attrs["owner"] for t in trials}
    assert len(owners) == 2  # both processes ran trials of the one study
