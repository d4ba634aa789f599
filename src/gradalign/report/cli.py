"""The shared body of the report.py and study.py commands."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gradalign import processes
from gradalign.checks import UserError
from gradalign.credentials import mask

# What a rerun of each command reuses, for the line of an interrupted one.
RESUMES = {
    "report.py": "the final runs that finished are reused, the rest trained",
    "study.py": "the sweeps' finished trials are kept (outputs/studies/optuna.db) and the "
    "finished final runs reused",
}


def run_command(
    argv: Sequence[str],
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser, Path], None],
    settings_from_args: Callable[[Path, argparse.Namespace, str], Any],
    run: Callable[[Any], Path],
    root: Path,
    script: str,
) -> int:
    """The body of report.py and study.py: parse the flags ``add_arguments`` declares, build the
    settings, run, print the path of the markdown page ``run`` wrote.

    What the user must fix (a UserError: a bad setting, a missing sweep, a name taken, a failed
    sweep's log, a store that cannot be used) ends with ``error: ...`` on stderr and exit status
    2; Ctrl-C or SIGTERM with one line saying what is kept, exit status 130; anything else is a
    bug or an accident and keeps its traceback.
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser, root)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    processes.adopt()  # its sweeps and final-run workers stop when it is gone
    from gradalign.tracking import Terminated, sigterm_raises  # MLflow: after --help

    try:
        with sigterm_raises():
            settings = settings_from_args(root, args, shlex.join(["python", script, *argv]))
            out_dir = run(settings)
    except UserError as error:
        print(f"error: {mask(str(error))}", file=sys.stderr)
        return processes.EXIT_BAD_INPUT
    except (KeyboardInterrupt, Terminated) as error:
        run_id = getattr(error, "mlflow_run_id", None)
        kind = "Ctrl-C" if isinstance(error, KeyboardInterrupt) else "SIGTERM"
        ended = f"report run {run_id} and the runs" if run_id else "the runs"
        print(
            f"interrupted ({kind}): {ended} it had open are marked KILLED in MLflow; run the "
            f"same command again to go on: {RESUMES.get(script, RESUMES['report.py'])}",
            file=sys.stderr,
        )
        return processes.EXIT_INTERRUPTED
    print(out_dir)
    return 0
