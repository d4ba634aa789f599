"""The same 30-trial sweep run serially and in parallel on this machine: throughput ratios.

Modes (each a real ``python train.py -m`` command, as a user types it):

- ``serial``: ``python train.py -m`` (one trial after another, in the sweep's process);
- ``joblib``: ``... parallel=joblib parallel.workers=2`` (trials two at a time, in batches);
- ``shared``: two ``python train.py -m`` processes with half the trials each, sharing one Optuna
  study through a SQLite storage (no batches, so no worker waits for the other's trial);
- ``stacked``: ``... parallel=stacked parallel.workers=K`` (each batch of K trials trained as one
  stacked model, in the sweep's process, on one core; ``--stack`` sets K);
- ``stacked-shared``: ``shared`` with each of its two processes ``parallel=stacked``.

For each: the command's wall time, and the sweep phase (first trial's MLflow start to last
trial's end, i.e. without start-up) in trials per minute; then each parallel mode's ratio to
serial. Modes run interleaved over ``--repeats`` rounds and the fastest round of each is kept
(other processes on a 2-core machine only ever add time). MLflow and Hydra write to a temporary
directory; nothing lands in mlruns/ or outputs/.

    python benchmarks/bench_sweep.py [--trials 30] [--repeats 2] [--stack 10]
        [--modes serial joblib shared stacked stacked-shared]
        [-- training overrides, e.g. trainer.epochs=100]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
from pathlib import Path

from sweeps import run_sweeps

ROOT = Path(__file__).resolve().parents[1]
MODES = ("serial", "joblib", "shared", "stacked", "stacked-shared")


@dataclasses.dataclass
class Result:
    wall_s: float
    sweep_s: float
    trials: int
    best: float
    pruned: int  # trials a pruner stopped (hydra/sweeper/pruner=... in the overrides)

    def per_minute(self, seconds: float) -> float:
        return 60 * self.trials / seconds


def commands(
    mode: str, trials: int, tmp: Path, overrides: list[str], stack: int
) -> list[list[str]]:
    """The train.py command(s) of ``mode``, writing under ``tmp``; ``stack``: the stacked
    modes' trials per batch."""
    base = [sys.executable, str(ROOT / "train.py"), "-m", *overrides]
    if mode.startswith("stacked"):
        base += ["parallel=stacked", f"parallel.workers={stack}"]
    if mode in ("serial", "stacked"):
        return [[*base, f"hydra.sweeper.n_trials={trials}", f"hydra.sweep.dir={tmp}/sweep"]]
    if mode == "joblib":
        return [
            [
                *base,
                "parallel=joblib",
                "parallel.workers=2",
                f"hydra.sweeper.n_trials={trials}",
                f"hydra.sweep.dir={tmp}/sweep",
            ]
        ]
    storage = [f"hydra.sweeper.storage=sqlite:///{tmp}/optuna.db", "hydra.sweeper.study_name=b"]
    return [
        [*base, *storage, f"hydra.sweeper.n_trials={n}", f"hydra.sweep.dir={tmp}/sweep-{i}"]
        for i, n in enumerate((trials - trials // 2, trials // 2))
    ]


def run_mode(mode: str, trials: int, overrides: list[str], stack: int) -> Result:
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        _, wall, _, runs = run_sweeps(commands(mode, trials, tmp, overrides, stack), tmp)
        if len(runs) != trials or any(r.info.status != "FINISHED" for r in runs):
            raise RuntimeError(f"{mode}: {len(runs)} runs for {trials} trials, or not finished")
        span = max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)
        best = min(r.data.metrics.get("objective", math.inf) for r in runs)  # pruned: none
        pruned = sum(r.data.tags.get("pruned") == "true" for r in runs)
        return Result(wall, span / 1000, trials, best, pruned)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--stack", type=int, default=10, help="stacked modes: trials per batch")
    parser.add_argument("overrides", nargs="*", help="after --: training overrides for every mode")
    args = parser.parse_args()
    print(f"cores: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()[0]:.2f}")
    best: dict[str, Result] = {}
    for round_ in range(args.repeats):
        for mode in args.modes:
            result = run_mode(mode, args.trials, args.overrides, args.stack)
            print(
                f"round {round_ + 1} {mode:14s} wall {result.wall_s:6.1f} s, sweep phase "
                f"{result.sweep_s:6.1f} s, best objective {result.best:.4f}, "
                f"{result.pruned} pruned",
                flush=True,
            )
            if mode not in best or result.wall_s < best[mode].wall_s:
                best[mode] = result
    print(
        f"\n{args.trials} trials, fastest of {args.repeats} round(s); load average now "
        f"{os.getloadavg()[0]:.2f}"
    )
    print("| mode | wall | trials/min (wall) | sweep phase | trials/min (sweep phase) |")
    print("|---|---|---|---|---|")
    for mode, r in best.items():
        print(
            f"| {mode} | {r.wall_s:.1f} s | {r.per_minute(r.wall_s):.1f} | {r.sweep_s:.1f} s | "
            f"{r.per_minute(r.sweep_s):.1f} |"
        )
    if "serial" in best:
        serial = best["serial"]
        for mode, r in best.items():
            if mode != "serial":
                print(
                    f"{mode} / serial throughput: {serial.wall_s / r.wall_s:.2f}x (wall), "
                    f"{serial.sweep_s / r.sweep_s:.2f}x (sweep phase)"
                )


if __name__ == "__main__":
    main()
