"""A report's final runs trained stacked, one by one, and in worker processes, side by side.

The finals of ``--seeds`` seeds for adam and gao (their conf/optimizer settings on the default
config: the residual MLP on mnist1d, 25 epochs, unless overrides say otherwise) are trained by
``report.finals.train``, as a report trains them, three ways: ``stacked`` (the seeds of each
optimizer as one stacked model, in this process), ``one by one`` (each run alone, in this
process) and ``workers`` (each run alone, in ``--workers`` spawned processes: the report's path
before stacking, start-up included). Each variant of a round writes to a fresh SQLite store, and
the variants alternate within every round so drifting load on a shared machine hits all alike;
the figure kept per variant is its minimum wall time over the rounds (load only adds time).
The data set is generated (cached) before the first round, so no variant pays for it.

    python benchmarks/bench_stacked.py [--rounds 3] [--seeds 5] [--workers 2] [-- overrides]

A sweep's trials stacked (``parallel=stacked``) against serial and process-parallel sweeps are
``bench_sweep.py``'s modes; whole studies with either, ``bench_study.py``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from gradalign import tracking
from gradalign.components import build_dataset
from gradalign.config import register_resolvers
from gradalign.report.configs import compose_config, seeded
from gradalign.report.finals import FinalJob, train
from gradalign.schema import Stage, Tag

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("adam", "gao")
# variant -> (stack, whether to use the worker processes)
VARIANTS = {"stacked": (True, False), "one by one": (False, False), "workers": (False, True)}


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


def run(variant: str, folder: Path, overrides: list[str], seeds: int, workers: int) -> float:
    """Wall seconds of ``train`` for ``variant`` into a fresh store under ``folder``."""
    store = folder / f"{variant.replace(' ', '_')}.db"
    todo = jobs(store, overrides, seeds)
    cfg = todo[0].cfg
    client = MlflowClient(f"sqlite:///{store}")
    experiment = tracking.experiment_id(f"sqlite:///{store}", 60, cfg.tracking.experiment)
    parent = client.create_run(experiment, tags={Tag.STAGE: Stage.REPORT}).info.run_id
    stack, parallel = VARIANTS[variant]
    start = time.perf_counter()
    train(todo, parent_run_id=parent, workers=workers if parallel else 1, stack=stack)
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
                print(f"round {i + 1}: {name:<11}{seconds:8.2f}s", flush=True)
    runs = args.seeds * len(OPTIMIZERS)
    print(f"{'variant':<12}{'wall (min s)':>13}{'s per run':>11}{'vs stacked':>12}")
    for name, seconds in best.items():
        ratio = seconds / best["stacked"]
        print(f"{name:<12}{seconds:>12.2f}s{seconds / runs:>10.2f}s{ratio:>11.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
