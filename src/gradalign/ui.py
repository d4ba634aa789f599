"""MLflow's UI of the configured store, started fast, with the links that open each
experiment's runs: ``python -m gradalign.ui`` (``make ui``).

MLflow 3.17 opens its GenAI welcome page at ``/`` and an experiment clicked in its list on the
GenAI overview; only a link that asks for the runs (``workflowType=machine_learning``) opens the
runs table, and only the experiment's id makes that link. Once ``/health`` answers, this prints
that link for every experiment the pipeline wrote to, opening its view of all runs
(labels.RUNS_VIEW).

It serves ``mlflow ui`` as it starts fastest (docs/benchmarks.md#mlflows-ui): one worker
process, which one person browsing needs, and no job runner (MLflow's GenAI jobs: LLM judges,
trace rollups), whose processes would start before the UI answers; no access log, so that
the links stay readable. The same by hand, from the repository root:

    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri \\
        sqlite:///mlruns/mlflow.db --workers 1

    python -m gradalign.ui                      # http://127.0.0.1:5000, Ctrl-C stops it
    python -m gradalign.ui --port 5001
    python -m gradalign.ui -- tracking.uri=sqlite:///outputs/other.db

A store that is a tracking server (``http(s)://``) has its UI there: the links are printed and
nothing is started.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable

from gradalign import tracking
from gradalign.config import checkout_config
from gradalign.credentials import mask
from gradalign.schema import MlflowTag
from gradalign.tracking import labels

START_S = 300.0  # how long mlflow ui may take to answer (it needs seconds; more when loaded)
SERVE_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def serve_argv(uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow ui`` command this module runs for the store ``uri`` (see SERVE_ENV)."""
    return [
        *(sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri),
        *("--host", host, "--port", str(port), "--workers", "1"),
        *("--uvicorn-opts", "--no-access-log"),
    ]


def landing_lines(client, base: str) -> list[str]:
    """A line per experiment the pipeline wrote to (it holds the view of all runs): its name
    and the link to its runs in the UI at ``base``; or how to get one."""
    lines = []
    for experiment in sorted(client.search_experiments(), key=lambda e: e.name):
        if f"{MlflowTag.SHARED_VIEW_PREFIX}{labels.RUNS_VIEW}" in experiment.tags:
            link = labels.runs_link(base, experiment.experiment_id, labels.RUNS_VIEW)
            lines.append(f"  {experiment.name}: {link}")
    if not lines:
        listing = f"{base}/#/experiments?{urllib.parse.urlencode(labels.WORKFLOW)}"
        lines.append(
            f"  no gradalign runs yet (python train.py makes some); experiments: {listing}"
        )
    return lines


def answered(url: str, process: subprocess.Popen, timeout_s: float) -> bool:
    """Whether ``url`` answers before ``process`` ends or ``timeout_s`` pass."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return True
        except OSError:
            time.sleep(0.3)
    return False


def serve(uri: str, host: str, port: int, wait_s: float) -> int:
    """Run ``mlflow ui`` on the store ``uri`` until it ends or this process is stopped; print
    the runs' links once it answers. The exit status: 0 when stopped, else mlflow's."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}"
    with socket.socket() as probe:  # else another server's /health would answer for it
        if probe.connect_ex((shown, port)) == 0:
            print(f"error: {base} is taken by another server: --port picks another", flush=True)
            return 1
    started = time.monotonic()
    process = subprocess.Popen(serve_argv(uri, host, port), env={**os.environ, **SERVE_ENV})
    try:
        if not answered(f"{base}/health", process, START_S):
            if process.poll() is None:
                print(f"error: mlflow ui did not answer at {base} in {START_S:.0f} s", flush=True)
                return 1
            print(
                f"error: mlflow ui exited with status {process.returncode} before it answered "
                "(its output is above; another server on the port? --port picks another)",
                flush=True,
            )
            return process.returncode or 1
        lines = landing_lines(tracking.client(uri, wait_s), base)
        print(
            f"MLflow UI of {mask(uri)} at {base} (answered after "
            f"{time.monotonic() - started:.0f} s; Ctrl-C stops it). The runs of:",
            *lines,
            sep="\n",
            flush=True,
        )
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv: Iterable[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--host", help="the interface to serve on (default: tracking.default_ui_url's)"
    )
    parser.add_argument("--port", type=int, help="default: tracking.default_ui_url's (5000)")
    parser.add_argument("overrides", nargs="*", help="after --: config overrides (tracking.*)")
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # a SIGTERM ends the server too, as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        cfg = checkout_config(args.overrides)
        uri = tracking.tracking_uri(cfg.tracking)
        if uri.startswith(("http://", "https://")):
            base = tracking.ui_url(cfg.tracking)
            lines = landing_lines(tracking.client(uri, cfg.tracking.store_wait_s), base)
            print(
                f"MLflow store {mask(uri)} is a tracking server; its UI, the runs of:",
                *lines,
                sep="\n",
            )
            return 0
        default = urllib.parse.urlsplit(str(cfg.tracking.default_ui_url))
        host = args.host or default.hostname or "127.0.0.1"
        port = args.port or default.port or 5000
        return serve(uri, host, port, cfg.tracking.store_wait_s)
    except (ValueError, tracking.TrackingUnavailable) as error:
        print(f"error: {mask(str(error))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
