"""A report's final runs trained one by one, in worker processes, and stacked, side by side:
whether stacking them would gain anything (the report trains them one by one since it did not).

The finals of ``--seeds`` seeds for adam and gao (their conf/optimizer settings on the default
config: the residual MLP on mnist1d, 25 epochs, unless overrides say otherwise) are trained four
ways: ``one by one`` (``report.finals.train`` in this process), ``workers`` (the same in
``--workers`` spawned processes, start-up included: what a report does with ``jobs`` one per
core), ``stacked`` (the seeds of each optimizer as one stacked model,
``experiment.run_stacked_experiments``, in this process) and ``stacked workers`` (each
optimizer's stack in a worker process of its own). Each variant of a round
writes to a fresh SQLite store, and the variants alternate within every round so drifting load
on a shared machine hits all alike; the figure kept per variant is its minimum wall time over
the rounds (load only adds time).
The data set is generated (cached) before the first round, so no variant pays for it.

    python benchmarks/bench_stacked.py [--rounds 3] [--seeds 5] [--workers 2] [-- overrides]

A sweep's trials stacked (``parallel=stacked``) against serial and process-parallel sweeps are
``bench_sweep.py``'s modes; whole studies with either, ``bench_study.py``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from gradalign import tracking
from gradalign.components import build_dataset
from gradalign.config import register_resolvers
from gradalign.experiment import run_stacked_experiments
from gradalign.report.configs import compose_config, seeded
from gradalign.report.finals import FinalJob, train
from gradalign.schema import Stage, Tag

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("adam", "gao")
# variant -> (stack, whether to use the worker processes)
VARIANTS = {
    "one by one": (False, False),
    "workers": (False, True),
    "stacked": (True, False),
    "stacked workers": (True, True),
}


def jobs(store: Path, overrides: list[str], seeds: int) -> list[FinalJob]:
    """The final jobs of every optimizer and seed, logging to the SQLite file ``store``; their
    estimates are large, so that ``train`` starts the workers it is given."""
    found = []
    for name in OPTIMIZERS:
        cfg = compose_config(
            ROOT / "conf",
            [
                f"optimizer={name}",
                f"tracking.uri=sqlite:///{store}",
                f"paths.data_cache={ROOT / '.cache' / 'data'}",
                *overrides,
            ],
        )
        for seed in range(1, seeds + 1):
            tags = {Tag.SELECTED_FROM: "benchmark"}
            found.append(FinalJob(name, seed, seeded(cfg, seed), tags, estimate_s=1e6))
    return found


def _stacked(cfgs: list, parent: str) -> None:
    """Train ``cfgs`` (one optimizer's seeds) as one stacked model, each its own final run."""
    tags = [{Tag.SELECTED_FROM: "benchmark"}] * len(cfgs)
    run_stacked_experiments(cfgs, stage=Stage.FINAL, parent_run_id=parent, extra_tags=tags)


def run(variant: str, folder: Path, overrides: list[str], seeds: int, workers: int) -> float:
    """Wall seconds of ``variant``'s training into a fresh store under ``folder``."""
    store = folder / f"{variant.replace(' ', '_')}.db"
    todo = jobs(store, overrides, seeds)
    cfg = todo[0].cfg
    client = MlflowClient(f"sqlite:///{store}")
    experiment = tracking.experiment_id(f"sqlite:///{store}", 60, cfg.tracking.experiment)
    parent = client.create_run(experiment, tags={Tag.STAGE: Stage.REPORT}).info.run_id
    stack, parallel = VARIANTS[variant]
    start = time.perf_counter()
    stacks = [[job.cfg for job in todo if job.optimizer == name] for name in OPTIMIZERS]
    if not stack:
        train(todo, parent_run_id=parent, workers=workers if parallel else 1)
    elif parallel:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            for future in [pool.submit(_stacked, cfgs, parent) for cfgs in stacks]:
                future.result()
    else:
        for cfgs in stacks:
            _stacked(cfgs, parent)
    seconds = time.perf_counter() - start
    finished = client.search_runs([experiment], "attributes.status = 'FINISHED'")
    if len(finished) != len(todo):
        raise RuntimeError(f"{variant}: {len(finished)} of {len(todo)} runs FINISHED")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=5, help="final runs per optimizer")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("overrides", nargs="*", help="training-config overrides")
    args = parser.parse_args()
    register_resolvers(ROOT)
    print(
        f"load average {os.getloadavg()[0]:.2f}; {args.seeds} seeds x {OPTIMIZERS}; "
        f"{args.workers} workers; overrides {args.overrides or 'none'}"
    )
    best = {name: float("inf") for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        build_dataset(jobs(Path(tmp) / "warm.db", args.overrides, 1)[0].cfg)  # fill the cache
        for i in range(args.rounds):
            for name in VARIANTS:
                folder = Path(tmp) / f"round{i}"
                folder.mkdir(exist_ok=True)
                seconds = run(name, folder, args.overrides, args.seeds, args.workers)
                best[name] = min(best[name], seconds)
                print(f"round {i + 1}: {name:<16}{seconds:8.2f}s", flush=True)
    runs = args.seeds * len(OPTIMIZERS)
    print(f"{'variant':<17}{'wall (min s)':>13}{'s per run':>11}{'vs workers':>12}")
    for name, seconds in best.items():
        ratio = seconds / best["workers"]
        print(f"{name:<17}{seconds:>12.2f}s{seconds / runs:>10.2f}s{ratio:>11.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
