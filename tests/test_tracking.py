"""gradalign.tracking: batching within MLflow's limits, the experiment-creation race, and one
sweep parent per sweep even when trials run in separate processes."""

import multiprocessing

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from gradalign import tracking


class RecordingClient:
    def __init__(self):
        self.calls = []

    def log_batch(self, run_id, metrics, params, tags):
        self.calls.append((len(metrics), len(params), len(tags)))


def test_log_batch_respects_mlflows_per_call_limits():
    client = RecordingClient()
    metrics = [Metric(f"m{i}", 0.0, 0, 0) for i in range(1500)]
    params = {f"p{i}": i for i in range(250)}
    tracking._log_batch(client, "run", metrics=metrics, params=params, tags={"t": "1"})
    assert client.calls == [(899, 100, 1), (601, 100, 0), (0, 50, 0)]
    assert all(sum(call) <= 1000 for call in client.calls)


def test_log_batch_of_a_usual_run_is_one_call():
    client = RecordingClient()
    tracking._log_batch(client, "run", params={f"p{i}": i for i in range(30)})
    assert client.calls == [(0, 30, 0)]


def store(tmp_path, experiment="exp"):
    db = tmp_path / "store" / "mlflow.db"
    return OmegaConf.create(
        {"uri": f"sqlite:///{db}", "experiment": experiment, "flush_interval_s": 1.0}
    )


def test_sqlite_experiment_keeps_artifacts_beside_the_database(tmp_path):
    cfg = store(tmp_path)
    experiment_id = tracking._experiment_id(cfg.uri, cfg.experiment)
    location = MlflowClient(cfg.uri).get_experiment(experiment_id).artifact_location
    assert location.removeprefix("file://") == str(tmp_path / "store" / "artifacts")


def test_experiment_created_concurrently_is_fetched(tmp_path, monkeypatch):
    cfg = store(tmp_path)
    other = MlflowClient(cfg.uri).create_experiment(cfg.experiment)  # the other process won
    real = MlflowClient.get_experiment_by_name
    lookups = []

    def stale_then_real(self, name):  # our first look-up ran before the other process created it
        lookups.append(name)
        return None if len(lookups) == 1 else real(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", stale_then_real)
    assert tracking._experiment_id(cfg.uri, cfg.experiment) == other


def test_deleted_experiment_is_a_clear_error(tmp_path):
    cfg = store(tmp_path, experiment="gone")
    client = MlflowClient(cfg.uri)
    client.delete_experiment(client.create_experiment("gone"))
    with pytest.raises(ValueError, match="deleted"):
        tracking._experiment_id(cfg.uri, "gone")


def parent(cfg, sweep_dir):
    return tracking.sweep_parent(
        cfg, sweep_id=str(sweep_dir), lock_dir=sweep_dir, run_name="sweep",
        tags={"optimizer": "gao"}, params={"sweeper.n_trials": 3},
    )


def parent_in_fresh_process(cfg, sweep_dir, queue):
    """What a joblib/submitit worker does: no cached client, experiment or parent."""
    tracking._client.cache_clear()
    tracking._experiment_id.cache_clear()
    tracking._parent_runs.clear()
    queue.put(parent(cfg, sweep_dir))


def test_one_parent_per_sweep_across_processes(tmp_path):
    cfg = store(tmp_path)
    sweep_dir = tmp_path / "sweep"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [
        context.Process(target=parent_in_fresh_process, args=(cfg, sweep_dir, queue))
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    ids = {queue.get(timeout=5) for _ in workers}
    assert len(ids) == 1
    (run_id,) = ids
    assert parent(cfg, sweep_dir) == run_id  # and this process finds it too
    run = MlflowClient(cfg.uri).get_run(run_id)
    assert run.data.tags["stage"] == "sweep_parent"
    assert run.data.tags["sweep_id"] == str(sweep_dir)
    assert run.data.params == {"sweeper.n_trials": "3"}
    other = parent(cfg, tmp_path / "another-sweep")
    assert other != run_id


def test_sweep_id_with_a_quote_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="quote"):
        parent(store(tmp_path), tmp_path / "it's")
