"""optuna-dashboard, the live view of a stored study (slow: starts a server process): the
README's command serves a study a sweep stored, and its HTTP API lists the study's trials."""

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from helpers import free_port

pytestmark = pytest.mark.slow


def get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def test_the_dashboard_serves_a_stored_study_over_http(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="gao-mlp", storage=storage)
    study.optimize(lambda trial: trial.suggest_float("x", -1.0, 1.0) ** 2, n_trials=3)
    command = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    assert command, "optuna-dashboard is not installed beside this Python"
    port = free_port()
    # --server wsgiref: one process (gunicorn, the default when MLflow brings it, forks)
    server = subprocess.Popen(
        [command, storage, "--host", "127.0.0.1", "--port", str(port), "--server", "wsgiref"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                studies = get(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
                break
            except OSError:
                assert server.poll() is None, server.communicate()[0]
                assert time.monotonic() < deadline, "optuna-dashboard did not answer in 120 s"
                time.sleep(0.3)
        (found,) = [s for s in studies if s["study_name"] == "gao-mlp"]
        detail = get(f"http://127.0.0.1:{port}/api/studies/{found['study_id']}")
        assert len(detail["trials"]) == 3
        assert detail["best_trials"][0]["values"] == [study.best_value]
    finally:
        server.terminate()
        server.communicate(timeout=30)
