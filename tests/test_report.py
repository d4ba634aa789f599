"""The report against small MLflow stores built in each test: best-run selection (failed, killed,
metric-less and other-settings runs skipped), the missing-sweep error, final configs rebuilt from
logged params, a whole report with tiny final runs, and its rerun that trains nothing."""

import argparse
import base64
import dataclasses
import html
import json
import math
import os
import re
import shlex
import shutil
import signal
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch
from helpers import CONF, EXPERIMENT, REPO_ROOT, SIGNIFICANCE, options
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from gradalign import processes, schema
from gradalign.checks import UserError
from gradalign.config import ConfigError, config_hash, flatten
from gradalign.experiment import run_experiment
from gradalign.report import build as report_build
from gradalign.report import cli as report_cli
from gradalign.report import finals as report_finals
from gradalign.report import keys
from gradalign.report.build import FIGURE, MARKDOWN, write_report
from gradalign.report.cli import run_command
from gradalign.report.configs import (
    compose_config,
    compose_optimizer,
    final_config,
    hyperparameters,
    seeded,
    tuned_overrides,
)
from gradalign.report.finals import workers_worth_starting
from gradalign.report.html import to_html
from gradalign.report.runs import RUN_ID_ATTR, MissingSweepError, TuningBudget, curves, final_runs
from gradalign.report.settings import (
    ReportSettings,
    add_report_arguments,
    report_settings,
    report_settings_from_args,
)
from gradalign.sweep import trial as sweep_trial
from gradalign.tracking import store as tracking_store


@pytest.fixture
def store(tmp_path, tiny):
    """Training overrides pointing MLflow and outputs into tmp_path, on tiny data and budgets."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"tracking.uri={uri}", f"paths.outputs={tmp_path / 'out'}", *tiny]
    return uri, overrides


def experiment_id(uri):
    return tracking_store.experiment_id(uri, 60, EXPERIMENT)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One trial of a recorded sweep: its lr, its objective (None: none logged), its MLflow
    run's status and tags, and its Optuna state (None: the one the sweep loop records for such
    a run: gradalign.sweep.trial)."""

    lr: float
    objective: float | None = None
    status: str = "FINISHED"
    state: str | None = None
    tags: dict = dataclasses.field(default_factory=dict)

    def optuna_state(self):
        """The trial's Optuna state and value, as the sweep loop records this run."""
        if self.state is not None:
            return self.state, self.objective
        if self.tags.get("pruned") == "true":
            return "PRUNED", None
        if self.tags.get("diverged") == "true":
            return "COMPLETE", math.inf
        if self.status == "FINISHED" and self.objective is not None:
            return "COMPLETE", self.objective
        return ("RUNNING", None) if self.status == "RUNNING" else ("FAIL", None)


def log_sweep(uri, cfg, trials, *, storage=None, status="FINISHED", pruner=None, **params):
    """A sweep of ``cfg``'s optimizer as the sweep loop records it: its parent run (its
    sweeper's settings as params, ``status``, its study's trials by outcome as metrics), a
    trial run per Trial (flattened params with the trial's lr and ``params``, tags, objective,
    status) and, with ``storage`` (a SQLite file), its Optuna study, each trial naming its run.
    Its sweep_id."""
    client = MlflowClient(uri)
    experiment = experiment_id(uri)
    name = f"{cfg.optimizer.name}-{uuid.uuid4().hex[:8]}"
    sweep_id = f"optuna:{name}" if storage else f"outputs/multirun/{name}"
    url = f"sqlite:///{storage}" if storage else None
    study = optuna.create_study(study_name=name, storage=url) if storage else None
    tags = {"stage": "sweep_parent", "sweep_id": sweep_id, "optimizer": cfg.optimizer.name}
    parent = client.create_run(experiment, tags=tags).info.run_id
    sweeper = {
        "sweeper.n_trials": len(trials),
        "sweeper.storage": url,
        "sweeper.study_name": name if storage else None,
        "sweeper.pruner._target_": pruner or "optuna.pruners.NopPruner",
    }
    client.log_batch(parent, params=[Param(k, str(v)) for k, v in sweeper.items()])
    states = []
    for number, trial in enumerate(trials):
        tags = {"stage": "sweep", "optimizer": cfg.optimizer.name, "sweep_id": sweep_id}
        tags |= {"optuna_trial": str(number), "mlflow.parentRunId": parent, **trial.tags}
        run_id = client.create_run(experiment, tags=tags).info.run_id
        logged = {k: str(v) for k, v in flatten(cfg).items()} | {"optimizer.lr": str(trial.lr)}
        logged |= {k: str(v) for k, v in params.items()}
        objective = [] if trial.objective is None else [Metric("objective", trial.objective, 0, 0)]
        client.log_batch(run_id, metrics=objective, params=[Param(k, v) for k, v in logged.items()])
        if trial.status != "RUNNING":
            client.set_terminated(run_id, trial.status)
        state, value = trial.optuna_state()
        states.append("DIVERGED" if value == math.inf else state)
        if study is not None:
            asked = study.ask()
            asked.set_user_attr("mlflow_run_id", run_id)
            if state == "COMPLETE":
                study.tell(asked, value)
            elif state != "RUNNING":
                study.tell(asked, state=getattr(optuna.trial.TrialState, state))
    outcomes = {
        "complete": "COMPLETE",
        "diverged": "DIVERGED",
        "failed": "FAIL",
        "pruned": "PRUNED",
    }
    summary = [Metric(f"trials_{k}", states.count(v), 0, 0) for k, v in outcomes.items()]
    client.log_batch(parent, metrics=summary)
    time.sleep(0.002)  # parents end in the order their sweeps were made
    if status != "RUNNING":
        client.set_terminated(parent, status)
    return sweep_id


def runs_of(uri, sweep_id):
    """The trial run ids of sweep ``sweep_id``, in trial order."""
    found = MlflowClient(uri).search_runs(
        [experiment_id(uri)], f"tags.stage = 'sweep' and tags.sweep_id = '{sweep_id}'"
    )
    return [r.info.run_id for r in sorted(found, key=lambda r: int(r.data.tags["optuna_trial"]))]


def sweep(uri, overrides, name, lrs, **options):
    """A finished sweep of ``name``: one run per lr, objective = lr (so the smallest lr wins);
    its sweep_id."""
    cfg = compose_optimizer(CONF, name, overrides).cfg
    return log_sweep(uri, cfg, [Trial(lr, lr) for lr in lrs], **options)


def make_report(settings):
    """Write the report of ``settings``; its folder."""
    return write_report(settings).out_dir


def settings(overrides, **values):
    values = {"seeds": [1, 2], "final_epochs": 2, "jobs": 1} | values
    return report_settings(REPO_ROOT, values, overrides=overrides)


def choice_of(uri, overrides, name, **values):
    """The SweepChoice the report makes for optimizer ``name`` (settings ``values``; the
    budgets of the optimizers' sweeps are another test's)."""
    values = {"unequal_budgets": True} | values
    return report_build.plan(settings(overrides, **values)).choices[name]


def test_a_sweeps_best_is_its_best_complete_trial(store):
    """Pruned (stopped early), failed, killed, metric-less and diverged trials are counted by
    kind and never chosen; a sweep made with other settings is not read."""
    uri, overrides = store
    adam = compose_optimizer(CONF, "adam", overrides).cfg
    sweep(uri, overrides, "gao", [0.01])
    trials = [
        Trial(0.01, 1.2),
        Trial(0.02, 1.5),
        Trial(0.03, 0.9, status="KILLED"),  # better, but killed
        Trial(0.04, 0.8, status="FAILED"),
        Trial(0.05),  # finished without an objective
        Trial(0.07, 0.2, tags={"pruned": "true", "pruned_epoch": "1"}),  # stopped early
        Trial(0.08, tags={"diverged": "true"}, status="FAILED"),
    ]
    chosen = runs_of(uri, log_sweep(uri, adam, trials))[0]
    log_sweep(uri, adam, [Trial(0.06, 0.1)], **{"model.hidden": [10]})  # another model
    choice = choice_of(uri, overrides, "adam")
    assert (choice.run_id, choice.value, choice.params["optimizer.lr"]) == (chosen, 1.2, "0.01")
    assert choice.counts == {
        "complete": 2,
        "diverged": 1,
        "pruned": 1,
        "failed": 3,
        "unfinished": 0,
    }
    assert choice.budget == TuningBudget(4)  # complete, diverged, pruned: what n_trials counts
    assert (choice.other_sweeps, choice.other_settings) == ((), 1)
    assert choice.outcomes_from.startswith("MLflow (its study was not stored)")
    assert choice_of(uri, overrides, "adam", direction="maximize").value == 1.5


def test_each_optimizer_gets_its_latest_complete_sweep_never_a_pool(store):
    """`python train.py optimizer=gao -m`, then `make study`, then `python report.py`: gao has
    two complete sweeps, and the report takes the latest alone, never the best of both."""
    uri, overrides = store
    older = sweep(uri, overrides, "gao", [0.001, 0.02])  # the best gao run of all
    latest = sweep(uri, overrides, "gao", [0.005, 0.03])
    killed = sweep(uri, overrides, "gao", [0.002], status="KILLED")  # interrupted, newest
    sweep(uri, overrides, "adam", [0.01, 0.02])
    choice = choice_of(uri, overrides, "gao")
    assert (choice.sweep_id, choice.value, choice.budget) == (latest, 0.005, TuningBudget(2))
    assert choice.other_sweeps == (f"{killed} (KILLED, 1 trial)", f"{older} (FINISHED, 2 trials)")
    picked = choice_of(uri, overrides, "gao", sweeps=[older])  # selected explicitly
    assert (picked.sweep_id, picked.value) == (older, 0.001)
    with pytest.raises(UserError, match=r"two sweeps of 'gao'"):
        choice_of(uri, overrides, "gao", sweeps=[older, latest])
    with pytest.raises(UserError, match=r"'nope' is no sweep of the compared optimizers"):
        choice_of(uri, overrides, "gao", sweeps=["nope"])
    hidden = sweep(uri, overrides, "gao", [0.01], **{"model.hidden": [10]})
    with pytest.raises(UserError, match=rf"sweep {hidden} .* other settings .*'model.hidden'"):
        choice_of(uri, overrides, "gao", sweeps=[hidden])


def test_only_the_trials_their_optuna_study_completed_count(store, tmp_path):
    """After an interrupted sweep under older code, a trial can be FAIL in its Optuna study but
    FINISHED in MLflow: the study's record decides, so it is neither chosen nor counted in the
    budget; the study's name selects the sweep; a study whose storage is gone is read from
    MLflow, and the report says so."""
    uri, overrides = store
    adam = compose_optimizer(CONF, "adam", overrides).cfg
    storage = tmp_path / "optuna.db"
    trials = [
        Trial(0.01, 1.2),
        Trial(0.02, 0.7, state="FAIL"),  # the best objective in MLflow, FAIL in Optuna
        Trial(0.03, 1.1),
        Trial(0.04, 0.9, state="RUNNING"),  # left RUNNING in Optuna
    ]
    sweep_id = log_sweep(uri, adam, trials, storage=storage)
    sweep(uri, overrides, "gao", [0.01, 0.02])
    runs = runs_of(uri, sweep_id)
    study = sweep_id.removeprefix("optuna:")
    choice = choice_of(uri, overrides, "adam", sweeps=[study])
    assert (choice.run_id, choice.value) == (runs[2], 1.1)
    assert choice.counts == {
        "complete": 2,
        "diverged": 0,
        "pruned": 0,
        "failed": 1,
        "unfinished": 1,
    }
    assert (choice.budget, choice.outcomes_from) == (TuningBudget(2), "its Optuna study")
    storage.unlink()  # the study is gone: MLflow is all there is
    choice = choice_of(uri, overrides, "adam", sweeps=[study])
    assert choice.run_id == runs[1] and choice.outcomes_from.startswith("MLflow (its storage")


def test_unequal_budgets_are_refused_unless_asked_for_and_then_said_in_every_view(store):
    """Adam tuned with 2 trials against GAO's 3 (or GAO's 3 pruned ones) is refused, in one
    line that says how to select; --unequal-budgets compares them and every view of the
    verdict says so; a sweep of Adam with 3 trials, the latest, makes the budgets equal."""
    uri, overrides = store
    short = sweep(uri, overrides, "adam", [0.01, 0.02])
    gao = sweep(uri, overrides, "gao", [0.005, 0.02, 0.03])
    with pytest.raises(report_build.UnequalBudgets) as refused:
        make_report(settings(overrides, name="refused"))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        f"unequal tuning budgets: adam 2 trials (sweep {short}), gao 3 trials (sweep {gao}). "
    )
    assert "--sweeps ID" in message and "--unequal-budgets" in message
    assert not (Path(overrides[1].split("=", 1)[1]) / "report" / "refused").exists()

    folder = make_report(settings(overrides, name="unequal", unequal_budgets=True))
    said = "UNEQUAL TUNING BUDGETS: adam 2 trials, gao 3 trials."
    text = (folder / MARKDOWN).read_text()
    assert "SMOKE RUN, no verdict (2 paired seeds, fewer than the 5 a verdict needs " in text
    assert text.count(said) == 1  # in the verdict's sentence
    assert "- tuning budgets: adam 2 trials, gao 3 trials (UNEQUAL" in text
    assert "**The budgets are UNEQUAL**" in text
    client = MlflowClient(uri)
    [run] = client.search_runs([experiment_id(uri)], "tags.report_name = 'unequal'")
    assert run.data.tags["verdict/gao"].endswith(said)
    assert said in run.data.tags["mlflow.note.content"]
    params = run.data.params
    assert (params["report.trials.adam"], params["report.trials.gao"]) == ("2", "3")
    assert (params["report.sweep.adam"], params["report.sweep.gao"]) == (short, gao)
    assert params["report.unequal_budgets"] == "True"

    equal = sweep(uri, overrides, "adam", [0.03, 0.01, 0.02])
    plan = report_build.plan(settings(overrides))
    assert plan.equal_budgets and plan.budgets == "3 trials each"
    assert plan.choices["adam"].sweep_id == equal
    with pytest.raises(report_build.UnequalBudgets, match=rf"adam 2 trials \(sweep {short}\)"):
        report_build.plan(settings(overrides, sweeps=[short]))  # selected: refused again
    newest = sweep(uri, overrides, "adam", [0.1])
    with pytest.raises(report_build.UnequalBudgets) as refused:
        report_build.plan(settings(overrides, sweeps=[newest]))
    others = f"adam: {equal} (FINISHED, 3 trials), {short} (FINISHED, 2 trials); gao: none"
    assert f"(their other sweeps with these settings: {others})" in str(refused.value)

    pruned = sweep(uri, overrides, "gao", [0.01, 0.02, 0.03], pruner="optuna.pruners.MedianPruner")
    with pytest.raises(report_build.UnequalBudgets, match=r"gao 3 trials \(MedianPruner\)"):
        report_build.plan(settings(overrides, sweeps=[equal, pruned]))


def test_the_optuna_attribute_naming_a_trials_run_is_the_sweep_loops():
    assert RUN_ID_ATTR == sweep_trial.RUN_ID


def test_missing_sweep_names_the_command_and_writes_nothing(store, tmp_path):
    uri, overrides = store
    with pytest.raises(MissingSweepError, match="no MLflow experiment") as error:
        make_report(settings(overrides))
    assert "python train.py optimizer=adam" in str(error.value)

    sweep(uri, overrides, "adam", [0.01])
    with pytest.raises(MissingSweepError) as error:
        make_report(settings(overrides))
    message = str(error.value)
    assert "optimizer 'gao'" in message and "'adam'" not in message
    assert "python train.py optimizer=gao" in message and message.endswith(" -m")
    assert "trainer.epochs=2" in message  # the study's overrides, so the sweep matches
    assert not (tmp_path / "out" / "report").exists()


def test_final_config_reproduces_the_best_runs_params(store):
    _, overrides = store
    gao = compose_optimizer(CONF, "gao", overrides)
    assert gao.searched == {"optimizer.lr", "optimizer.beta"}
    best = {k: str(v) for k, v in flatten(gao.cfg).items() if k.startswith("optimizer.")}
    best |= {"optimizer.lr": "0.0012345678901234567", "optimizer.beta": "0.9"}  # beta: default
    cfg = final_config(CONF, gao, best, epochs=7)
    assert (cfg.optimizer.lr, cfg.optimizer.beta, cfg.trainer.epochs) == (
        0.0012345678901234567,
        0.9,
        7,
    )
    assert tuned_overrides(gao.cfg, best) == {"optimizer.lr": "0.0012345678901234567"}
    assert hyperparameters(gao, best) == {  # searched keys, even when equal to the default
        "optimizer.lr": "0.0012345678901234567",
        "optimizer.beta": "0.9",
    }
    with pytest.raises(ValueError, match="rerun its sweep"):
        final_config(CONF, gao, best | {"optimizer.gone": "1"}, epochs=7)
    a = seeded(cfg, 3)
    assert (a.seed.model, a.seed.data) == (3, 3)


def test_runs_of_one_seed_start_from_the_same_weights_whatever_the_optimizer(store):
    """run_experiment's init_hash tag: what the report compares across optimizers per seed."""
    uri, overrides = store
    gao, adam = (compose_optimizer(CONF, name, overrides).cfg for name in ("gao", "adam"))
    client = MlflowClient(uri)

    def init_tag(cfg, seed):
        _, run_id = run_experiment(seeded(cfg, seed))
        return client.get_run(run_id).data.tags["init_hash"]

    assert init_tag(gao, 3) == init_tag(adam, 3) != init_tag(adam, 4)


@pytest.mark.parametrize(
    "name,target,granularity",
    [
        ("gao_update", "update", "tensor"),
        ("gao_global", "grad", "global"),
        ("gao_row", "grad", "row"),
    ],
)
def test_gao_variants_are_gao_with_one_option_changed(name, target, granularity):
    cfg = compose_config(CONF, [f"optimizer={name}"])
    gao = compose_config(CONF, ["optimizer=gao"])
    assert (cfg.optimizer.name, cfg.optimizer.target, cfg.optimizer.granularity) == (
        name,
        target,
        granularity,
    )
    assert (cfg.optimizer.lr, cfg.optimizer.beta) == (gao.optimizer.lr, gao.optimizer.beta)


def test_report_trains_finals_once_and_a_rerun_reuses_them(store, tmp_path, monkeypatch):
    uri, overrides = store
    adam = compose_optimizer(CONF, "adam", overrides).cfg
    trials = [Trial(lr, lr) for lr in (0.02, 0.01, 0.03)]
    trials += [Trial(0.004, 0.004, status="FAILED"), Trial(0.005, 0.005, status="KILLED")]
    log_sweep(uri, adam, trials)  # the two best failed or were killed
    sweep(uri, overrides, "gao", [0.005, 0.02, 0.03])
    calls = []
    real = report_finals.run_experiment

    def counting(cfg, **kwargs):
        calls.append((cfg.optimizer.name, cfg.seed.model, cfg.seed.data, cfg.trainer.epochs))
        return real(cfg, **kwargs)

    monkeypatch.setattr(report_finals, "run_experiment", counting)
    first = make_report(settings(overrides, name="first"))
    assert sorted(calls) == [
        ("adam", 1, 1, 2),
        ("adam", 2, 2, 2),
        ("gao", 1, 1, 2),
        ("gao", 2, 2, 2),
    ]

    text = (first / MARKDOWN).read_text()
    assert (first / FIGURE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("adam", "gao"):
        assert f"| {name} |" in text
    assert "| adam | lr=0.01 |" in text and "| gao | lr=0.005, beta=0.9 |" in text  # the best
    # the budget, then complete, diverged, pruned, failed, unfinished: the skipped ones are said
    assert re.search(r"\| adam \| lr=0.01 \|.*\| 3 trials \| 3 \| 0 \| 0 \| 2 \| 0 \| MLflow", text)
    assert "Every optimizer was tuned with the same budget, 3 trials." in text
    assert "- tuning budgets: 3 trials each" in text
    # two seeds: a smoke run, its numbers under that label, no verdict in any view
    assert "## SMOKE RUN: no verdict" in text and "## Verdict" not in text
    assert "- SMOKE RUN, no verdict (2 paired seeds, fewer than the 5" in text
    assert not SIGNIFICANCE.search(text), SIGNIFICANCE.search(text)
    assert "4 trained by this report, 0 reused" in text

    client = MlflowClient(uri)
    exp = experiment_id(uri)
    [report_run] = client.search_runs([exp], "tags.stage = 'report'")
    finals = client.search_runs([exp], "tags.stage = 'final'")
    assert len(finals) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in finals} == {report_run.info.run_id}
    for seed in ("1", "2"):
        hashes = {r.data.tags["init_hash"] for r in finals if r.data.params["seed.model"] == seed}
        assert len(hashes) == 1  # same initial weights for every optimizer
    artifacts = {a.path for a in client.list_artifacts(report_run.info.run_id)}
    assert {FIGURE, MARKDOWN} <= artifacts
    assert report_run.data.tags["verdict/gao"].startswith("SMOKE RUN, no verdict")
    assert report_run.data.tags["smoke_run"] == "true"
    assert math.isfinite(report_run.data.metrics["gao/best_val_loss/mean"])
    assert math.isfinite(report_run.data.metrics["gao/best_val_loss/mean_diff"])
    assert "gao/best_val_loss/p_t" not in report_run.data.metrics  # no test statistic
    assert not SIGNIFICANCE.search(report_run.data.tags["mlflow.note.content"])

    calls.clear()
    second = make_report(settings(overrides, name="second"))
    assert calls == []  # nothing trained
    assert len(client.search_runs([exp], "tags.stage = 'final'")) == 4
    again = (second / MARKDOWN).read_text()
    assert "0 trained by this report, 4 reused" in again
    assert (
        again.split("## Per-seed values")[1].replace("reused", "trained")
        == text.split("## Per-seed values")[1]
    )  # the same runs and numbers
    assert (first / MARKDOWN).read_text() == text  # the first report is left as it was
    check_report_page(client, exp, first, "first")
    check_report_page(client, exp, second, "second")
    with pytest.raises(UserError, match="report .second. is complete"):
        make_report(settings(overrides, name="second"))

    gao_seed_1 = next(
        r for r in finals if (r.data.tags["optimizer"], r.data.params["seed.model"]) == ("gao", "1")
    )
    client.set_tag(gao_seed_1.info.run_id, "init_hash", "0" * 12)  # as if the model had changed
    with pytest.raises(UserError, match="seed 1: .* not start from the same initial weights"):
        make_report(settings(overrides, name="third"))


def check_report_page(client, exp, folder, name):
    """What MLflow's UI shows of report ``name``: its description opens on the verdict and
    shows the figure; report.html carries verdict and figure; its saved view lists its four
    final runs (trained or reused), grouped by optimizer."""
    [run] = client.search_runs([exp], f"tags.stage = 'report' and tags.report_name = '{name}'")
    rid = run.info.run_id
    note = run.data.tags["mlflow.note.content"]
    verdict = run.data.tags["verdict/gao"]
    assert note.startswith(f"{verdict}\n")  # plain: the Description column shows its words
    assert f"![convergence comparison](get-artifact?path={FIGURE}&run_uuid={rid})" in note
    assert run.info.run_name == f"report {name}: adam vs gao"
    assert "(SMOKE RUN)" in note
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    assert "report.html" in {a.path for a in client.list_artifacts(rid)}
    page_html = (folder / "report.html").read_text()
    figure = base64.b64encode((folder / FIGURE).read_bytes()).decode()
    assert f'src="data:image/png;base64,{figure}"' in page_html
    assert html.escape(run.data.tags["verdict/gao"], quote=False) in page_html
    assert "<table><tr><th>optimizer</th>" in page_html and "[convergence" not in page_html

    view = json.loads(client.get_experiment(exp).tags[f"mlflow.sharedViewState.report-{name}"])
    state = json.loads(view["state"])
    assert view["name"] == f"Report {name}: final runs by optimizer"
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "optimizer"}]
    listed = client.search_runs([exp], state["searchFilter"])  # the filter MLflow's UI sends
    assert len(listed) == 4 and {r.data.tags["stage"] for r in listed} == {"final"}
    assert {r.data.tags[f"reported_in/{name}"] for r in listed} == {rid}
    # its chart view opens on the verdict's outcome: the val loss curves, then the minimum
    first, *others = state["compareRunSections"]
    assert first["name"] == "the verdict's outcome: best_val_loss" and state["isAccordionReordered"]
    assert [s["name"] for s in others] == ["loss", "accuracy"]
    charts = [(c["type"], c["metricKey"], c["metricSectionId"]) for c in state["compareRunCharts"]]
    assert charts == [("LINE", "loss/val", first["uuid"]), ("BAR", "best_val_loss", first["uuid"])]
    assert {"loss/val", "best_val_loss"} <= set(listed[0].data.metrics)

    # the experiment's Reports view: per comparison its effect, CI, p and verdict; a smoke run
    # (2 seeds) fills the effect and the verdict's words, and has no interval, as it has no p
    view = json.loads(client.get_experiment(exp).tags["mlflow.sharedViewState.reports"])
    state = json.loads(view["state"])
    assert state["searchFilter"] == "tags.stage = 'report'"
    assert state["selectedColumns"] == [
        "tags.`optimizers`",
        "tags.`smoke_run`",
        *REPORTS_COLUMNS,
    ]  # once, however many reports widened it
    assert run.data.tags["smoke_run"] == "true" and "ci/gao" not in run.data.tags
    assert "gao/best_val_loss/mean_diff" in run.data.metrics
    assert "gao/best_val_loss/p_t" not in run.data.metrics


REPORTS_COLUMNS = [
    "metrics.`gao/best_val_loss/mean_diff`",
    "tags.`ci/gao`",
    "metrics.`gao/best_val_loss/p_t`",
    "tags.`verdict/gao`",
]


def test_finals_are_reused_when_finished_or_diverged_but_not_when_failed_or_killed(store):
    uri, _ = store
    client = MlflowClient(uri)
    experiment = experiment_id(uri)
    kinds = {
        1: ("FINISHED", {}),
        2: ("FAILED", {"diverged": "true"}),
        3: ("FAILED", {}),
        4: ("KILLED", {}),
    }
    for seed, (status, tags) in kinds.items():
        tags |= {"stage": "final", "config_hash": "h" * 12}
        run = client.create_run(experiment, tags=tags)
        for key in ("seed.model", "seed.data"):
            client.log_param(run.info.run_id, key, seed)
        client.set_terminated(run.info.run_id, status)
    assert sorted(final_runs(client, experiment, "h" * 12)) == [1, 2]


@pytest.mark.parametrize(
    "values,match",
    [
        (
            {"optimizers": ["adam", "adamm"]},
            r"optimizers=\['adam', 'adamm'\].*unknown: \['adamm'\]",
        ),
        ({"optimizers": ["adam"]}, "at least 2 distinct"),
        ({"baseline": "sgd"}, "baseline='sgd': must be one of the optimizers"),
        ({"seeds": []}, "seeds=\\[\\]"),
        ({"seeds": [1, 1]}, "distinct"),
        ({"final_epochs": 0}, "final_epochs=0"),
        ({"direction": "down"}, "direction='down'"),
        ({"primary": "best_epoch"}, "primary='best_epoch'"),
        ({"alpha": 1.5}, "alpha=1.5"),
        ({"jobs": 0}, "jobs=0"),
        ({"nope": 1}, r"unknown report settings \['nope'\]: allowed \['alpha', 'baseline'"),
        ({"min_pairs": 1}, "min_pairs=1: must be an integer >= 2"),
        ({"name": "../x"}, "name='../x': must be a folder name"),
        ({"seeds": [1, "2"]}, r"seeds=\[1, '2'\]: must be a list of distinct integers"),
        ({"sweeps": []}, r"sweeps=\[\]: must be null, or a list of distinct sweep ids"),
        ({"sweeps": ["a", "a"]}, r"sweeps=\['a', 'a'\]: must be null, or a list of distinct"),
        ({"unequal_budgets": "yes"}, r"unequal_budgets='yes': must be true or false"),
    ],
)
def test_bad_settings_name_the_value_and_what_is_allowed(values, match):
    with pytest.raises(ConfigError, match=match):
        report_settings(REPO_ROOT, values)


def test_bad_training_overrides_fail_before_any_query(store):
    _, overrides = store
    with pytest.raises(ValueError, match="invalid training-config overrides"):
        make_report(settings([*overrides, "model=no_such_model"]))
    with pytest.raises(ValueError, match="trainer.epochs=-1"):
        make_report(settings([*overrides, "trainer.epochs=-1"]))


def test_worker_processes_only_when_they_save_more_than_they_cost():
    assert workers_worth_starting([0.5] * 4, 2) == 1  # a quick study: seconds of training
    assert workers_worth_starting([3.0] * 10, 2) == 2  # ten 3 s runs: worth a second worker
    assert workers_worth_starting([100.0], 4) == 1  # one job needs one process


def test_report_html_is_the_markdown_with_its_images_inlined(tmp_path):
    (tmp_path / "fig.png").write_bytes(b"\x89PNG fake")
    markdown = "\n".join(
        [
            "# Title <x>",
            "",
            "- a: `code`",
            "- b: **bold**",
            "",
            "| h1 | h2 |",
            "|---|---|",
            "| 1 | 2 |",
            "",
            "![fig](fig.png)",
            "![remote](https://example.org/a.png)",
            "one",
            "paragraph",
        ]
    )
    page = to_html(markdown, tmp_path, "T")
    body = page.split("<body>")[1]
    figure = base64.b64encode(b"\x89PNG fake").decode()
    assert body.split("\n")[1:-2] == [
        "<h1>Title &lt;x&gt;</h1>",
        "<ul><li>a: <code>code</code></li><li>b: <b>bold</b></li></ul>",
        "<table><tr><th>h1</th><th>h2</th></tr>",
        "<tr><td>1</td><td>2</td></tr>",
        "</table>",
        f'<p><img alt="fig" src="data:image/png;base64,{figure}"></p>',
        '<p><img alt="remote" src="https://example.org/a.png"></p>',
        "<p>one paragraph</p>",
    ]


def test_curves_of_runs_logged_under_the_old_metric_keys_are_read_under_todays(store):
    uri, _ = store
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("before-the-rename")).info.run_id
    old = {
        "train_loss": [2.0, 1.0],
        "val_loss": [3.0, 2.0],
        "val_acc": [0.1, 0.2],
        "test_acc": [0.1, 0.3],
        "alignment/layers.0.weight": [0.5, 0.6],
    }
    points = [Metric(k, v, 0, step) for k, vs in old.items() for step, v in enumerate(vs, 1)]
    client.log_batch(run_id, metrics=points)
    assert curves(client, client.get_run(run_id)) == {
        schema.Metric.TRAIN_LOSS: [2.0, 1.0],
        schema.Metric.VAL_LOSS: [3.0, 2.0],
        schema.Metric.VAL_ACC: [0.1, 0.2],
        schema.Metric.TEST_ACC: [0.1, 0.3],
        f"{schema.Metric.ALIGNMENT_PREFIX}layers.0.weight": [0.5, 0.6],
    }


RECORDED = Path(__file__).parent / "fixtures" / "report_statistics.json"


def recorded_store(uri, overrides):
    """A store as a finished study leaves it: sweeps of adam and gao, and five final runs of
    each one's best configuration (seeds 1-5, a shared init_hash per seed) with fixed curves:
    gao's min val loss lower by about 0.03, its test accuracy noisier."""
    sweep(uri, overrides, "adam", [0.02, 0.01])
    sweep(uri, overrides, "gao", [0.005, 0.02])
    chosen = settings(overrides, seeds=[1, 2, 3, 4, 5], final_epochs=4, name="recorded")
    client = MlflowClient(uri)
    for name, cfg in report_build.plan(chosen).finals.items():
        shift = {"adam": 0.0, "gao": -0.03}[name]
        for seed in chosen.seeds:
            wobble = 0.01 * ((seed * 7 + len(name)) % 5 - 2)
            val = [1.5, 1.1 + shift + wobble, 1.0 + shift + 0.5 * wobble + 0.002 * seed, 1.05]
            acc = [0.3, 0.5 + wobble, 0.55 - shift - wobble, 0.54 + 0.01 * seed]
            tags = {"stage": "final", "optimizer": name, "init_hash": f"init-{seed}"}
            run_id = client.create_run(
                experiment_id(uri), tags={**tags, "config_hash": config_hash(cfg)}
            ).info.run_id
            curves = {"loss/train": [v - 0.2 for v in val], "loss/val": val,
                      "accuracy/val": acc, "accuracy/test": acc}  # fmt: skip
            client.log_batch(
                run_id,
                metrics=[
                    Metric(k, v, 0, e) for k, vs in curves.items() for e, v in enumerate(vs, 1)
                ],
                params=[Param("seed.model", str(seed)), Param("seed.data", str(seed))],
            )
            client.set_terminated(run_id, "FINISHED")
    return chosen


def test_the_report_of_a_recorded_store_gives_the_recorded_statistics(store):
    """What must not change while the report's code does: a report of final runs already in a
    store trains nothing and logs the same statistics and verdict as the code of main at
    900ff71 did (tests/fixtures/report_statistics.json, recorded from that code)."""
    uri, overrides = store
    chosen = recorded_store(uri, overrides)
    make_report(chosen)
    client = MlflowClient(uri)
    [run] = client.search_runs([experiment_id(uri)], "tags.stage = 'report'")
    assert len(client.search_runs([experiment_id(uri)], "tags.stage = 'final'")) == 10
    recorded = json.loads(RECORDED.read_text())
    assert run.data.metrics == recorded["metrics"]
    verdicts = {k: v for k, v in run.data.tags.items() if k.startswith("verdict/")}
    assert verdicts == recorded["verdicts"]
    assert verdicts["verdict/gao"].startswith("gao is significantly better than adam")
    # the Reports view's columns, each filled by this run: the interval is the recorded one
    assert run.data.tags["ci/gao"] == "[-0.04388, -0.01612] (95%)"
    view = client.get_experiment(experiment_id(uri)).tags["mlflow.sharedViewState.reports"]
    columns = json.loads(json.loads(view)["state"])["selectedColumns"]
    assert columns[-4:] == REPORTS_COLUMNS
    for column in REPORTS_COLUMNS:
        kind, key = column.split(".", 1)
        assert key.strip("`") in (run.data.metrics if kind == "metrics" else run.data.tags)


def test_an_optimizer_has_one_name_its_config_files(tmp_path):
    """The report asks for conf/optimizer/<name>.yaml and finds its runs by the tag its
    optimizer.name gives them: a file whose name: differs, or an override of it, is refused
    before anything is read."""
    for name in options("optimizer"):
        assert compose_optimizer(CONF, name, ()).cfg.optimizer.name == name
    with pytest.raises(ConfigError, match=r"optimizer.name='adamw' for conf/optimizer/adam.yaml"):
        compose_optimizer(CONF, "adam", ("optimizer.name=adamw",))
    shutil.copytree(CONF, tmp_path / "conf")
    gao = (tmp_path / "conf" / "optimizer" / "gao.yaml").read_text()
    (tmp_path / "conf" / "optimizer" / "mygao.yaml").write_text(gao)  # a copy, name: gao
    with pytest.raises(ConfigError, match=r"optimizer.name='gao' for conf/optimizer/mygao.yaml"):
        compose_optimizer(tmp_path / "conf", "mygao", ())


def test_every_report_key_is_one_field_with_its_yaml_line_flag_and_help():
    """The flags, the check and --help derive from ReportSettings' keys; conf/report.yaml
    holds exactly those keys, and --help shows each flag with the file's value."""
    declared = keys.keys(ReportSettings)
    written = OmegaConf.load(CONF.parent / "conf" / "report.yaml")
    assert set(declared) == set(written)
    parser = argparse.ArgumentParser()
    add_report_arguments(parser, REPO_ROOT)
    text = " ".join(parser.format_help().split())
    for name in declared:
        assert f"--{name.replace('_', '-')}" in text
    assert "epochs of each final run (null: each run's own trainer.epochs) (default: 100)" in text
    assert "one of best_val_loss, final_val_loss, test_acc_at_best, final_test_acc" in text
    argv = shlex.split(
        "--optimizers adam sgd gao --seeds 7 8 --final-epochs 3 --alpha 0.01 --min-pairs 2 "
        "--name n1 -- model=cnn"
    )
    got = report_settings_from_args(REPO_ROOT, parser.parse_args(argv), "cmd")
    assert (got.optimizers, got.seeds, got.final_epochs, got.alpha) == (
        ("adam", "sgd", "gao"), (7, 8), 3, 0.01)  # fmt: skip
    assert (got.min_pairs, got.name, got.overrides) == (2, "n1", ("model=cnn",))
    assert (got.baseline, got.primary) == ("adam", "best_val_loss")  # the file's
    with pytest.raises(ConfigError, match=r"direction='up': must be one of \['minimize', 'max"):
        report_settings_from_args(REPO_ROOT, parser.parse_args(["--direction", "up"]), "")


def test_a_new_key_is_a_field_and_its_flag_check_and_help_follow():
    """The mechanism on a key the report does not have: its flag (typed and counted from the
    annotation), its help (with the value used without it), its checks."""

    @dataclasses.dataclass(frozen=True)
    class Toy:
        warmup: int = keys.key("epochs of warm-up", allowed="an integer >= 0",
                               valid=lambda n: n >= 0, metavar="N")  # fmt: skip
        base: str = keys.key("an optimizer to wrap", group="optimizer")
        tags: tuple[str, ...] = keys.key("free tags", default=())

    parser = argparse.ArgumentParser()
    keys.add_flags(parser, Toy, REPO_ROOT, {"warmup": 3})
    text = " ".join(parser.format_help().split())
    assert "--warmup N epochs of warm-up (default: 3)" in text
    assert "an optimizer to wrap; one of adam, adamw, " in text and ", gao, gao_global," in text
    given = keys.given(parser.parse_args(["--warmup", "2", "--tags", "a", "b"]), Toy)
    assert given == {"warmup": 2, "tags": ["a", "b"]}
    values = {"warmup": 2, "tags": ["a"], "base": "gao"}
    assert keys.read(Toy, values, REPO_ROOT) == {"warmup": 2, "tags": ("a",), "base": "gao"}
    with pytest.raises(ConfigError, match=r"invalid setting warmup=-1: must be an integer >= 0"):
        keys.read(Toy, {"warmup": -1}, REPO_ROOT)
    with pytest.raises(ConfigError, match=r"warmup=True: must be an integer >= 0"):
        keys.read(Toy, {"warmup": True}, REPO_ROOT)  # a bool is not an integer
    with pytest.raises(ConfigError, match=r"base='nadam': must be one of \['adam', .*optimizer/"):
        keys.read(Toy, {"base": "nadam"}, REPO_ROOT)
    with pytest.raises(ConfigError, match=r"unknown toy settings \['x'\]: allowed \['base', "):
        keys.read(Toy, {"x": 1}, REPO_ROOT, what="toy settings")


def test_only_the_users_errors_become_one_line_anything_else_keeps_its_traceback(
    capsys, monkeypatch
):
    """report.py and study.py: a bad setting or a missing sweep is one line and exit 2; a bug
    (a shape mismatch, CUDA out of memory: a RuntimeError) is raised, traceback and all."""
    monkeypatch.delenv(processes.OWNER_ENV, raising=False)  # run_command adopts this process

    def command(argv, error):
        def run(settings):
            raise error

        return run_command(argv, "doc", add_report_arguments, report_settings_from_args, run,
                           REPO_ROOT, "report.py")  # fmt: skip

    assert command(["--alpha", "2"], RuntimeError("not reached")) == 2
    assert capsys.readouterr().err == (
        "error: invalid setting alpha=2.0: must be a number in (0, 1)\n"
    )
    missing = MissingSweepError("no usable sweep of optimizer 'gao'. Make one with: ...")
    assert command([], missing) == 2
    assert capsys.readouterr().err == f"error: {missing}\n"
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        command([], RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    with pytest.raises(torch.OutOfMemoryError):
        command([], torch.OutOfMemoryError("CUDA out of memory"))


@pytest.mark.parametrize("script", ["report.py", "study.py"])
def test_ctrl_c_or_sigterm_ends_report_and_study_in_one_line_and_exit_130(
    capsys, monkeypatch, script
):
    """Ctrl-C while report.py trains its final runs, or SIGTERM to study.py: one line that says
    what is kept and how to go on, exit status 130, no traceback (issue 26: a KeyboardInterrupt
    traceback, and no line at all)."""
    monkeypatch.delenv(processes.OWNER_ENV, raising=False)  # run_command adopts this process

    def command(run):
        return run_command([], "doc", add_report_arguments, report_settings_from_args, run,
                           REPO_ROOT, script)  # fmt: skip

    def ctrl_c(settings):
        error = KeyboardInterrupt()
        error.mlflow_run_id = "abc123"  # as tracking marks the run it ended KILLED
        raise error

    def sigterm(settings):
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal: sigterm_raises turns it to an error
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop it")

    again = "run the same command again to go on: "
    assert command(ctrl_c) == 130
    assert capsys.readouterr().err == (
        "interrupted (Ctrl-C): report run abc123 and the runs it had open are marked KILLED in "
        f"MLflow; {again}{report_cli.RESUMES[script]}\n"
    )
    assert command(sigterm) == 130
    assert capsys.readouterr().err == (
        "interrupted (SIGTERM): the runs it had open are marked KILLED in MLflow; "
        f"{again}{report_cli.RESUMES[script]}\n"
    )
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back as it was
