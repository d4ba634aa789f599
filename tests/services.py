"""The servers the slow tests run against: an ``mlflow server`` started for a test, and the
PostgreSQL server and SLURM cluster that ``.ci/run`` starts (scripts/ci/postgres.sh, slurm.sh)
and names in the environment.

Tests that need PostgreSQL or SLURM are marked ``services``: without them they fail, saying how
to start them; ``pytest -m "slow and not services"`` leaves them out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port
from sqlalchemy.engine import make_url

POSTGRES_ENV = "GRADALIGN_TEST_POSTGRES"  # URL of a role with CREATEDB (.ci/run sets it)
API_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"
SERVER_START_S = 240  # an mlflow server takes 20-30 s to answer on a loaded 2-core machine


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, log: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 (a free port, one worker) on ``backend_uri``, its output in
    ``log``, stopped afterwards; its URI once it answers /health and its API (the first API call
    opens the store, which can take longer than a sweep's probe waits)."""
    port = free_port()
    with open(log, "w") as output:
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"),
                *("--port", str(port), "--workers", "1"),
                *("--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts)),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                urllib.request.urlopen(f"{uri}{API_PROBE}", timeout=60).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    output = log.read_text()[-3000:]
                    raise AssertionError(f"mlflow server did not start:\n{output}") from None
                time.sleep(0.5)
        yield uri
    finally:
        server.terminate()  # the server stops its own workers
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # the session it was started in
            server.wait()


def postgres_server() -> str:
    """The URL of the test PostgreSQL server's role (``$GRADALIGN_TEST_POSTGRES``)."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.fail(
            f"no PostgreSQL server for this test: ${POSTGRES_ENV} is not set. As root: "
            f"export {POSTGRES_ENV}=$(bash scripts/ci/postgres.sh start) (bash .ci/run does), "
            'or leave these tests out: pytest -m "slow and not services"',
            pytrace=False,
        )
    return url


POSTGRES_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ci" / "postgres.sh"


def postgres(command: str) -> None:
    """``scripts/ci/postgres.sh COMMAND`` on the test server ($PG_BASE, as .ci/run set it;
    through sudo unless this is root)."""
    sudo = [] if os.geteuid() == 0 else ["sudo", "--preserve-env=PG_BASE"]
    subprocess.run(
        [*sudo, "bash", str(POSTGRES_SCRIPT), command], check=True, capture_output=True, timeout=300
    )


def fresh_database(server_url: str, name: str) -> str:
    """A new, empty database ``name`` on the server (dropped first if it exists); its URL."""
    import psycopg

    admin = make_url(server_url).set(drivername="postgresql")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as db:
        db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        db.execute(f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def slurm_cluster() -> None:
    """Fail unless a SLURM cluster answers here with a node up."""
    try:
        state = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=30
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        state = []
    if not any(s in ("idle", "mix", "alloc") for s in state):
        pytest.fail(
            f"no SLURM cluster for this test (sinfo: {state or 'not found'}). As root: bash "
            "scripts/ci/slurm.sh start (bash .ci/run does), or leave these tests out: pytest -m "
            '"slow and not services"',
            pytrace=False,
        )
