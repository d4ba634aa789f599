"""run_experiment and train.py: short runs per model and optimizer, checked in MLflow; the
divergence, error, interrupt and SIGTERM paths; early config errors; the batching contract."""

import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from helpers import REPO_ROOT, epoch_metrics, scales, train_in_process
from mlflow.tracking import MlflowClient

from gradalign import experiment, processes, tracking
from gradalign.progress import EpochProgress
from gradalign.schema import Metric


@pytest.fixture(scope="module")
def client(mlflow_uri):
    return MlflowClient(mlflow_uri)


def n_runs(client):
    experiment_ = client.get_experiment_by_name("gradient-alignment")
    return 0 if experiment_ is None else len(client.search_runs([experiment_.experiment_id]))


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("optimizer", ["adam", "gao", "adamw", "sgd"])
def test_short_run_is_tracked(compose_cfg, tiny, client, model, optimizer):
    cfg = compose_cfg(f"model={model}", f"optimizer={optimizer}", *tiny)
    history, run_id = experiment.run_experiment(cfg, searched=["optimizer.lr", "model.absent"])

    assert not history.diverged and [e.epoch for e in history.epochs] == [1, 2]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    lr = {0.01: "0.01", 0.1: "0.1"}[cfg.optimizer.lr]
    assert run.info.run_name == f"{optimizer} lr={lr} (single)"
    tags = run.data.tags
    assert (tags["optimizer"], tags["stage"]) == (optimizer, "single")
    assert tags["scheduler"] == "none" and Metric.LR not in run.data.metrics
    assert len(tags["config_hash"]) == len(tags["init_hash"]) == 12 and tags["git_commit"]
    # MLflow's own columns: Source, the git commit, the description with the outcome first
    assert tags["mlflow.source.name"] == "train.py" and tags["mlflow.source.type"] == "LOCAL"
    # (outside a git checkout, an sdist's, there is no commit: git_commit is "unknown")
    assert tags.get("mlflow.source.git.commit", "unknown") == tags["git_commit"]
    first, what = tags["mlflow.note.content"].split("\n\n")[:2]
    assert first.startswith(f"**objective {history.objective('last'):.4f}** · best_val_loss ")
    assert what.startswith(f"{optimizer} (lr={lr}) on mnist1d / {model}: 2 epochs")
    (dataset,) = run.inputs.dataset_inputs
    profile = json.loads(dataset.dataset.profile)
    assert dataset.dataset.name == "mnist1d" and len(dataset.dataset.digest) == 12
    assert profile["num_rows"] == profile["train"] + profile["val"] + profile["test"] == 1000
    assert [t.value for t in dataset.tags] == ["training"]
    spec = json.loads(dataset.dataset.schema)["mlflow_tensorspec"]
    shapes = {k: json.loads(v)[0]["tensor-spec"] for k, v in spec.items()}
    assert shapes == {
        "features": {"dtype": "float32", "shape": [-1, 40]},
        "targets": {"dtype": "int64", "shape": [-1]},
    }
    params = run.data.params
    assert params["optimizer.lr"] == str(cfg.optimizer.lr)
    assert params["model.name"] == model and params["seed.model"] == "0"
    assert not [k for k in params if k.startswith(("paths.", "tracking."))]
    metrics = run.data.metrics
    assert metrics["objective"] == pytest.approx(history.objective("last"))
    assert metrics["best_val_loss"] == pytest.approx(history.best_val_loss)
    assert metrics["best_epoch"] == history.best_epoch
    alignment = {k for k in metrics if k.startswith(Metric.ALIGNMENT_PREFIX)}
    summaries = {Metric.OBJECTIVE, Metric.BEST_VAL_LOSS, Metric.BEST_EPOCH}
    assert set(metrics) == {*Metric.PER_EPOCH, *alignment, *summaries}  # what the schema says
    for key in [*Metric.PER_EPOCH, *alignment]:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == [1, 2], key
    if optimizer == "gao":
        names = {f"{Metric.ALIGNMENT_PREFIX}{name}" for name in scales(history.epochs[0])}
        assert alignment == names and names
    else:
        assert not alignment


def test_a_scheduled_run_is_tracked_with_its_scheduler_and_each_epochs_lr(
    compose_cfg, tiny, client
):
    cfg = compose_cfg("optimizer=gao", "scheduler=warmup", "scheduler.total_iters=4", *tiny)
    history, run_id = experiment.run_experiment(cfg)

    run = client.get_run(run_id)
    assert run.data.tags["scheduler"] == "warmup"
    assert run.data.params["scheduler._target_"] == "torch.optim.lr_scheduler.LinearLR"
    assert run.data.params["scheduler.total_iters"] == "4"
    lrs = sorted((m.step, m.value) for m in client.get_metric_history(run_id, Metric.LR))
    # lr * (0.1 + 0.9 * (epoch - 1) / 4) for epochs 1 and 2
    assert lrs == [(1, pytest.approx(0.001)), (2, pytest.approx(0.00325))]
    assert [e[Metric.LR] for e in history.epochs] == [v for _, v in lrs]


def test_objective_kind_and_seeds(compose_cfg, tiny):
    best, _ = experiment.run_experiment(compose_cfg("objective=best", *tiny))
    again, _ = experiment.run_experiment(compose_cfg("objective=best", *tiny))
    other_data, _ = experiment.run_experiment(compose_cfg("seed.data=1", *tiny))
    other_init, _ = experiment.run_experiment(compose_cfg("seed.model=1", *tiny))
    losses = [
        [e[Metric.TRAIN_LOSS] for e in h.epochs] for h in (best, again, other_data, other_init)
    ]
    assert losses[0] == losses[1]  # same seeds: same run
    assert losses[2] != losses[0] and losses[3] != losses[0]


def test_parent_and_extra_tags_nest_the_run(compose_cfg, tiny, client):
    cfg = compose_cfg(*tiny)
    parent = client.create_run(client.get_experiment_by_name("gradient-alignment").experiment_id)
    _, run_id = experiment.run_experiment(
        cfg,
        stage="sweep",
        parent_run_id=parent.info.run_id,
        extra_tags={"sweep_id": "s1", "hydra_job_num": "4", "optuna_trial": "7"},
        searched=["optimizer.lr"],
    )
    tags = client.get_run(run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert (tags["stage"], tags["sweep_id"], tags["hydra_job_num"]) == ("sweep", "s1", "4")
    assert client.get_run(run_id).info.run_name == "adam lr=0.01 (trial 7)"
    assert "Trial 7 of sweep `s1`" in tags["mlflow.note.content"]
    assert client.get_run(parent.info.run_id).info.status == "RUNNING"  # a child never ends it
    assert tags["owner"] == processes.owner_token()


def test_diverged_run_ends_failed_with_reason(compose_cfg, tiny, client):
    cfg = compose_cfg("optimizer=sgd", "optimizer.lr=1e6", *tiny)
    history, run_id = experiment.run_experiment(cfg)
    assert history.diverged and history.objective("last") == math.inf
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["diverged"] == "true"
    assert run.data.tags["failure_reason"].startswith("non-finite train loss (")
    assert "objective" not in run.data.metrics  # a diverged run has no objective
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(f"**diverged**: {run.data.tags['failure_reason']}\n\nsgd (")


@pytest.mark.parametrize(
    "override", ["optimizer.lr=-1", "trainer.epochs=0", "trainer.batch_size=0", "objective=x"]
)
def test_bad_config_fails_before_any_run(compose_cfg, tiny, client, override):
    before = n_runs(client)
    key, value = override.split("=")
    with pytest.raises(ValueError, match=rf"{re.escape(key)}='?{re.escape(value)}"):
        experiment.run_experiment(compose_cfg(*tiny, override))
    assert n_runs(client) == before


def test_bad_optimizer_argument_fails_before_any_run(compose_cfg, tiny, client):
    before = n_runs(client)
    with pytest.raises(Exception, match="granularity"):
        experiment.run_experiment(compose_cfg("optimizer=gao", "optimizer.granularity=x", *tiny))
    assert n_runs(client) == before


def raise_in_first_epoch(monkeypatch, exception):
    """Make fit raise ``exception`` from its first on_epoch call (after metrics were logged)."""
    real_fit = experiment.fit_models

    def fit(*args, on_epoch, **kwargs):
        def raising(k, metrics):
            on_epoch(k, metrics)
            raise exception

        return real_fit(*args, on_epoch=raising, **kwargs)

    monkeypatch.setattr(experiment, "fit_models", fit)


def last_run(client):
    experiment_id = client.get_experiment_by_name("gradient-alignment").experiment_id
    return client.search_runs([experiment_id], order_by=["attributes.start_time DESC"])[0]


def test_error_ends_run_failed_and_propagates(compose_cfg, tiny, client, monkeypatch):
    raise_in_first_epoch(monkeypatch, RuntimeError("disk on fire"))
    with pytest.raises(RuntimeError, match="disk on fire"):
        experiment.run_experiment(compose_cfg(*tiny))
    run = last_run(client)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "RuntimeError: disk on fire"
    assert (
        len(client.get_metric_history(run.info.run_id, Metric.VAL_LOSS)) == 1
    )  # flushed on the way


def test_keyboard_interrupt_ends_the_run_killed_and_propagates(
    compose_cfg, tiny, client, monkeypatch
):
    raise_in_first_epoch(monkeypatch, KeyboardInterrupt())
    parent = client.create_run(client.get_experiment_by_name("gradient-alignment").experiment_id)
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(compose_cfg(*tiny), parent_run_id=parent.info.run_id)
    run = last_run(client)
    assert run.info.status == "KILLED"
    assert run.data.tags["failure_reason"] == "interrupted (KeyboardInterrupt)"
    assert run.data.tags["mlflow.note.content"].startswith(
        "**KILLED**: interrupted (KeyboardInterrupt)\n\n"
    )
    assert len(client.get_metric_history(run.info.run_id, Metric.VAL_LOSS)) == 1  # flushed
    assert client.get_run(parent.info.run_id).info.status == "RUNNING"  # its sweep ends it


def test_unreachable_tracking_server_fails_fast_before_any_run(compose_cfg, tiny, client):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens there
    before = n_runs(client)
    with pytest.raises(tracking.TrackingUnavailable, match=uri):
        experiment.run_experiment(compose_cfg(*tiny, f"tracking.uri={uri}"))
    assert n_runs(client) == before


def test_sigterm_ends_run_killed_and_restores_the_handler(compose_cfg, tiny, client, monkeypatch):
    real_fit = experiment.fit_models

    def fit(*args, on_epoch, **kwargs):
        def sigterm(k, metrics):
            on_epoch(k, metrics)
            os.kill(os.getpid(), signal.SIGTERM)

        return real_fit(*args, on_epoch=sigterm, **kwargs)

    monkeypatch.setattr(experiment, "fit_models", fit)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(tracking.Terminated):
        experiment.run_experiment(compose_cfg(*tiny))
    assert last_run(client).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("interval,expected_calls", [(0, 5 + 1), (3600, 1)])
def test_metrics_go_in_one_batch_per_flush_never_per_metric(
    compose_cfg, tiny, monkeypatch, interval, expected_calls
):
    """Calls: one per flush (every epoch with interval 0, the first with the params); the final
    one (the summary, with what is left)."""
    calls = []
    real = MlflowClient.log_batch

    def log_batch(self, run_id, **kwargs):
        calls.append(kwargs)
        return real(self, run_id, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    for name in ("log_metric", "log_param", "set_tag"):
        monkeypatch.setattr(MlflowClient, name, lambda *a, **k: pytest.fail("unbatched call"))
    flush = f"tracking.flush_interval_s={interval}"
    experiment.run_experiment(compose_cfg(*tiny, "optimizer=gao", "trainer.epochs=5", flush))
    assert len(calls) == expected_calls
    assert calls[0]["params"] and calls[0]["metrics"]
    assert not any(call["params"] for call in calls[1:])
    assert {m.key for m in calls[-1]["metrics"]} >= {"objective", "best_val_loss", "best_epoch"}


class Terminal(io.StringIO):
    def isatty(self):
        return True


def epoch(n, val_loss=1.5):
    return epoch_metrics(n, val_loss)


def test_progress_line_on_a_terminal_only():
    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        progress = EpochProgress("gao-single", 4, stream=stream)
        progress.update(epoch(1))
        progress.update(epoch(2, val_loss=1.25))
        progress.close()
    assert log.getvalue() == ""
    lines = terminal.getvalue().split("\r")
    assert "epoch 2/4 [==========          ]  val_loss 1.2500" in lines[2]
    assert lines[-1] == "\x1b[K"  # erased at the end


@pytest.mark.slow
def test_train_py_single_run(tmp_path, tiny, client):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            "optimizer=gao",
            "optimizer.beta=0.5",
            f"hydra.run.dir={tmp_path}",
            *tiny,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    run = last_run(client)
    assert run.info.status == "FINISHED" and run.data.params["optimizer.beta"] == "0.5"
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, ".hydra")}
    assert artifacts == {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"}
    assert f"mlflow run {run.info.run_id}" in result.stdout + result.stderr


@pytest.mark.parametrize(
    "argv,status,line",
    [
        (["optimizer.lr=-1"], 2, r"error: invalid optimizer config 'adam' \(optimizer.lr=-1\)"),
        (["model.hidden=[0]"], 2, r"error: invalid model config 'mlp' \(.*model.hidden=\[0\]"),
        (["trainer.epochs=0"], 2, r"error: invalid config value trainer.epochs=0: must be"),
        (
            ["optimizer=sgd", "optimizer.lr=1e30"],
            3,
            r"diverged: non-finite train loss \(.*\) at "
            r"epoch 1 step \d+; MLflow run \w{32} FAILED",
        ),
    ],
)
def test_a_single_run_that_cannot_finish_says_why_in_one_line(
    monkeypatch, capsys, tiny, tmp_path, argv, status, line
):
    code = train_in_process(monkeypatch, *tiny, *argv, f"hydra.run.dir={tmp_path}")
    err = capsys.readouterr().err
    assert code == status
    assert re.search(line, err), err
    assert "Traceback" not in err and "HYDRA_FULL_ERROR" not in err


def test_an_interrupted_single_run_says_which_run_it_marked_killed(
    monkeypatch, capsys, tiny, tmp_path, client
):
    raise_in_first_epoch(monkeypatch, KeyboardInterrupt())
    code = train_in_process(monkeypatch, *tiny, f"hydra.run.dir={tmp_path}")
    err = capsys.readouterr().err
    run = last_run(client)
    assert code == 130 and run.info.status == "KILLED"
    assert f"interrupted: MLflow run {run.info.run_id} marked KILLED" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "content,needle",
    [(b"garbage, not a database", "cannot be opened"), (b"", None)],
    ids=["garbage", "empty"],
)
def test_a_store_that_is_not_a_database_is_one_line_naming_the_file(
    monkeypatch, capsys, tiny, tmp_path, content, needle
):
    db = tmp_path / "mlflow.db"
    db.write_bytes(content)
    code = train_in_process(
        monkeypatch, *tiny, f"tracking.uri=sqlite:///{db}", f"hydra.run.dir={tmp_path / 'run'}"
    )
    err = capsys.readouterr().err
    if needle is None:  # an empty file is a new store
        assert code == 0
        return
    assert code == 2 and f"error: MLflow store {db} {needle}" in err
    assert f"mv {db} {db}.broken" in err and "Traceback" not in err
    assert db.read_bytes() == content  # left as it was


def test_a_store_in_a_missing_directory_is_refused_and_not_created(
    monkeypatch, capsys, tiny, tmp_path
):
    db = tmp_path / "typo" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    code = train_in_process(monkeypatch, *tiny, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and f"directory {db.parent} does not exist" in capsys.readouterr().err
    assert not db.parent.exists()
