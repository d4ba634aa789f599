"""Processes that start processes: stopping a launcher's workers, and workers that die with
their owner.

A sweep process that is stopped by SIGTERM dies without stopping its launcher's children: a
submitit local job keeps training (and later ends its MLflow run FINISHED for a trial Optuna was
told had failed). Asking them to stop with SIGTERM lets each end its run KILLED itself (submitit's
local controller forwards the signal to its job). A process killed with SIGKILL cannot ask
anything, so every worker also watches its owner (``adopt``) and stops itself when the owner is
gone. Processes are found through /proc (Linux); on other systems there is nothing to find and
nothing is done.

Only a process that the owner started (its parent, or an ancestor further up) is tied to it. A
SLURM job is started by SLURM, not by the sweep process that submitted it: it runs on whatever
node SLURM picks, lives on if the sweep process on the login node is killed (as every SLURM job
outlives the shell that submitted it) and is stopped by ``scancel``, even on the sweep's host.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

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


# --- owners: a process that starts others passes itself on, so they die with it -------------
OWNER_ENV = "GRADALIGN_OWNER"
WATCH_INTERVAL_S = 1.0  # how often a worker checks that its owner is alive
GRACE_S = 5.0  # after SIGTERM, how long an orphan may take to end its run before SIGKILL
_watched: list[str] = []  # the owner this process watches (at most one)
orphaned: list[str] = []  # set when the owner died: the owner's token


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (None if it is gone); with
    the pid it identifies a process even after the pid is reused."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces


def owner_token(pid: int | None = None) -> str:
    """``host:pid:start time`` of process ``pid`` (this one by default)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def ancestors(pid: int | None = None) -> list[int]:
    """The pids of process ``pid``'s parent, its parent's parent, ... up to (not including) the
    init process (this process by default)."""
    found = []
    parent = _status(os.getpid() if pid is None else pid).get("PPid", "0")
    while parent not in ("0", "1") and int(parent) not in found:
        found.append(int(parent))
        parent = _status(int(parent)).get("PPid", "0")
    return found


def owner_alive(token: str) -> bool | None:
    """Whether the process of ``token`` still runs; None when it runs on another host (which
    this process cannot see)."""
    host, pid, started = token.rsplit(":", 2)
    if host != socket.gethostname():
        return None
    return started != "None" and _start_time(int(pid)) == started and _alive(int(pid))


def adopt() -> str:
    """Tie this process to the process that started it, and become the owner of its own children.

    If ``$GRADALIGN_OWNER`` names another live process on this host that is an ancestor of this
    one (not, say, the sweep process that submitted this SLURM job), a daemon thread watches it:
    once it is gone (killed, even with SIGKILL), this process gets SIGTERM, so its open MLflow
    run ends KILLED, and SIGKILL ``GRACE_S`` later if it is still alive. Then
    ``$GRADALIGN_OWNER`` is set to this process, for the workers it starts. Returns this
    process's token. Idempotent.
    """
    mine = owner_token()
    owner = os.environ.get(OWNER_ENV)
    if (
        owner
        and owner != mine
        and not _watched
        and owner_alive(owner)
        and int(owner.rsplit(":", 2)[1]) in ancestors()
    ):
        _watched.append(owner)
        threading.Thread(target=_watch, args=(owner,), name="owner-watchdog", daemon=True).start()
    os.environ[OWNER_ENV] = mine
    return mine


def _watch(owner: str) -> None:
    while owner_alive(owner):
        time.sleep(WATCH_INTERVAL_S)
    orphaned.append(owner)
    log.warning("owner process %s is gone: stopping", owner)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)
