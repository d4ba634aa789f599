"""Create the Optuna storage's and the MLflow store's schemas before anything uses them:
``python -m gradalign.stores init``.

Sweeps create a schema themselves when they find an empty database, and processes that start
together on one take turns (gradalign.databases). An ``mlflow server`` does not: two servers
started on one empty database race, and one of them dies. Run this once when you set up a
database server for a study, before any server or sweep, and they all find their schemas made:

    python -m gradalign.stores init --optuna postgresql+psycopg://USER:PASSWORD@HOST/optuna \\
        --mlflow postgresql+psycopg://USER:PASSWORD@HOST/mlflow

Safe to run again, and at the same moment on several machines: a schema that exists is left
as it is. Optuna and MLflow need a database each (both keep a table ``alembic_version``).
SQLite URLs work too; a relative path is taken from the repository root.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable

from gradalign import databases, tracking
from gradalign.config import anchored_uri, repo_root
from gradalign.credentials import mask
from gradalign.optuna_storage import open_storage

WAIT_S = 300.0  # default of --wait-s: MLflow's schema takes seconds to make on a loaded server


def init(optuna_url: str | None, mlflow_url: str | None, wait_s: float) -> list[str]:
    """Create the schemas of the Optuna storage and the MLflow store that are given (each once,
    whoever else creates it at the same moment); a line per store saying what it holds now."""
    if optuna_url and mlflow_url:
        databases.check_separate(optuna_url, mlflow_url)
    if mlflow_url and mlflow_url.startswith(("http://", "https://")):
        raise ValueError(
            f"--mlflow {mask(mlflow_url)} is a tracking server, which makes its own store's "
            "schema: give the database URL the server is started with (--backend-store-uri)"
        )
    lines = []
    for program, url, create in (
        ("Optuna storage", optuna_url, lambda url: open_storage(url, wait_s)),
        ("MLflow store", mlflow_url, lambda url: tracking.client(url, wait_s)),
    ):
        if not url:
            continue
        try:
            before = databases.schema_revision(url)
            create(url)
            after = databases.schema_revision(url)
        except (ValueError, tracking.TrackingUnavailable):
            raise
        except Exception as error:  # the driver's: a server that is down, a wrong password
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise ValueError(f"{program} {mask(url)}: {mask(reason)}") from error
        done = "created" if before is None else "already there"
        lines.append(f"{program} {mask(url)}: schema {after} ({done})")
    return lines


def main(argv: Iterable[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gradalign.stores",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("init", help="create the schemas that do not exist yet")
    command.add_argument("--optuna", metavar="URL", help="the Optuna storage (of a sweeper)")
    command.add_argument("--mlflow", metavar="URL", help="the database of the MLflow store")
    command.add_argument(
        "--wait-s",
        type=float,
        default=WAIT_S,
        help=f"how long to wait for another process creating a schema (default {WAIT_S:g})",
    )
    args = parser.parse_args(list(argv))
    if not (args.optuna or args.mlflow):
        parser.error("give --optuna URL, --mlflow URL or both")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        root = repo_root()
        optuna_url, mlflow_url = (
            anchored_uri(url, root) if url else None for url in (args.optuna, args.mlflow)
        )
        lines = init(optuna_url, mlflow_url, args.wait_s)
    except (ValueError, tracking.TrackingUnavailable) as error:
        print(f"error: {mask(str(error))}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
