"""Final runs: the best configuration of each optimizer trained for the final budget per seed,
one by one, in parallel worker processes when that saves more than starting them costs.

They are not stacked (the seeds of one configuration as one model, as a stacked sweep trains
its trials): measured against one by one in worker processes, stacking them gained nothing
(docs/benchmarks.md, "Stacked final runs").

Every run carries tag ``init_hash``, a hash of the model's initial state_dict logged by
run_experiment, so the report can check that all optimizers of a seed started from the same
weights.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import multiprocessing
import signal
from collections.abc import Sequence

from omegaconf import DictConfig

from gradalign import processes
from gradalign.experiment import run_experiment
from gradalign.schema import Stage

log = logging.getLogger(__name__)
# What a spawned worker spends importing torch, MLflow and Hydra before its first run: starting
# workers pays off only when it saves more than this (the figure is in docs/benchmarks.md).
WORKER_START_S = 5.0
STOP_WORKERS_S = 30.0  # how long a stopped report waits for its workers to end their runs


@dataclasses.dataclass(frozen=True)
class FinalJob:
    """One final run to train: a resolved config (seeds set), the tags it is logged with, an
    estimate of its wall time (which decides whether worker processes pay off), and the keys
    its name shows."""

    optimizer: str
    seed: int
    cfg: DictConfig
    tags: dict[str, str]
    estimate_s: float
    searched: tuple[str, ...] = ()  # the keys its sweep searched: the run's name shows them


@dataclasses.dataclass(frozen=True)
class FinalResult:
    """A final run as the report uses it: where it is, whether this report trained it, whether it
    diverged, its initial weights' hash (tag init_hash), its per-epoch curves and its per-seed
    outcomes (stats.outcomes)."""

    optimizer: str
    seed: int
    run_id: str
    reused: bool
    diverged: bool
    init_hash: str | None
    curves: dict[str, list[float]]
    outcomes: dict[str, float]


def _train(job: FinalJob, parent_run_id: str) -> str:
    """Train one final run (in this or a worker process); its MLflow run id."""
    _, run_id = run_experiment(
        job.cfg,
        stage=Stage.FINAL,
        parent_run_id=parent_run_id,
        extra_tags=job.tags,
        searched=job.searched,
    )
    return run_id


def _leave_ctrl_c_to_the_report() -> None:
    """A worker ignores Ctrl-C (SIGINT reaches the whole terminal's process group): the report
    process stops its workers with SIGTERM, and each ends its run KILLED, without a traceback
    of a worker interrupted while it waited for its next job."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def workers_worth_starting(estimates_s: Sequence[float], workers: int) -> int:
    """How many processes to train jobs of these estimated durations in: ``workers`` (at most
    one per job) when that saves more time than starting them costs, else 1 (this process)."""
    workers = min(workers, len(estimates_s))
    if workers <= 1:
        return 1
    saved = sum(estimates_s) * (1 - 1 / workers)
    return workers if saved > WORKER_START_S else 1


def train(jobs: Sequence[FinalJob], *, parent_run_id: str, workers: int) -> list[str]:
    """Train ``jobs`` nested under ``parent_run_id``; their run ids, in order.

    In this process, one after another, unless ``workers_worth_starting`` says otherwise; then
    in spawned processes (spawn, not fork: this process holds an open SQLite connection and
    torch's thread pool, neither of which survives a fork).
    """
    workers = workers_worth_starting([job.estimate_s for job in jobs], workers)
    run_ids: dict[int, str] = {}

    def record(i: int, run_id: str) -> None:
        run_ids[i] = run_id
        log.info(
            "final run %d/%d done: %s seed %d",
            len(run_ids),
            len(jobs),
            jobs[i].optimizer,
            jobs[i].seed,
        )

    if workers == 1:
        for i, job in enumerate(jobs):
            record(i, _train(job, parent_run_id))
        return [run_ids[i] for i in range(len(jobs))]
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_leave_ctrl_c_to_the_report
    )
    try:
        futures = {pool.submit(_train, job, parent_run_id): i for i, job in enumerate(jobs)}
        for future in concurrent.futures.as_completed(futures):
            record(futures[future], future.result())  # re-raise a worker's error here
    except BaseException:  # an error or an interruption: the other runs stop too, KILLED
        pool.shutdown(wait=False, cancel_futures=True)
        left = processes.stop_children(STOP_WORKERS_S)
        if left:
            log.warning("final-run workers %s did not stop within %g s", left, STOP_WORKERS_S)
        raise
    pool.shutdown()
    return [run_ids[i] for i in range(len(jobs))]
