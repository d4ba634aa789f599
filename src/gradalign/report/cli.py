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
    sweep's log) ends with ``error: ...`` on stderr and exit status 2; anything else is a bug or
    an accident and keeps its traceback.
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser, root)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    processes.adopt()  # its sweeps and final-run workers stop when it is gone
    try:
        settings = settings_from_args(root, args, shlex.join(["python", script, *argv]))
        out_dir = run(settings)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(out_dir)
    return 0
