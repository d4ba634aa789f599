"""gradalign.tracking: batching within MLflow's limits, the experiment-creation race, one sweep
parent per sweep even when trials run in separate processes, retries while SQLite is locked, the
probe of a tracking server, and ending the runs of an interrupted sweep."""

import contextlib
import http.server
import json
import math
import multiprocessing
import os
import signal
import socket
import sqlite3
import threading
import time

import pytest
from helpers import free_port
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from sqlalchemy.exc import OperationalError

from gradalign import databases, processes, tracking, ui
from gradalign.tracking import labels
from gradalign.tracking import store as tracking_store


class RecordingClient:
    def __init__(self):
        self.calls = []

    def log_batch(self, run_id, metrics, params, tags):
        self.calls.append((len(metrics), len(params), len(tags)))


def test_log_batch_respects_mlflows_per_call_limits():
    client = RecordingClient()
    metrics = [Metric(f"m{i}", 0.0, 0, 0) for i in range(1500)]
    params = {f"p{i}": i for i in range(250)}
    tracking_store.log_batch(client, "run", metrics=metrics, params=params, tags={"t": "1"})
    assert client.calls == [(899, 100, 1), (601, 100, 0), (0, 50, 0)]
    assert all(sum(call) <= 1000 for call in client.calls)


def test_log_batch_of_a_usual_run_is_one_call():
    client = RecordingClient()
    tracking_store.log_batch(client, "run", params={f"p{i}": i for i in range(30)})
    assert client.calls == [(0, 30, 0)]


def store(tmp_path, experiment="exp"):
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir(exist_ok=True)
    return OmegaConf.create(
        {
            "uri": f"sqlite:///{db}",
            "experiment": experiment,
            "flush_interval_s": 1.0,
            "root": "/",
            "store_wait_s": 60,
        }
    )


def test_sqlite_experiment_keeps_artifacts_beside_the_database(tmp_path):
    cfg = store(tmp_path)
    experiment_id = tracking_store.experiment_id(cfg.uri, 60, cfg.experiment)
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
    assert tracking_store.experiment_id(cfg.uri, 60, cfg.experiment) == other


def test_deleted_experiment_is_a_clear_error(tmp_path):
    cfg = store(tmp_path, experiment="gone")
    client = MlflowClient(cfg.uri)
    client.delete_experiment(client.create_experiment("gone"))
    with pytest.raises(ValueError, match="deleted"):
        tracking_store.experiment_id(cfg.uri, 60, "gone")


def test_the_experiment_opens_for_model_training_and_a_users_description_stays(tmp_path):
    cfg = store(tmp_path)
    created = tracking_store.experiment_id(cfg.uri, 60, cfg.experiment)
    tags = MlflowClient(cfg.uri).get_experiment(created).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.note.content"].startswith("Optimizer comparisons tracked by gradalign")
    views = {
        key.removeprefix("mlflow.sharedViewState."): json.loads(value)
        for key, value in tags.items()
        if key.startswith("mlflow.sharedViewState.")
    }
    assert {k: v["name"] for k, v in views.items()} == {
        "runs": "All runs: objective, best val loss, searched values",
        "sweeps": "Sweeps: best objective of each",
        "reports": "Reports: verdicts",
    }
    sweeps = json.loads(views["sweeps"]["state"])
    assert sweeps["searchFilter"] == "tags.stage = 'sweep_parent'"
    assert (sweeps["orderByKey"], sweeps["orderByAsc"]) == ("metrics.`best_objective`", True)
    assert "metrics.`trials_failed`" in sweeps["selectedColumns"]
    assert json.loads(views["reports"]["state"])["searchFilter"] == "tags.stage = 'report'"
    client = MlflowClient(cfg.uri)
    theirs = client.create_experiment("theirs", tags={"mlflow.note.content": "my notes"})
    tracking_store.experiment_id(cfg.uri, 60, "theirs")  # first used by the pipeline
    tags = client.get_experiment(theirs).tags
    assert tags["mlflow.note.content"] == "my notes"
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_schema_names_mlflows_own_tags_as_mlflow_does():
    from mlflow.utils import mlflow_tags

    from gradalign.schema import MlflowTag

    assert MlflowTag.NOTE == mlflow_tags.MLFLOW_RUN_NOTE
    assert MlflowTag.PARENT_RUN_ID == mlflow_tags.MLFLOW_PARENT_RUN_ID
    assert MlflowTag.SOURCE_TYPE == mlflow_tags.MLFLOW_SOURCE_TYPE
    assert MlflowTag.SOURCE_NAME == mlflow_tags.MLFLOW_SOURCE_NAME
    assert MlflowTag.GIT_COMMIT == mlflow_tags.MLFLOW_GIT_COMMIT
    assert MlflowTag.GIT_BRANCH == mlflow_tags.MLFLOW_GIT_BRANCH
    assert MlflowTag.GIT_REPO_URL == mlflow_tags.MLFLOW_GIT_REPO_URL
    assert MlflowTag.GIT_DIRTY == mlflow_tags.MLFLOW_GIT_DIRTY
    assert MlflowTag.USER == mlflow_tags.MLFLOW_USER


@pytest.mark.parametrize(
    "value,text",
    [
        (0.00206, "2.06e-3"),
        (0.945, "0.945"),
        (0.01, "0.01"),
        (1e-4, "1e-4"),
        (0.0, "0"),
        (12345.0, "1.23e4"),
        (math.inf, "inf"),
        (3, "3"),
        (True, "True"),
        ("Adam", "Adam"),
    ],
)
def test_values_in_run_names_are_short(value, text):
    assert labels.short_value(value) == text


def test_a_run_name_says_the_optimizer_its_searched_values_and_what_the_run_is():
    values = {"optimizer.lr": 0.00206, "optimizer.beta": 0.945, "model.hidden": [8]}
    assert (
        labels.run_name("gao", values, "trial 7")
        == "gao lr=2.06e-3 beta=0.945 model.hidden=[8] (trial 7)"
    )
    assert labels.run_name("adam", {}, "single") == "adam (single)"


def test_links_open_the_runs_table_even_for_a_first_time_visitor(tmp_path):
    cfg = OmegaConf.merge(store(tmp_path), {"ui_url": None, "default_ui_url": "http://h:5000/"})
    base = tracking.ui_url(cfg)
    assert base == "http://h:5000"
    assert tracking.runs_link(base, "3", view="sweep-ab") == (
        "http://h:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=sweep-ab"
    )
    assert tracking.run_link(base, "3", "r1") == (
        "http://h:5000/#/experiments/3/runs/r1?workflowType=machine_learning"
    )
    assert tracking.runs_link(base, "3", view="v", charts=True).endswith(
        "runs?workflowType=machine_learning&viewStateShareKey=v&compareRunsMode=CHART"
    )
    # in a description: relative to wherever the UI is served
    assert (
        tracking.run_link("", "3", "r1") == "#/experiments/3/runs/r1?workflowType=machine_learning"
    )
    # the store of tracking.uri (or $MLFLOW_TRACKING_URI, which gradalign.ui reads too)
    assert tracking.serve_command(cfg) == f"python -m gradalign.ui -- tracking.uri={cfg.uri}"
    default = OmegaConf.merge(cfg, {"uri": None, "default_uri": cfg.uri})
    assert tracking.serve_command(default) == "python -m gradalign.ui"
    server = OmegaConf.merge(cfg, {"uri": "http://tracking:5000"})
    assert (tracking.ui_url(server), tracking.serve_command(server)) == (
        "http://tracking:5000",
        None,
    )
    chosen = OmegaConf.merge(cfg, {"ui_url": "https://ui.example/mlflow"})
    assert tracking.ui_url(chosen) == "https://ui.example/mlflow"
    # a printed link or command never shows a password of the store
    secret = OmegaConf.merge(cfg, {"uri": "https://me:s3cret@tracking:5000/"})
    assert tracking.ui_url(secret) == "https://tracking:5000"
    database = OmegaConf.merge(cfg, {"uri": "postgresql+psycopg://me:s3cret@db/mlflow"})
    assert "s3cret" not in tracking.serve_command(database)


def test_a_view_s_chart_view_opens_on_its_sections_and_draws_every_run():
    chart = labels.parallel_chart(["optimizer.lr", "optimizer.beta"], ["objective"])
    _, value = labels.view_tag(
        "k",
        "Name",
        search_filter="",
        columns=["metrics.`gao/best_val_loss/mean_diff`", "tags.`verdict/gao`"],
        sections=[labels.ChartSection("first", (chart, labels.line_chart("loss/val")), 1, 480)],
        all_runs_in_charts=True,
    )
    state = json.loads(json.loads(value)["state"])
    assert state["runsHiddenMode"] == "SHOW_ALL"  # not MLflow's first 10
    [section] = state["compareRunSections"]
    assert (section["name"], section["columns"], section["cardHeight"]) == ("first", 1, 480)
    assert state["isAccordionReordered"] and section["isReordered"]  # kept first, in this order
    parallel, line = state["compareRunCharts"]
    assert parallel["type"] == "PARALLEL" and parallel["showAllRuns"]
    assert parallel["selectedParams"] == ["optimizer.lr", "optimizer.beta"]
    assert parallel["selectedMetrics"] == ["objective"]
    assert (line["type"], line["metricKey"]) == ("LINE", "loss/val")
    assert {c["metricSectionId"] for c in (parallel, line)} == {section["uuid"]}
    assert len({c["uuid"] for c in (parallel, line)}) == 2
    # the run names and the columns wide enough to read (MLflow sizes only ordered columns)
    assert state["columnOrder"] == [labels.NAME_COLUMN, *state["selectedColumns"]]
    assert state["columnWidths"][labels.NAME_COLUMN] == labels.NAME_WIDTH
    key = "gao/best_val_loss/mean_diff"  # MLflow's 100 px show "gao/best_val..."
    assert state["columnWidths"][f"metrics.`{key}`"] >= 8 * len(key)
    assert state["columnWidths"]["tags.`verdict/gao`"] == 720  # a sentence


def test_widening_a_view_appends_the_columns_it_lacks_and_keeps_a_person_s():
    _, value = labels.view_tag("k", "Name", search_filter="", columns=["metrics.`a`"])
    envelope = json.loads(value)
    state = json.loads(envelope["state"])
    state["selectedColumns"].append("params.`mine`")  # "Override saved view" in the UI
    state["columnOrder"].append("params.`mine`")
    envelope["state"] = json.dumps(state)
    value = json.dumps(envelope)
    wider = labels.widened(value, ["params.`optimizer.lr`", "metrics.`a`"])
    wider_state = json.loads(json.loads(wider)["state"])
    assert wider_state["selectedColumns"] == [
        "metrics.`a`",
        "params.`mine`",
        "params.`optimizer.lr`",
    ]
    assert wider_state["columnOrder"][-1] == "params.`optimizer.lr`"
    assert json.loads(wider)["name"] == "Name"
    assert labels.widened(wider, ["metrics.`a`"]) is None  # nothing to write


def test_an_experiment_lists_all_its_runs_with_objective_val_loss_and_searched_values(tmp_path):
    cfg = store(tmp_path)
    connected = tracking.connect(cfg)
    client, experiment = connected.client, connected.experiment_id
    tags = client.get_experiment(experiment).tags
    runs = json.loads(json.loads(tags["mlflow.sharedViewState.runs"])["state"])
    assert runs["searchFilter"] == ""  # every run, a sweep's trials under its parent
    assert runs["selectedColumns"] == [
        "tags.`optimizer`",
        "metrics.`objective`",
        "metrics.`best_objective`",
        "metrics.`best_val_loss`",
        "params.`optimizer.lr`",
    ]
    labels.widen_view(client, experiment, labels.RUNS_VIEW, ["params.`optimizer.beta`"])
    labels.widen_view(client, experiment, labels.RUNS_VIEW, ["params.`optimizer.beta`"])
    tags = client.get_experiment(experiment).tags
    runs = json.loads(json.loads(tags["mlflow.sharedViewState.runs"])["state"])
    assert runs["selectedColumns"][-2:] == ["params.`optimizer.lr`", "params.`optimizer.beta`"]
    for view in ("reports", "sweeps"):  # markdown, cut short: what it says is in columns
        state = json.loads(json.loads(tags[f"mlflow.sharedViewState.{view}"])["state"])
        assert "attributes.`Description`" not in state["selectedColumns"]


def test_gradalign_ui_links_each_experiment_of_the_pipeline_to_its_runs(tmp_path):
    cfg = store(tmp_path)
    client = tracking.client(cfg.uri, 60)
    assert ui.landing_lines(client, "http://h:5000") == [
        "  no gradalign runs yet (python train.py makes some); experiments: "
        "http://h:5000/#/experiments?workflowType=machine_learning"
    ]
    first = tracking.connect(cfg).experiment_id
    second = tracking.connect(OmegaConf.merge(cfg, {"experiment": "exp-quick"})).experiment_id
    client.create_experiment("someone else's")  # no view of ours: not listed, as Default
    assert ui.landing_lines(client, "http://h:5000") == [
        f"  {name}: http://h:5000/#/experiments/{eid}/runs?workflowType=machine_learning"
        "&viewStateShareKey=runs"
        for name, eid in (("exp", first), ("exp-quick", second))
    ]
    argv = ui.serve_argv(cfg.uri, "127.0.0.1", 5001)
    assert argv[1:] == [
        *("-m", "mlflow", "ui", "--backend-store-uri", cfg.uri, "--host", "127.0.0.1"),
        *("--port", "5001", "--workers", "1", "--uvicorn-opts", "--no-access-log"),
    ]
    assert ui.SERVE_ENV == {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def test_a_saved_view_is_the_ui_s_own_envelope():
    key, value = labels.view_tag(
        "k1",
        "Name",
        search_filter="tags.stage = 'final'",
        columns=["metrics.`objective`"],
        order_by="metrics.`objective`",
        group_by_tag="optimizer",
    )
    envelope = json.loads(value)
    state = json.loads(envelope["state"])
    assert key == "mlflow.sharedViewState.k1" and envelope["name"] == "Name"
    assert state["searchFilter"] == "tags.stage = 'final'"
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`objective`", True)
    assert state["selectedColumns"] == ["metrics.`objective`"]
    assert state["groupBy"] == {
        "aggregateFunction": "average",
        "groupByKeys": [{"mode": "tag", "groupByData": "optimizer"}],
    }


def parent(cfg, sweep_id):
    return tracking.open_sweep_parent(
        tracking.connect(cfg),
        sweep_id=sweep_id,
        run_name="sweep",
        tags={"optimizer": "gao"},
        params={"sweeper.n_trials": 3},
    )


def parent_in_fresh_process(cfg, sweep_id, queue):
    """What another sweep process sharing the study does: no cached client or experiment."""
    tracking.client.cache_clear()
    tracking_store.experiment_id.cache_clear()
    queue.put((parent(cfg, sweep_id), processes.owner_token()))


def test_one_parent_per_sweep_across_processes(tmp_path):
    cfg = store(tmp_path)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [
        context.Process(target=parent_in_fresh_process, args=(cfg, "s", queue)) for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    found = [queue.get(timeout=5) for _ in workers]
    ids = {run_id for run_id, _ in found}
    assert len(ids) == 1
    (run_id,) = ids
    assert parent(cfg, "s") == run_id  # and this process finds it too
    run = MlflowClient(cfg.uri).get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.tags["stage"] == "sweep_parent" and run.data.tags["sweep_id"] == "s"
    assert run.data.params == {"sweeper.n_trials": "3"}
    owners = {v for k, v in run.data.tags.items() if k.startswith("owner.")}
    assert owners == {token for _, token in found} | {processes.owner_token()}
    assert parent(cfg, "another-sweep") != run_id


def test_a_sweep_parent_ends_when_its_last_live_owner_leaves(tmp_path):
    cfg = store(tmp_path)
    run_id = parent(cfg, "s")
    client = MlflowClient(cfg.uri)
    alive, gone = processes.owner_token(1), f"{socket.gethostname()}:1:0"  # pid 1 outlives us
    client.set_tag(run_id, "owner.other.1", alive)
    client.set_tag(run_id, "owner.gone.1", gone)
    assert not tracking.close_sweep_parent(tracking.connect(cfg), run_id, RunStatus.FINISHED)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # another sweep process still works in it
    assert f"owner.{socket.gethostname()}.{os.getpid()}" not in run.data.tags
    client.set_tag(run_id, "owner.remote.7", "elsewhere:7:1")  # another host: cannot be seen
    assert not tracking.close_sweep_parent(tracking.connect(cfg), run_id, RunStatus.FINISHED)
    client.delete_tag(run_id, "owner.remote.7")
    client.set_tag(run_id, "owner.other.1", f"{socket.gethostname()}:1:0")  # now gone too
    assert tracking.close_sweep_parent(
        tracking.connect(cfg), run_id, RunStatus.KILLED, "interrupted"
    )
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == "interrupted"
    assert parent(cfg, "s") == run_id  # a resumed sweep reopens it
    assert client.get_run(run_id).info.status == "RUNNING"


def test_of_two_parents_made_at_once_every_process_keeps_the_oldest(tmp_path):
    cfg = store(tmp_path)
    client = MlflowClient(cfg.uri)
    experiment = tracking_store.experiment_id(cfg.uri, 60, cfg.experiment)
    tags = {"stage": "sweep_parent", "sweep_id": "s"}
    older = client.create_run(experiment, tags=tags, start_time=1000).info.run_id
    client.create_run(experiment, tags=tags, start_time=2000)
    assert parent(cfg, "s") == older


def test_a_sweep_id_with_a_quote_finds_its_own_parent(tmp_path):
    cfg = store(tmp_path)
    first = parent(cfg, "optuna:it's")
    assert parent(cfg, "optuna:it's") == first != parent(cfg, "optuna:its")
    with pytest.raises(ValueError, match="both quote characters"):
        parent(cfg, "it" + "'" + 's "quoted"')


def mlflow_error(message, sqlite_error=None):
    """An MlflowException as MLflow's SQL store raises it: from SQLAlchemy's error, when given."""
    try:
        if sqlite_error is None:
            raise MlflowException(message, RESOURCE_DOES_NOT_EXIST)
        try:
            raise OperationalError("INSERT ...", {}, sqlite3.OperationalError(sqlite_error))
        except OperationalError as cause:
            raise MlflowException(str(cause), TEMPORARILY_UNAVAILABLE) from cause
    except MlflowException as error:
        return error


LOCKED = mlflow_error("", "database is locked")


def test_a_locked_store_is_retried_with_backoff_until_it_answers(monkeypatch):
    sleeps, calls = [], []
    monkeypatch.setattr(databases.time, "sleep", sleeps.append)

    def flaky(value):
        calls.append(value)
        if len(calls) < 3:
            raise LOCKED
        return value

    assert tracking_store._retrying("sqlite:///s.db", 60, flaky, 7) == 7
    assert calls == [7, 7, 7]
    assert len(sleeps) == 2 and sleeps[0] < sleeps[1]  # growing waits (jittered)


def test_other_errors_are_not_retried_and_a_full_disk_is_one_line(monkeypatch):
    monkeypatch.setattr(databases.time, "sleep", lambda s: pytest.fail("retried"))

    def broken():
        raise mlflow_error("no such run")

    def full():
        raise mlflow_error("", "database or disk is full")

    with pytest.raises(MlflowException, match="no such run"):
        tracking_store._retrying("sqlite:///s.db", 60, broken)
    with pytest.raises(tracking.TrackingUnavailable, match=r"s.db could not be written \("):
        tracking_store._retrying("sqlite:///s.db", 60, full)


@pytest.mark.parametrize(
    "fault,advice",
    [
        ("database is locked", "another process holds its write lock"),
        ("connection to server at 127.0.0.1 failed: Connection refused", "start it again"),
    ],
)
def test_a_store_that_does_not_answer_is_waited_for_at_most_store_wait_s(
    monkeypatch, fault, advice
):
    clock = [0.0]
    monkeypatch.setattr(databases.time, "monotonic", lambda: clock[0])

    def down():
        clock[0] += 20.0  # each attempt waits out SQLite's busy timeout, or a connect timeout
        raise mlflow_error("", fault)

    monkeypatch.setattr(databases.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    with pytest.raises(tracking.TrackingUnavailable) as info:
        tracking_store._retrying("postgresql://u:secret@h/m", 60, down)
    assert clock[0] <= 60 + 20.0  # bounded: at most one attempt past it
    message = str(info.value)
    assert message.startswith("MLflow store postgresql://u:***@h/m did not answer for 60 s (")
    assert fault in message and advice in message and "secret" not in message


def test_the_client_retries_every_call(tmp_path, monkeypatch):
    cfg = store(tmp_path)
    client = tracking.client(cfg.uri, 60)
    real = MlflowClient.search_experiments
    attempts = []

    def locked_once(self, *args, **kwargs):
        attempts.append(1)
        if len(attempts) == 1:
            raise LOCKED
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "search_experiments", locked_once)
    monkeypatch.setattr(databases.time, "sleep", lambda s: None)
    assert client.search_experiments() is not None and len(attempts) == 2


@contextlib.contextmanager
def http_server(status):
    """A server on 127.0.0.1 (free port) answering every GET with ``status``; its URI."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_tracking_server_is_probed_before_use():
    with http_server(200) as uri:
        tracking_store.check_reachable(uri)
    with http_server(401) as uri:
        tracking_store.check_reachable(uri)  # answered; credentials are MLflow's business
    with http_server(404) as uri, pytest.raises(tracking.TrackingUnavailable, match="HTTP 404"):
        tracking_store.check_reachable(uri)
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable, match=f"{uri} .*unreachable.*Nothing was"):
        tracking.client(uri, 60)
    assert time.monotonic() - start < 5
    tracking_store.check_reachable("sqlite:///nowhere/mlflow.db")  # not a server: nothing to probe


def test_a_signal_during_a_store_call_is_delivered_after_it():
    """Ctrl-C must not stop SQLite mid-transaction (the process would then wait on its own
    lock): the call completes, then the signal reaches the handler that was in place."""
    done, terminated = [], []

    def call():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the signals arrive here, inside the call
        done.append(True)
        return "logged"

    # Python's own Ctrl-C handler, whatever this process inherited (a shell's background job
    # starts with SIGINT ignored, and Python then installs none)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
    try:
        with pytest.raises(KeyboardInterrupt):
            assert tracking_store._retrying("sqlite:///s.db", 60, call) == "logged"
        assert done == [True] and terminated == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def dataset_record(name="mnist1d"):
    return tracking.DatasetRecord(
        name=name, digest="0123456789ab", source="/data", profile={"train": 4}, schema={}
    )


def test_a_run_that_loses_the_race_to_insert_its_dataset_logs_it_again(tmp_path, monkeypatch):
    """Two runs starting at once on a store new to their data set both insert it, and the later
    one's insert fails on the datasets table's key (seen on PostgreSQL under SLURM): that run
    logs its input again, finds the winner's row, and trains."""
    cfg = store(tmp_path)
    client = MlflowClient(cfg.uri)
    experiment = tracking_store.experiment_id(cfg.uri, 60, cfg.experiment)
    winner = client.create_run(experiment).info.run_id
    attempts = []
    log_inputs = MlflowClient.log_inputs

    def racing(self, run_id, datasets=None, models=None):
        attempts.append(run_id)
        if len(attempts) == 1:  # the other run's insert lands between this one's look-up and insert
            log_inputs(self, winner, datasets=datasets)
            raise MlflowException('duplicate key value violates unique constraint "dataset_pk"')
        return log_inputs(self, run_id, datasets=datasets)

    monkeypatch.setattr(MlflowClient, "log_inputs", racing)
    with tracking.start_run(cfg, run_name="r", tags={}, params={}, dataset=dataset_record()) as run:
        pass
    assert attempts == [run.run_id, run.run_id]
    assert client.get_run(run.run_id).info.status == "FINISHED"
    inputs = [client.get_run(r).inputs.dataset_inputs for r in (winner, run.run_id)]
    assert [[i.dataset.name for i in found] for found in inputs] == [["mnist1d"], ["mnist1d"]]
    with contextlib.closing(sqlite3.connect(cfg.uri.removeprefix("sqlite:///"))) as db:
        assert db.execute("SELECT count(*) FROM datasets").fetchone() == (1,)


def test_a_store_that_keeps_refusing_a_dataset_fails_the_run_with_its_error(tmp_path, monkeypatch):
    cfg = store(tmp_path)

    def refusing(self, run_id, datasets=None, models=None):
        raise MlflowException("disk I/O error")

    monkeypatch.setattr(MlflowClient, "log_inputs", refusing)
    unwritable = pytest.raises(
        tracking.TrackingUnavailable, match=r"could not be read or written \(disk I/O"
    )
    with (
        unwritable,
        tracking.start_run(cfg, run_name="r", tags={}, params={}, dataset=dataset_record()),
    ):
        raise AssertionError("the run must not start without its input")
    (run,) = MlflowClient(cfg.uri).search_runs([tracking_store.experiment_id(cfg.uri, 60, "exp")])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith("TrackingUnavailable: MLflow store sqlite")
