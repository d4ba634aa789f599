"""How fast ``mlflow ui`` answers, and how many processes it starts, in the ways it can be run.

Each variant serves an empty SQLite store in a temporary folder; the rounds alternate the
variants, so that the machine's load falls on each alike. Per start: the seconds until
``/health`` answers and until the UI's page (``/``) is served, and the processes in the
server's tree once it has settled (counted 5 s after ``/health``). The minimum and the median
over the rounds are printed, with the load average for context.

    python benchmarks/bench_ui.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

MLFLOW = [sys.executable, "-m", "mlflow", "ui"]
NO_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
VARIANTS = {
    "mlflow ui": ([], {}),
    "--workers 1": (["--workers", "1"], {}),
    "no job execution": ([], NO_JOBS),
    "--workers 1, no job execution": (["--workers", "1"], NO_JOBS),
}
SETTLE_S = 5.0
LIMIT_S = 300.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answered(url: str, process: subprocess.Popen, started: float) -> float:
    """Seconds from ``started`` until ``url`` answers."""
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with {process.returncode}")
        if time.perf_counter() - started > LIMIT_S:
            raise RuntimeError(f"{url} did not answer in {LIMIT_S:.0f} s")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return time.perf_counter() - started
        except OSError:
            time.sleep(0.2)


def start_once(folder: Path, args: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(seconds to /health, seconds to the page, processes) of one start of the server."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [*MLFLOW, "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    command += ["--host", "127.0.0.1", "--port", str(port), *args]
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=folder,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        health = answered(f"{base}/health", process, started)
        page = answered(f"{base}/", process, started)
        time.sleep(SETTLE_S)
        tree = psutil.Process(process.pid)
        processes = 1 + len(tree.children(recursive=True))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return health, page, processes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    print(f"load average at start: {os.getloadavg()}")
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start_once(folder, ["--workers", "1"], NO_JOBS)  # creates the store's schema
        for round_ in range(rounds):
            for name, (args, env) in VARIANTS.items():
                results[name].append(start_once(folder, args, env))
                health, page, processes = results[name][-1]
                print(
                    f"round {round_ + 1} {name}: /health {health:.1f} s, page {page:.1f} s, "
                    f"{processes} processes"
                )
    print(f"load average at end: {os.getloadavg()}")
    print("| command | processes | /health, min (median) | page, min (median) |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        health = [r[0] for r in runs]
        page = [r[1] for r in runs]
        counts = sorted({r[2] for r in runs})
        print(
            f"| {name} | {'/'.join(map(str, counts))} | {min(health):.1f} s "
            f"({statistics.median(health):.1f} s) | {min(page):.1f} s "
            f"({statistics.median(page):.1f} s) |"
        )


if __name__ == "__main__":
    main()
