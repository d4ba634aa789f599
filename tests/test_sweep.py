"""Optuna sweeps through train.py, in this process (fast; test_scale.py runs them as real
processes): the sampler that resumes without replaying, failed and diverged trials recorded in
Optuna and MLflow while the sweep goes on, the failure budget, checks before the first trial,
and one sweep directory per sweep process."""

import json
import math
import os
import pickle
import re
import threading
from pathlib import Path

import optuna
import pytest
from helpers import asked_lrs, free_port, train_in_process
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import TPESampler
from optuna.trial import TrialState

from gradalign import experiment, tracking
from gradalign.components import build_dataset
from gradalign.schema import Metric
from gradalign.sweep import search_space, summary
from gradalign.sweep.checks import check_search_space
from gradalign.sweep.runs import open_parent
from gradalign.sweep.sampler import ResumableTPESampler
from gradalign.sweep.settings import check_search_keys
from gradalign.sweep.sweeper import CLAIM, claim_sweep_dir
from gradalign.sweep.trial import Outcome
from gradalign.tracking.labels import short_value

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_resumed_study_continues_the_seeded_stream_instead_of_replaying_it():
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(study_name="s", storage=storage)
    first = asked_lrs("s", storage, ResumableTPESampler(seed=0), 3)
    fresh = optuna.storages.InMemoryStorage()
    optuna.create_study(study_name="s", storage=fresh)
    assert first == asked_lrs("s", fresh, TPESampler(seed=0), 3)  # a new study: TPE's stream
    resumed = asked_lrs("s", storage, ResumableTPESampler(seed=0), 3)
    assert not set(resumed) & set(first)
    replayed = asked_lrs("s", storage, TPESampler(seed=0), 3)  # what the stock sampler would do
    assert replayed == first


def study_trials(storage, name):
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


@pytest.fixture
def stores(tmp_path, tiny):
    """Overrides for a 1-epoch sweep writing to an MLflow store and an Optuna storage in
    tmp_path, and readers of both."""
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    overrides = [
        *tiny,
        "trainer.epochs=1",
        f"tracking.uri={mlflow_uri}",
        f"hydra.sweep.dir={tmp_path / 's'}",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=s",
    ]

    def trials():
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        return study_trials(storage, "s") if "s" in names else []

    def sweep_runs():
        client = MlflowClient(mlflow_uri)
        experiment_ = client.get_experiment_by_name("gradient-alignment")
        if experiment_ is None:
            return []
        found = client.search_runs([experiment_.experiment_id], "tags.stage = 'sweep'")
        return sorted(found, key=lambda run: int(run.data.tags["optuna_trial"]))

    return overrides, trials, sweep_runs


def failing_fits(monkeypatch, *plan):
    """Make the k-th fit of this process do plan[k]: "ok", "raise" or "interrupt" (Ctrl-C)
    after logging its first epoch, or "diverge" (its optimizer's lr set to 1e6 first)."""
    real, calls = experiment.fit_models, []

    def fit(models, optimizer, *args, on_epoch, **kwargs):
        what = plan[len(calls)]
        calls.append(what)
        if what == "diverge":
            for group in optimizer.param_groups:
                group["lr"] = 1e6

        def raising(k, metrics):
            on_epoch(k, metrics)
            if what == "raise":
                raise RuntimeError("disk on fire")
            if what == "interrupt":
                raise KeyboardInterrupt

        return real(models, optimizer, *args, on_epoch=raising, **kwargs)

    monkeypatch.setattr(experiment, "fit_models", fit)


def test_failed_and_diverged_trials_are_recorded_in_both_systems_and_the_sweep_goes_on(
    monkeypatch, capsys, stores
):
    """A raised trial is no result: the sweep goes on, and runs another in its place (the
    budget, n_trials=2, counts results); a diverged trial is one."""
    overrides, trials, sweep_runs = stores
    failing_fits(monkeypatch, "ok", "raise", "diverge")
    code = train_in_process(
        monkeypatch,
        "-m",
        "optimizer=sgd",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.max_failure_rate=0.5",
        *overrides,
    )
    assert code == 0
    ok, raised, diverged = trials()
    assert [t.state for t in (ok, raised, diverged)] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
    ]
    assert math.isfinite(ok.value) and "failure_reason" not in ok.user_attrs
    assert raised.user_attrs["failure_reason"] == "RuntimeError: disk on fire"
    assert diverged.value == math.inf and diverged.user_attrs["diverged"] is True
    assert diverged.user_attrs["failure_reason"].startswith("non-finite train loss (")

    runs = sweep_runs()
    assert [r.data.tags["optuna_trial"] for r in runs] == ["0", "1", "2"]
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED", "FAILED"]
    assert runs[1].data.tags["failure_reason"] == "RuntimeError: disk on fire"
    assert Metric.VAL_LOSS in runs[1].data.metrics  # what it logged before raising
    assert runs[2].data.tags["diverged"] == "true"
    assert runs[2].data.tags["failure_reason"] == diverged.user_attrs["failure_reason"]
    assert ok.user_attrs["mlflow_run_id"] == runs[0].info.run_id
    assert diverged.user_attrs["mlflow_run_id"] == runs[2].info.run_id
    assert {r.data.tags["sweep_id"] for r in runs} == {"optuna:s"}
    assert [r.info.run_name for r in runs] == [
        f"sgd lr={short_value(float(r.data.params['optimizer.lr']))} "
        f"momentum={short_value(float(r.data.params['optimizer.momentum']))} (trial {n})"
        for n, r in enumerate(runs)
    ]
    uri = next(o for o in overrides if o.startswith("tracking.uri=")).split("=", 1)[1]
    check_parent_summary(capsys, MlflowClient(uri), runs, ok)


def check_parent_summary(capsys, client, runs, best):
    """The sweep's parent summarises it (1 complete, 1 diverged, 1 failed trial: ``best`` is
    the complete one), its saved view lists its trials best first, and the terminal said where
    it went at the start and what it found at the end."""
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    metrics, tags = parent.data.metrics, parent.data.tags
    assert metrics["best_objective"] == pytest.approx(best.value)
    counts = {k: metrics[f"trials_{k}"] for k in ("complete", "diverged", "failed", "pruned")}
    assert counts == {"complete": 1, "diverged": 1, "failed": 1, "pruned": 0}
    history = client.get_metric_history(parent.info.run_id, "trial_objective")
    assert [(m.step, m.value) for m in history] == [(0, pytest.approx(best.value))]
    assert tags["best_run_id"] == runs[0].info.run_id and tags["best_trial"] == "0"
    assert tags["best.optimizer.lr"] == str(best.params["optimizer.lr"])
    lr = short_value(best.params["optimizer.lr"])
    assert parent.info.run_name.startswith(f"sgd sweep s: best {best.value:.4g} (lr={lr} ")
    note = tags["mlflow.note.content"]
    assert note.startswith(f"**best objective {best.value:.4f} at trial 0 (lr={lr} ")
    assert f"/runs/{runs[0].info.run_id}?" in note and "1 complete, 1 diverged, 1 failed" in note
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "optimization_slice.png"} <= artifacts
    assert f"optimization_history.png&run_uuid={parent.info.run_id})" in note
    assert f"optimization_slice.png&run_uuid={parent.info.run_id})" in note

    experiment_tags = client.get_experiment(parent.info.experiment_id).tags
    [view] = [json.loads(v) for k, v in experiment_tags.items() if "sharedViewState.sweep-" in k]
    state = json.loads(view["state"])
    assert view["name"] == "Sweep s (sgd): trials by objective"
    listed = client.search_runs(
        [parent.info.experiment_id], state["searchFilter"], order_by=["metrics.objective ASC"]
    )  # as the UI asks for them
    assert listed[0].info.run_id == runs[0].info.run_id  # the others have no objective
    assert {r.info.run_id for r in listed} == {r.info.run_id for r in runs}
    assert "params.`optimizer.momentum`" in state["selectedColumns"]
    # its chart view opens on lr and momentum against the objective, over every trial
    assert state["runsHiddenMode"] == "SHOW_ALL"
    [section] = state["compareRunSections"]
    [chart] = [c for c in state["compareRunCharts"] if c["metricSectionId"] == section["uuid"]]
    assert chart["type"] == "PARALLEL" and chart["showAllRuns"]
    assert chart["selectedParams"] == ["optimizer.lr", "optimizer.momentum"]
    assert chart["selectedMetrics"] == ["objective"]
    # and the experiment's view of all runs shows the searched values
    runs = json.loads(json.loads(experiment_tags["mlflow.sharedViewState.runs"])["state"])
    assert {"params.`optimizer.lr`", "params.`optimizer.momentum`"} <= set(runs["selectedColumns"])

    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("sweep of sgd: 2 trials, outputs in ")
    assert out[1].startswith(f"MLflow parent run {parent.info.run_id}, its trials at http://")
    assert out[-1].startswith(
        "sweep FINISHED: 3 trials: 1 complete, 1 diverged, 1 failed, 0 pruned; "
        f"best objective {best.value:.4f} at trial 0 (lr={lr} "
    )


def test_the_sweep_stops_once_more_trials_failed_than_the_budget_allows(
    monkeypatch, capsys, stores
):
    overrides, trials, sweep_runs = stores
    failing_fits(monkeypatch, *["raise"] * 4)
    code = train_in_process(
        monkeypatch,
        "-m",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.max_failure_rate=0.25",
        *overrides,
    )
    assert code == 1  # 1 failure of 4 allowed: the second stops the sweep
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "sweep stopped: 2 trials raised, more than hydra.sweeper.max_failure_rate=0.25 of "
        "n_trials=4 allows (1); the last batch's first: RuntimeError: disk on fire"
    )
    assert [t.state for t in trials()] == [TrialState.FAIL, TrialState.FAIL]
    assert [r.info.status for r in sweep_runs()] == ["FAILED", "FAILED"]


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "optimizer.bta=interval(0.1,0.5)",
            r"search space key 'optimizer.bta' .* not in the config: 'optimizer' has \[.*'beta'",
        ),
        (
            "optimizer.beta=interval(0.5,1.5)",
            r"reaches 1.5: invalid optimizer config .*beta=1.5 is outside the allowed range",
        ),
        (
            "optimizer.lr=interval(-1,1)",
            r"reaches -1.0: .*'gao' \(.*optimizer.lr=-1.0.*\): Invalid learning rate: -1.0",
        ),
        ("trainer.epochs=0", r"trainer.epochs=0: must be an integer >= 1"),
        ("trainer.batch_size=0", r"trainer.batch_size=0: must be an integer >= 1"),
        (
            "optimizer.lr=-0.1",
            r"invalid optimizer config 'gao' \(.*\): Invalid learning rate: -0.1",
        ),
        ("optimizer.beta=1.0", r"invalid optimizer config 'gao' \(.*\): beta=1.0 is outside"),
        ("optimizer.lr=inf", r"optimizer.lr=inf: must be finite numbers"),
        ("optimizer.target=foo", r"target='foo' is not one of"),
        ("model.hidden=[0]", r"invalid model config 'mlp' \(.*\): model.hidden=\[0\] is invalid"),
        ("optimizer=adamm", r"(?s)Could not find 'optimizer/adamm'.*options in 'optimizer':.*adam"),
        ("model=no_such_model", r"(?s)Could not find 'model/no_such_model'.*options in 'model'"),
        ("dataset=mnist2d", r"(?s)Could not find 'dataset/mnist2d'.*options in 'dataset'"),
        ("hydra.sweeper.max_failure_rate=2", r"max_failure_rate=2.*\[0, 1\]"),
        ("tracking.uri=http://127.0.0.1:PORT", r"http://127.0.0.1:PORT \(unreachable"),
    ],
)
def test_bad_settings_fail_before_the_first_trial(monkeypatch, capsys, stores, override, message):
    overrides, trials, sweep_runs = stores
    port = str(free_port())
    monkeypatch.setattr(experiment, "fit_models", lambda *a, **k: pytest.fail("a trial ran"))
    code = train_in_process(
        monkeypatch, "-m", "optimizer=gao", *overrides, override.replace("PORT", port)
    )
    err = capsys.readouterr().err
    hydra_own = "Could not find" in message  # Hydra's config errors: its own exit status
    assert code == (1 if hydra_own else 2)
    assert re.search(message.replace("PORT", port), err)
    assert "Traceback" not in err
    if not hydra_own:  # gradalign's refusals are one line, with no hint to look further
        assert len(err.strip().splitlines()) == 1 and "HYDRA_FULL_ERROR" not in err
    assert trials() == [] and sweep_runs() == []


def test_a_search_space_in_the_config_is_checked_like_one_on_the_command_line(compose_cfg, tiny):
    cfg = compose_cfg("optimizer=gao", *tiny)
    splits = build_dataset(cfg)
    with pytest.raises(ValueError, match=r"'optimizer.bta' .* 'optimizer' has \["):
        check_search_keys(cfg, ["optimizer.bta=interval(0.5, 0.9)"])
    with pytest.raises(ValueError, match="'trainer.epoch' .* 'trainer' has"):
        check_search_keys(cfg, ["trainer.epoch=3"])  # fixed in hydra.sweeper.params
    with pytest.raises(ValueError, match=r"'optimzer.lr' .* top-level keys are \[.*'optimizer'"):
        check_search_keys(cfg, ["optimzer.lr=interval(0.1, 0.2)"])
    # group choices, appended keys and Hydra's settings pass
    check_search_keys(cfg, ["model=mlp,cnn", "+extra=interval(0, 1)", "hydra.job.name=x"])
    check_search_space(
        cfg,
        {"model": CategoricalDistribution(["mlp", "cnn"]), "+extra": FloatDistribution(0, 1)},
        splits,
    )
    with pytest.raises(ValueError, match="reaches 'fast'"):
        space = {"objective": CategoricalDistribution(["last", "fast"])}
        check_search_space(cfg, space, splits)


@pytest.mark.parametrize(
    "key,distribution,message",
    [
        (
            "optimizer.beta",
            FloatDistribution(0.5, 1.5),
            r"reaches 1.5: .*beta=1.5 is outside",
        ),
        ("optimizer.lr", FloatDistribution(-1.0, 0.1), "reaches -1.0: invalid optimizer config"),
        ("optimizer.target", CategoricalDistribution(["grad", "both"]), "target='both'"),
        ("model.residual", CategoricalDistribution([True, "no"]), "model.residual='no'"),
        (
            "dataset.val_fraction",
            FloatDistribution(0.1, 1.0),
            r"invalid dataset config 'mnist1d' \(.*\): dataset.val_fraction=1.0 is invalid",
        ),
    ],
)
def test_range_ends_are_built_by_the_components_that_would_refuse_them(
    compose_cfg, tiny, key, distribution, message
):
    cfg = compose_cfg("optimizer=gao", *tiny)
    with pytest.raises(ValueError, match=message):
        check_search_space(cfg, {key: distribution}, build_dataset(cfg))


def test_each_sweep_process_claims_its_own_directory(tmp_path):
    requested = tmp_path / "multirun" / "2026-01-01_00-00-00"
    first, second = claim_sweep_dir(requested), claim_sweep_dir(requested)
    assert first == requested and second == requested.with_name(requested.name + "-1")
    assert (first / CLAIM).read_text().split()[1] == str(os.getpid())
    (tmp_path / "empty").mkdir()
    assert claim_sweep_dir(tmp_path / "empty") == tmp_path / "empty"  # made but not claimed


def test_a_trials_outcome_is_a_plain_value_that_survives_pickling():
    outcome = Outcome("diverged", math.inf, "non-finite train loss")
    assert pickle.loads(pickle.dumps(outcome)) == outcome  # as launchers return it from workers
    assert outcome.attrs() == {"diverged": True, "failure_reason": "non-finite train loss"}
    assert Outcome("pruned", pruned_epoch=3).attrs() == {"pruned_epoch": 3}
    assert Outcome("complete", 1.5).attrs() == {}


def test_the_search_space_grammar_reads_as_hydra_optuna_sweeper_documents_it():
    space = search_space.parse(
        [
            "a=interval(0.1, 0.5)",
            "b=tag(log, interval(1e-4, 1e-1))",
            "c=range(1, 9, 2)",  # Hydra's range: 9 excluded
            "d=choice(x, 2, true)",
            "e=3",
            "f=interval(1, 8)",  # Hydra reads an interval's ends as floats
            "g=tag(log, interval(1, 64))",
            "h=range(0.5, 2.0, 0.5)",
            "i=shuffle(range(3))",
            "e=4",  # a later override replaces an earlier one
        ]
    )
    assert space.distributions == {
        "a": FloatDistribution(0.1, 0.5),
        "b": FloatDistribution(1e-4, 1e-1, log=True),
        "c": IntDistribution(1, 7, step=2),
        "d": CategoricalDistribution(["x", 2, True]),
        "f": FloatDistribution(1, 8),
        "g": FloatDistribution(1, 64, log=True),
        "h": FloatDistribution(0.5, 1.5, step=0.5),
        "i": space.distributions["i"],
    }
    assert sorted(space.distributions["i"].choices) == [0, 1, 2]  # in shuffled order
    assert list(space.distributions) == list("abcdfghi")  # the order the sampler draws in
    assert space.fixed == {"e": "4"}  # as the override gives it
    grid = search_space.parse(["c=range(1, 9, 2)", "h=range(0.5, 2.0, 0.5)", "d=choice(x,y)"])
    assert grid.grid() == {"c": [1, 3, 5, 7], "h": [0.5, 1.0, 1.5], "d": ["x", "y"]}
    with pytest.raises(ValueError, match="grid needs a discrete search space, but a is"):
        space.grid()


@pytest.mark.parametrize(
    "override,message",
    [
        ("optimizer.lr=range(1,0)", r"search space optimizer.lr=range\(1,0\): the range holds no"),
        ("optimizer.lr=interval(1,0)", r"search space optimizer.lr=interval\(1,0\): .*low"),
        ("optimizer.lr=tag(log, interval(0, 1))", r"optimizer.lr=tag\(log, interval\(0, 1\)\)"),
    ],
)
def test_a_search_space_optuna_cannot_sample_is_refused_naming_its_key(override, message):
    with pytest.raises(ValueError, match=message):
        search_space.parse([override])


def test_a_study_name_belongs_to_one_configuration(monkeypatch, capsys, stores):
    overrides, trials, sweep_runs = stores
    assert (
        train_in_process(monkeypatch, "-m", "optimizer=gao", "hydra.sweeper.n_trials=1", *overrides)
        == 0
    )
    before = len(trials())
    code = train_in_process(
        monkeypatch, "-m", "optimizer=adam", "hydra.sweeper.n_trials=1", *overrides
    )
    err = capsys.readouterr().err
    assert code == 2 and "study 's' in " in err and "belongs to another configuration" in err
    assert "optimizer.name: gao in the study, adam now" in err
    assert len(trials()) == before  # nothing added to the GAO study
    resumed = train_in_process(
        monkeypatch, "-m", "optimizer=gao", "hydra.sweeper.n_trials=2", *overrides
    )
    assert resumed == 0 and len(trials()) == before + 1  # the same configuration resumes


def sweep_once(monkeypatch, overrides, *extra, budget=1):
    return train_in_process(
        monkeypatch, "-m", "optimizer=sgd", f"hydra.sweeper.n_trials={budget}", *overrides, *extra
    )


def test_a_stored_study_resumes_after_its_mlflow_store_moved_and_keeps_its_parent(
    monkeypatch, tmp_path, stores
):
    """tracking.* says where runs are written, not what is computed: no part of the study."""
    overrides, trials, sweep_runs = stores
    assert sweep_once(monkeypatch, overrides) == 0
    (tmp_path / "mlflow.db").rename(tmp_path / "moved.db")
    moved = [o for o in overrides if not o.startswith("tracking.uri=")]
    moved.append(f"tracking.uri=sqlite:///{tmp_path / 'moved.db'}")
    assert sweep_once(monkeypatch, moved, budget=2) == 0
    assert [t.number for t in trials()] == [0, 1]
    runs = MlflowClient(f"sqlite:///{tmp_path / 'moved.db'}").search_runs(
        ["1"], "tags.stage = 'sweep'", order_by=["tags.optuna_trial"]
    )
    assert [r.data.tags["optuna_trial"] for r in runs] == ["0", "1"]
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1  # one parent


@pytest.mark.parametrize("how", ["emptied", "replaced"])
def test_a_new_study_beside_the_mlflow_sweep_of_its_name_is_refused_never_merged(
    monkeypatch, capsys, tmp_path, stores, how
):
    overrides, trials, sweep_runs = stores
    assert sweep_once(monkeypatch, overrides) == 0
    storage = tmp_path / "optuna.db"
    if how == "emptied":  # a 0-byte file where the study was
        storage.write_bytes(b"")
    else:  # another study of the same name (the file deleted, the name created again)
        storage.unlink()
        optuna.create_study(study_name="s", storage=f"sqlite:///{storage}")
    capsys.readouterr()
    assert sweep_once(monkeypatch, overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "sweep not started, no trial run: hydra.sweeper.study_name=s: the MLflow store "
    )
    assert "holds a sweep of that name (parent run " in err[0]
    assert len(sweep_runs()) == 1 and trials() == []  # nothing merged under the old parent


def test_a_rerun_completes_the_studys_budget_and_a_larger_one_adds_trials(
    monkeypatch, capsys, stores
):
    """hydra.sweeper.n_trials is the study's budget. Interrupted at its second trial, a sweep
    of 3 is resumed by the same command, which runs the 2 trials missing (the interrupted one
    is no result), not 3 more; run again, it runs none; a larger n_trials adds trials."""
    overrides, trials, sweep_runs = stores
    failing_fits(monkeypatch, "ok", "interrupt", "ok", "ok", "ok")
    assert sweep_once(monkeypatch, overrides, budget=3) == 130
    assert [t.state for t in trials()] == [TrialState.COMPLETE, TrialState.FAIL]
    capsys.readouterr()
    assert sweep_once(monkeypatch, overrides, budget=3) == 0
    said = capsys.readouterr()
    assert (
        "study 's': 1 of 3 trials done (hydra.sweeper.n_trials, the study's budget), running "
        "the 2 missing" in said.err.splitlines()
    )
    assert "2 trials, outputs in" in said.out
    complete = [TrialState.COMPLETE] * 2
    assert [t.state for t in trials()] == [TrialState.COMPLETE, TrialState.FAIL, *complete]
    assert sweep_once(monkeypatch, overrides, budget=3) == 0
    assert (
        "study 's': 3 of 3 trials done (hydra.sweeper.n_trials, the study's budget), so no "
        "trial runs; a larger hydra.sweeper.n_trials adds trials"
        in capsys.readouterr().err.splitlines()
    )
    assert len(trials()) == 4
    assert sweep_once(monkeypatch, overrides, budget=4) == 0  # the explicit way to add
    assert [t.state for t in trials()][4:] == [TrialState.COMPLETE]
    assert [r.info.status for r in sweep_runs()] == ["FINISHED", "KILLED", *["FINISHED"] * 3]


def test_a_sweep_whose_every_trial_diverged_fails(monkeypatch, capsys, stores):
    overrides, trials, sweep_runs = stores
    failing_fits(monkeypatch, "diverge", "diverge")
    code = train_in_process(
        monkeypatch, "-m", "optimizer=sgd", "hydra.sweeper.n_trials=2", *overrides
    )
    err = capsys.readouterr().err
    assert code == 1 and "sweep failed: all 2 trials diverged" in err
    assert [r.info.status for r in sweep_runs()] == ["FAILED", "FAILED"]


def test_a_relative_storage_is_taken_from_the_repository_root_whatever_the_cwd(
    monkeypatch, tmp_path, tiny
):
    root = tmp_path / "repo"
    (root / "outputs").mkdir(parents=True)
    for budget, cwd in enumerate(("first", "second"), 1):  # a resume from another directory
        (tmp_path / cwd).mkdir()
        monkeypatch.chdir(tmp_path / cwd)
        code = train_in_process(
            monkeypatch, "-m", *tiny, "trainer.epochs=1", f"hydra.sweeper.n_trials={budget}",
            f"paths.root={root}", f"hydra.sweep.dir={tmp_path / cwd / 's'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "hydra.sweeper.storage=sqlite:///outputs/optuna.db", "hydra.sweeper.study_name=rel",
        )  # fmt: skip
        assert code == 0 and not (tmp_path / cwd / "outputs").exists()
    trials = study_trials(f"sqlite:///{root / 'outputs' / 'optuna.db'}", "rel")
    assert [t.number for t in trials] == [0, 1]  # one study, resumed: no repeated trial number


def test_a_summary_counts_trials_by_outcome_and_follows_the_best_so_far(tmp_path):
    space = {
        "optimizer.lr": FloatDistribution(1e-7, 1e-1, log=True),
        "optimizer.beta": FloatDistribution(0.5, 0.999),
    }
    study = optuna.create_study()
    plan = [
        (TrialState.COMPLETE, 1.5),
        (TrialState.COMPLETE, 1.2),
        (TrialState.FAIL, None),
        (TrialState.PRUNED, None),
        (TrialState.COMPLETE, math.inf),  # diverged
        (TrialState.COMPLETE, 1.3),
    ]
    for number, (state, value) in enumerate(plan):
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                value=value,
                params={"optimizer.lr": 10.0 ** -(number + 1), "optimizer.beta": 0.9},
                distributions=space,
                user_attrs={"mlflow_run_id": f"run{number}"},
            )
        )
    found = summary.summarize(study)
    counts = {o: found.count(o) for o in summary.OUTCOMES}
    assert counts == {"complete": 3, "diverged": 1, "failed": 1, "pruned": 1, "running": 0}
    assert (found.best.number, found.best.value, found.best.run_id) == (1, 1.2, "run1")
    assert found.best_so_far() == [(0, 1.5, 1.5), (1, 1.2, 1.2), (5, 1.3, 1.2)]
    assert summary.best_text(found) == "best objective 1.2000 at trial 1 (lr=0.01 beta=0.9)"
    assert found.counts_text() == "6 trials: 3 complete, 1 diverged, 1 failed, 1 pruned"
    figures = summary.history_figures(study, tmp_path, "title")
    assert figures == [tmp_path / name for name in summary.FIGURES]
    assert all(figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for figure in figures)
    assert summary.best_text(summary.summarize(optuna.create_study())) == (
        "no trial completed with a finite objective"
    )


def test_two_processes_ending_one_study_together_leave_the_newer_count(
    monkeypatch, tmp_path, compose_cfg
):
    """Two sweep processes of one study end at once: the first reads the study while the
    other's last trial still runs, then draws its figure slowly; the other tells that trial
    and writes its summary. The parent keeps the count read last (3 pruned), never the older
    one written late (2)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "s").mkdir()
    cfg = compose_cfg(f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path / 's'}", hydra=True)
    store = tracking.connect(cfg.tracking)
    parent_run_id = open_parent(store, cfg)
    study = optuna.create_study()
    for _ in range(2):
        study.tell(study.ask(), state=TrialState.PRUNED)
    last = study.ask()
    draw, drawing, released = summary.history_figures, threading.Event(), threading.Event()

    def slowly(*args, **kwargs):
        if threading.current_thread() is first:
            drawing.set()
            released.wait(timeout=3)  # the other process writes meanwhile, if it may
        return draw(*args, **kwargs)

    monkeypatch.setattr(summary, "history_figures", slowly)
    ending = (store, cfg, parent_run_id, study, RunStatus.FINISHED, None)
    first = threading.Thread(target=summary.finish, args=ending)
    first.start()
    assert drawing.wait(timeout=60)
    study.tell(last, state=TrialState.PRUNED)
    summary.finish(*ending)
    released.set()
    first.join(timeout=60)
    metrics = MlflowClient(uri).get_run(parent_run_id).data.metrics
    assert metrics[Metric.TRIALS_PRUNED] == 3
