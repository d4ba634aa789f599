"""Stopping the worker processes a launcher left behind, for a sweep process being interrupted.

A sweep process that is stopped by SIGTERM dies without stopping its launcher's children: a
submitit local job keeps training (and later ends its MLflow run FINISHED for a trial Optuna was
told had failed). Asking them to stop with SIGTERM lets each end its run KILLED itself (submitit's
local controller forwards the signal to its job). Children are found through /proc (Linux); on
other systems there is nothing to find and nothing is done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

_PROC = Path("/proc")


def _status(pid: int) -> dict[str, str]:
    """The fields of /proc/<pid>/status ({} if the process is gone)."""
    try:
        lines = (_PROC / str(pid) / "status").read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (exited, waiting to be reaped)."""
    state = _status(pid).get("State", "Z")
    return not state.startswith(("Z", "X"))


def _ignores_sigterm(pid: int) -> bool:
    mask = int(_status(pid).get("SigIgn", "0"), 16)
    return bool(mask >> (signal.SIGTERM - 1) & 1)


def children() -> list[int]:
    """Pids of the live child processes of this process."""
    parent = str(os.getpid())
    found = []
    for path in _PROC.glob("[0-9]*"):
        if _status(int(path.name)).get("PPid") == parent and _alive(int(path.name)):
            found.append(int(path.name))
    return found


def stop_children(timeout_s: float) -> list[int]:
    """Send SIGTERM to this process's children and wait up to ``timeout_s`` for those that do
    not ignore it (a loky resource tracker does) to exit; the pids still alive then."""
    targets = [pid for pid in children() if not _ignores_sigterm(pid)]
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while (alive := [pid for pid in targets if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive
