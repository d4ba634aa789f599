"""Issue 26's battery (tests/bad_inputs.py) as a test: every bad command line ends with its
exit status and one line that names the key, the value and what is allowed, with no traceback,
no MLflow run and no output folder left behind. Each runs train.py in this process: a refusal
needs no process of its own."""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import sqlite3
import sys

import filelock
import optuna
import pytest
import torch
from bad_inputs import CASES, SWEEP, Case
from helpers import REPO_ROOT, train_in_process
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import OperationalError

from gradalign import databases

sys.path.insert(0, str(__import__("helpers").REPO_ROOT / "benchmarks"))
from battery import closed_port, fill  # noqa: E402


def skip_reason(case: Case) -> str | None:
    """Why ``case`` cannot be refused on this machine (what it refuses is present here)."""
    if case.id == "device-cuda" and torch.cuda.is_available():
        return "CUDA is available here"
    if "mysql://" in " ".join(case.argv) and importlib.util.find_spec("MySQLdb") is not None:
        return "mysqlclient is installed here"
    return None


def runs_in(db) -> int:
    if not db.is_file() or not db.stat().st_size:
        return 0
    with sqlite3.connect(db) as con:
        return con.execute("SELECT count(*) FROM runs").fetchone()[0]


@pytest.mark.parametrize(
    "case", CASES, ids=[("sweep-" if c.sweep else "run-") + c.id for c in CASES]
)
def test_a_bad_command_line_ends_in_one_true_line_and_leaves_nothing(
    monkeypatch, capsys, tmp_path, tiny, case
):
    reason = skip_reason(case)
    if reason is not None:
        pytest.skip(reason)
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    port = closed_port()
    argv = [fill(arg, tmp_path, port) for arg in case.command()]
    outputs = tmp_path / "outputs"
    code = train_in_process(monkeypatch, *argv, f"paths.outputs={outputs}", tiny[-1])

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    for needle in case.needles:
        assert fill(needle, tmp_path, port) in err, err
    if case.hydra:  # Hydra's own message: its exit status, its hint
        assert code == 1, err
    else:
        assert code == 2, err
        assert len(lines) == 1 and "HYDRA_FULL_ERROR" not in err, err
        prefix = "sweep not started, no trial run: " if case.sweep else "error: "
        assert lines[0].startswith(prefix), err
    assert runs_in(db) == 0  # no run, no FAILED parent
    assert not [p for p in outputs.glob("*/*") if p.is_dir()]  # no runs/<time>/, multirun/<time>/


def damaged_store(db):
    """An MLflow store at ``db`` whose runs table has a damaged page: it opens, and reading or
    writing a run finds SQLite's "database disk image is malformed"."""
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.create_experiment("gradient-alignment", artifact_location=str(db.parent))
    for _ in range(30):  # the runs table over several pages
        client.log_param(client.create_run(experiment).info.run_id, "x", "y" * 100)
    with sqlite3.connect(db) as con:
        size = con.execute("PRAGMA page_size").fetchone()[0]
        root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'runs'").fetchone()[0]
    with open(db, "r+b") as file:
        file.seek((root - 1) * size)
        file.write(b"\x0d" + b"\xff" * 64)  # a leaf page header pointing nowhere


def test_a_damaged_store_is_named_damaged_with_what_to_do(monkeypatch, capsys, tmp_path, tiny):
    db = tmp_path / "mlflow.db"
    damaged_store(db)
    capsys.readouterr()  # what making it printed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    code = train_in_process(monkeypatch, *tiny, f"paths.outputs={tmp_path / 'out'}")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    (line,) = lines
    assert line.startswith(f"error: MLflow store sqlite:///{db} is damaged (database disk image")
    assert "Move it aside" in line and "doctor" not in line  # the doctor cannot open it either
    assert not list((tmp_path / "out").glob("runs/*"))


def test_a_store_folder_that_is_read_only_is_one_line_naming_it(
    monkeypatch, capsys, tmp_path, tiny
):
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()

    def read_only(self, *args, **kwargs):  # as the lock file's open fails on a read-only mount
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self.lock_file))

    monkeypatch.setattr(filelock.FileLock, "acquire", read_only)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    code = train_in_process(monkeypatch, *tiny, f"paths.outputs={tmp_path / 'out'}")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.strip() == (
        f"error: store folder {db.parent} is not writable: cannot create the lock file "
        "mlflow.db.lock (Read-only file system); make the folder writable, or use a store "
        "elsewhere"
    )
    assert not db.exists()


def test_a_stored_study_another_process_keeps_locked_says_so_and_never_to_move_away(
    monkeypatch, capsys, tmp_path, tiny
):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="k", storage=storage)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    holder = sqlite3.connect(tmp_path / "optuna.db", timeout=0)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing to it
    try:
        code = train_in_process(
            monkeypatch,
            *SWEEP,
            *tiny,
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=k",
            "tracking.store_wait_s=1",
            f"paths.outputs={tmp_path / 'out'}",
        )
    finally:
        holder.rollback()
        holder.close()
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"sweep not started, no trial run: Optuna storage {storage} is locked by another process "
        "(database is locked; waited 1 s): the study in it is kept; let that process finish (or "
        "stop it), then rerun the same command"
    )
    assert "another file" not in err
    assert len(optuna.load_study(study_name="k", storage=storage).trials) == 0
    assert not list((tmp_path / "out").glob("multirun/*"))


def test_a_permanent_store_fault_names_sqlites_reason_not_sqlalchemys_note():
    def full():  # as SQLAlchemy raises it from a query's autoflush
        raise OperationalError(
            "INSERT ...", {}, sqlite3.OperationalError("database or disk is full")
        ) from None

    with pytest.raises(databases.StoreUnavailable) as raised:
        databases.retrying("Optuna storage sqlite:///x.db", 5.0, full)
    assert str(raised.value).startswith(
        "Optuna storage sqlite:///x.db could not be written (database or disk is full): free "
        "space on its disk, then python -m gradalign.doctor"
    )


def test_a_disk_that_fills_mid_sweep_stops_it_with_the_true_count_in_one_line(
    monkeypatch, capsys, tmp_path, tiny
):
    """The Optuna storage's disk fills as the third trial is recorded: the sweep's one line
    names SQLite's reason and counts what the study holds (2 complete, 1 running), never that
    its trials could not be counted or that none ran."""
    from gradalign.sweep import sweeper

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    recorded = []

    def record_until_full(study, trial, outcome):
        if len(recorded) == 2:
            raise OperationalError(
                "UPDATE trials ...", {}, sqlite3.OperationalError("database or disk is full")
            )
        recorded.append(trial.number)
        return real_record(study, trial, outcome)

    real_record = sweeper.record
    monkeypatch.setattr(sweeper, "record", record_until_full)
    code = train_in_process(
        monkeypatch,
        "-m",
        "hydra.sweeper.n_trials=3",
        *tiny,
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=full",
        f"paths.outputs={tmp_path / 'out'}",
    )
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err, captured.err
    (line,) = [line for line in captured.err.splitlines() if line.startswith("sweep ")]
    assert line.startswith(
        f"sweep stopped: Optuna storage {storage} could not be written (database or disk is "
        "full): free space on its disk"
    ), line
    assert (
        "Its study holds 3 trials: 2 complete, 0 diverged, 0 failed, 0 pruned, 1 running." in line
    )
    assert "could not be counted" not in captured.out + captured.err
    assert line.endswith("hydra.sweeper.study_name=full " + f"paths.outputs={tmp_path / 'out'}")


def test_a_tracking_server_that_went_away_is_not_preceded_by_urllib3_retry_warnings(caplog):
    """MLflow retries a call to a server that was killed (MLFLOW_HTTP_REQUEST_MAX_RETRIES):
    urllib3 would warn of each retry, lines before the one that says what happened."""
    from mlflow.exceptions import MlflowException

    from gradalign import tracking  # noqa: F401 (what quiets urllib3)

    caplog.set_level(logging.WARNING)
    client = MlflowClient(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(MlflowException, match="Max retries exceeded"):
        client.search_experiments()
    assert not [r for r in caplog.records if r.name.startswith("urllib3")], caplog.text


@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
def test_a_deleted_experiment_is_one_line_that_says_how_to_restore_it(
    monkeypatch, capsys, tmp_path, tiny, sweep
):
    """Its name exists in the store, deleted: MLflow would refuse each run of it; one line
    instead, before any run or output folder."""
    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    client.delete_experiment(client.create_experiment("gone"))
    capsys.readouterr()  # what making the store printed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    outputs = tmp_path / "out"
    argv = [*(SWEEP if sweep else ()), *tiny, "tracking.experiment=gone"]
    code = train_in_process(monkeypatch, *argv, f"paths.outputs={outputs}")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].endswith(
        f"invalid config value tracking.experiment='gone': the MLflow experiment is deleted in "
        f"sqlite:///{db}: restore it (mlflow experiments restore) or set tracking.experiment "
        "to another name"
    ), err
    assert runs_in(db) == 0
    assert not [p for p in outputs.glob("*/*") if p.is_dir()]


def test_a_storage_in_a_missing_directory_is_refused_with_the_settings(compose_cfg, tmp_path):
    """Before the sweep's imports (the plugin shim's check_sweep), not 15-20 s later; a relative
    path is named as it is anchored, at the repository root."""
    from gradalign.config import ConfigError
    from gradalign.sweep.settings import check_sweep

    cfg = compose_cfg()
    settings = {
        "direction": "minimize",
        "n_trials": 2,
        "n_jobs": 1,
        "max_failure_rate": 0.2,
        "storage": "sqlite:///no-such-dir/optuna.db",
        "study_name": "s",
    }
    where = REPO_ROOT / "no-such-dir"
    with pytest.raises(ConfigError) as refused:
        check_sweep(settings, cfg, [])
    assert str(refused.value) == (
        f"hydra.sweeper.storage=sqlite:///{where}/optuna.db: directory {where} does not exist "
        "(a relative path is taken from the repository root); create it or fix the path"
    )
    check_sweep({**settings, "storage": f"sqlite:///{tmp_path}/optuna.db"}, cfg, [])  # it exists
