"""Processes that start processes: stopping a launcher's workers, and workers that die with
their owner.

A sweep process that is stopped by SIGTERM dies without stopping its launcher's children: a
submitit local job keeps training. Asking them to stop with SIGTERM lets each end its run
KILLED itself (submitit's local controller forwards the signal to its job). A process killed
with SIGKILL cannot ask anything, so every worker watches its owner and stops itself when the
owner is gone.

Supervision starts at a worker's first instruction of ours (``adopt``: train.py calls it before
anything else, a sweep trial's job and the report's workers as their first step). The owner
passes its identity at spawn, in ``$GRADALIGN_OWNER`` (host, pid and start time, so a reused pid
is not mistaken for it). A worker that finds its owner already gone stops at once; one whose
owner lives watches it from a thread. Processes are read through psutil.

Only a process that the owner started (its parent, or an ancestor further up) is tied to it. A
SLURM job is started by SLURM, not by the sweep process that submitted it: it runs on whatever
node SLURM picks, lives on if the sweep process on the login node is killed (as every SLURM job
outlives the shell that submitted it; a resumed sweep records what it finished) and is stopped
by ``scancel``, even on the sweep's host.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time

import psutil

log = logging.getLogger(__name__)
# Exit statuses of the commands (train.py alone and as a sweep, report.py, study.py) that did not
# finish: a setting or store the user must fix, a fit that diverged (a result: its run is FAILED,
# tag diverged), an interruption (as a shell reports Ctrl-C).
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130

OWNER_ENV = "GRADALIGN_OWNER"
OWNER_JOB_ENV = "GRADALIGN_OWNER_SLURM_JOB"  # the owner's SLURM job ("" outside SLURM)
WATCH_INTERVAL_S = 1.0  # how often a worker checks that its owner is alive
GRACE_S = 5.0  # after SIGTERM, how long an orphan may take to end its run before SIGKILL
_watched: list[str] = []  # the owner this process watches (at most one)
orphaned: list[str] = []  # set when the owner died: the owner's token


def _live(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def children() -> list[psutil.Process]:
    """The live child processes of this process."""
    return [child for child in psutil.Process().children() if _live(child)]


def stop_children(timeout_s: float) -> list[int]:
    """Send SIGTERM to this process's children and wait up to ``timeout_s`` for those that do
    not ignore it (a resource tracker does) to exit; the pids still alive then. The children are
    not reaped: their exit status stays for whoever started them (a ``ProcessPoolExecutor``
    takes a child reaped by someone else for a live one and waits for it forever)."""
    targets = []
    for child in children():
        with contextlib.suppress(psutil.Error):  # exited meanwhile
            if signal.SIGTERM not in _ignored(child):
                child.terminate()
                targets.append(child)
    deadline = time.monotonic() + timeout_s
    while (alive := [child for child in targets if _live(child)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [child.pid for child in alive]


def _ignored(process: psutil.Process) -> set[int]:
    """The signals ``process`` ignores (Linux; none known elsewhere)."""
    try:
        with open(f"/proc/{process.pid}/status") as status:
            mask = next(line for line in status if line.startswith("SigIgn:")).split()[1]
    except (OSError, StopIteration):
        return set()
    return {n for n in range(1, 65) if int(mask, 16) >> (n - 1) & 1}


def owner_token(pid: int | None = None) -> str:
    """``host:pid:start time`` of process ``pid`` (this one by default): with the start time,
    it names a process even after its pid is reused."""
    process = psutil.Process(pid)
    return f"{socket.gethostname()}:{process.pid}:{process.create_time():.2f}"


def owner_alive(token: str) -> bool | None:
    """Whether the process of ``token`` still runs; None when it runs on another host (which
    this process cannot see, or a token that is not one)."""
    parts = token.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return None
    host, pid, started = parts
    try:
        process = psutil.Process(int(pid))
        return f"{process.create_time():.2f}" == started and _live(process)
    except psutil.Error:
        return False


def ancestors() -> list[int]:
    """The pids of this process's parent, its parent's parent, ... up to the init process."""
    return [parent.pid for parent in psutil.Process().parents() if parent.pid > 1]


def adopt() -> str:
    """Tie this process to the process that started it, and become the owner of its own children.

    If ``$GRADALIGN_OWNER`` names another process on this host and this process runs in the
    owner's SLURM job (or, like it, in none): if the owner is gone already, this process stops
    now (SIGTERM, then SIGKILL ``GRACE_S`` later); if it lives and is an ancestor of this one, a
    daemon thread watches it and does the same once it is gone (killed, even with SIGKILL), so
    this process's open MLflow run ends KILLED. Then ``$GRADALIGN_OWNER`` names this process,
    for the workers it starts. Returns this process's token. Idempotent.
    """
    mine = owner_token()
    owner = os.environ.get(OWNER_ENV)
    own_job = os.environ.get("SLURM_JOB_ID", "")
    if owner and owner != mine and not _watched and os.environ.get(OWNER_JOB_ENV, "") == own_job:
        alive = owner_alive(owner)
        if alive is False:
            _stop(owner)
        elif alive and int(owner.rsplit(":", 2)[1]) in ancestors():
            _watched.append(owner)
            threading.Thread(
                target=_watch, args=(owner,), name="owner-watchdog", daemon=True
            ).start()
    os.environ[OWNER_ENV] = mine
    os.environ[OWNER_JOB_ENV] = own_job
    return mine


def _watch(owner: str) -> None:
    while owner_alive(owner):
        time.sleep(WATCH_INTERVAL_S)
    _stop(owner)


def _stop(owner: str) -> None:
    """Stop this process because its owner is gone: SIGTERM (its runs end KILLED), and SIGKILL
    ``GRACE_S`` later if it is still alive."""
    orphaned.append(owner)
    log.warning("owner process %s is gone: stopping", owner)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)
