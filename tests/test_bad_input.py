"""Issue 26's battery (tests/bad_inputs.py) as a test: every bad command line ends with its
exit status and one line that names the key, the value and what is allowed, with no traceback,
no MLflow run and no output folder left behind. Each runs train.py in this process: a refusal
needs no process of its own."""

from __future__ import annotations

import importlib.util
import sqlite3
import sys

import pytest
import torch
from bad_inputs import CASES, Case
from helpers import train_in_process

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
