"""A sweep's SLURM jobs (``parallel=slurm``, hydra-submitit-launcher): a batch that SLURM
stopped, and cancelling the jobs of an interrupted sweep.

SLURM owns its jobs' lives. ``scancel`` (or a time limit, a node failure) sends a job SIGTERM
and, ``KillWait`` seconds later, SIGKILL; the trial's run ends KILLED on the SIGTERM
(gradalign.tracking.start_run), and submitit, seeing in ``sacct`` a job that ended without a
result, raises ``UncompletedJobError`` in the sweep process for the whole batch. The sweep then
stops as an interrupted one does. A sweep process that is interrupted itself (Ctrl-C, SIGTERM)
cancels the jobs it submitted, found as submitit's job folders, so that none trains on for a
trial Optuna was told had failed. One that is killed outright cannot: its jobs finish, and end
their own runs.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
_STATE = re.compile(r"\(state: ([^)]*)\)")
_JOB_FOLDER = re.compile(r"^(\d+)(?:_\d+)?$")  # %j: <job id>, or <array job id>_<task>


class JobsStopped(Exception):
    """SLURM ended jobs of the running batch before they returned a result; the message says
    which and how."""


def stopped_batch(error: BaseException) -> JobsStopped | None:
    """A JobsStopped for ``error`` if it is submitit's report of a job that ended without a
    result (its first line names the job, its SLURM state says why), else None."""
    # only SLURM sweeps need submitit; FailedJobError (a subclass): the job returned an error
    from submitit.core.utils import FailedJobError, UncompletedJobError

    if not isinstance(error, UncompletedJobError) or isinstance(error, FailedJobError):
        return None
    message = str(error)
    job = message.split(" with path", 1)[0]  # "Job 12 (task: 0)"
    state = _STATE.search(message)
    return JobsStopped(
        f"{job} ended {state[1] if state else 'without a result'} before returning "
        "(scancel, a time limit or a node failure)"
    )


def job_ids(launcher: DictConfig) -> list[str]:
    """The SLURM job ids of the jobs a SLURM launcher submitted, from submitit's job folders;
    [] for any other launcher."""
    if OmegaConf.select(launcher, "_target_") != LAUNCHER:
        return []
    folders = Path(str(launcher.submitit_folder)).parent  # .../.submitit/%j
    if not folders.is_dir():
        return []
    found = {match[1] for path in folders.iterdir() if (match := _JOB_FOLDER.match(path.name))}
    return sorted(found, key=int)


def cancel_jobs(launcher: DictConfig, timeout_s: float) -> list[str]:
    """``scancel`` the jobs a SLURM launcher submitted and wait up to ``timeout_s`` for them to
    leave the queue (each ends its run KILLED on the way out); the ids of those still queued."""
    ids = job_ids(launcher)
    if not ids:
        return []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["scancel", *ids], capture_output=True, check=False, timeout=60)
    deadline = time.monotonic() + timeout_s
    while (left := _queued(ids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _queued(ids: list[str]) -> list[str]:
    """Which of jobs ``ids`` are still in SLURM's queue (any of their array tasks)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        listed = subprocess.run(
            ["squeue", "-h", "-o", "%F", "-j", ",".join(ids)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        ).stdout.split()
        return sorted(set(listed) & set(ids), key=int)
    return []
