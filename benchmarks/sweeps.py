"""Running real ``train.py -m`` sweeps for the benchmarks, against a throw-away MLflow store."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient


def run_sweeps(
    commands: list[list[str]], tmp: Path
) -> tuple[float, float, MlflowClient, list[Run]]:
    """Run the train.py ``commands`` at once, tracking to a SQLite store in ``tmp``.

    Returns the start (epoch seconds, comparable to MLflow's run times), the wall time, a client
    of the store and its sweep runs. Raises RuntimeError with the stderr tail if one fails.
    """
    uri = f"sqlite:///{tmp}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    start = time.time()
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for command in commands
    ]
    for process in processes:
        _, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"{process.args} failed:\n{stderr.decode()[-3000:]}")
    wall = time.time() - start
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("gradient-alignment").experiment_id
    runs = client.search_runs([experiment], "tags.stage = 'sweep'", max_results=10_000)
    return start, wall, client, runs
