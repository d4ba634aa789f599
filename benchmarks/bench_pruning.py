"""What trial pruning saves: the default 30-trial sweeps of GAO and Adam without a pruner, with
the median pruner and with Hyperband, over 3 sampler seeds, side by side.

Each sweep is a real command, as a user types it:

    python train.py -m optimizer=<gao|adam> hydra.sweeper.seed=<seed> hydra/sweeper/pruner=<p>

For each optimizer and pruner it prints, per sampler seed and on average: the epochs trained
(every trial's logged epochs, summed), the command's wall time, and the best objective found
(the lowest of the sweep's unpruned trials); then each pruner's saving against none and whether
its best objectives lie within the spread (min to max over the seeds) of the unpruned sweeps'
or below it. It also checks the records: every trial's MLflow run ended (none RUNNING), no
trial FAIL in Optuna. Sweeps run interleaved (seed by seed, optimizer by optimizer, pruner by
pruner), so that a change of load on a shared machine touches every variant alike. MLflow and
Hydra write to a temporary directory; nothing lands in mlruns/ or outputs/.

    python benchmarks/bench_pruning.py                     # 2 optimizers x 3 pruners x 3 seeds
    python benchmarks/bench_pruning.py --quick             # 10 trials of 8 epochs on 1000 samples
    python benchmarks/bench_pruning.py --seeds 0 --optimizers gao -- trainer.epochs=50
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from sweeps import run_sweeps

ROOT = Path(__file__).resolve().parents[1]
PRUNERS = ("none", "median", "hyperband")
QUICK = ["trainer.epochs=8", "dataset.generation.num_samples=1000"]


@dataclasses.dataclass
class Sweep:
    epochs: int  # trained (logged) epochs of all its trials
    wall_s: float
    best: float  # lowest objective of its unpruned trials
    pruned: int
    trials: int


def run_one(optimizer: str, seed: int, pruner: str, trials: int, overrides: list[str]) -> Sweep:
    """One sweep in a temporary directory; its figures, after checking its records."""
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        command = [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            f"optimizer={optimizer}",
            f"hydra.sweeper.seed={seed}",
            f"hydra/sweeper/pruner={pruner}",
            f"hydra.sweeper.n_trials={trials}",
            f"hydra.sweep.dir={tmp}/sweep",
            *overrides,
        ]
        _, wall, client, runs = run_sweeps([command], tmp)
        if len(runs) != trials or any(r.info.status == "RUNNING" for r in runs):
            raise RuntimeError(f"{command}: {len(runs)} runs for {trials} trials, or some RUNNING")
        parent = client.search_runs(
            [runs[0].info.experiment_id], "tags.stage = 'sweep_parent'", max_results=10
        )[0]
        if parent.data.metrics.get("trials_failed", 0) != 0:
            raise RuntimeError(f"{command}: trials failed ({parent.data.metrics})")
        epochs = sum(len(client.get_metric_history(r.info.run_id, "val_loss")) for r in runs)
        objectives = [r.data.metrics["objective"] for r in runs if "objective" in r.data.metrics]
        pruned = sum(r.data.tags.get("pruned") == "true" for r in runs)
        return Sweep(epochs, wall, min(objectives, default=math.inf), pruned, trials)


def _change(value: float, base: float, lower: str, higher: str) -> str:
    """``value`` against ``base`` in words: "28% fewer", "6% more"."""
    percent = 100 * (1 - value / base)
    return f"{percent:.0f}% {lower}" if percent >= 0 else f"{-percent:.0f}% {higher}"


def git_commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return result.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=None, help="per sweep (default 30)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--optimizers", nargs="+", default=["gao", "adam"])
    parser.add_argument("--pruners", nargs="+", default=list(PRUNERS), choices=PRUNERS)
    parser.add_argument("--quick", action="store_true", help=f"10 trials and {' '.join(QUICK)}")
    parser.add_argument("overrides", nargs="*", help="after --: training overrides of every sweep")
    args = parser.parse_args()
    trials = args.trials or (10 if args.quick else 30)
    overrides = [*(QUICK if args.quick else []), *args.overrides]
    if "none" not in args.pruners:
        parser.error("--pruners must include none: the savings are measured against it")
    print(
        f"{datetime.date.today()} at {git_commit()}: {trials} trials per sweep, overrides "
        f"{overrides or '(none)'}; cores {len(os.sched_getaffinity(0))}, load average "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results: dict[tuple[str, str], dict[int, Sweep]] = {}
    for seed in args.seeds:
        for optimizer in args.optimizers:
            for pruner in args.pruners:
                sweep = run_one(optimizer, seed, pruner, trials, overrides)
                results.setdefault((optimizer, pruner), {})[seed] = sweep
                print(
                    f"seed {seed} {optimizer:5s} {pruner:9s} epochs {sweep.epochs:4d}, "
                    f"wall {sweep.wall_s:6.1f} s, best {sweep.best:.4f}, pruned "
                    f"{sweep.pruned}/{sweep.trials}",
                    flush=True,
                )
    print(f"\nload average now {os.getloadavg()[0]:.2f}\n")
    print(
        "| optimizer | pruner | trained epochs (mean) | wall (mean) | pruned trials (mean) | "
        "best objective per seed | best within the unpruned spread |"
    )
    print("|---|---|---|---|---|---|---|")
    for optimizer in args.optimizers:
        base = results[(optimizer, "none")]
        low, high = min(s.best for s in base.values()), max(s.best for s in base.values())
        base_epochs = statistics.mean(s.epochs for s in base.values())
        base_wall = statistics.mean(s.wall_s for s in base.values())
        for pruner in args.pruners:
            sweeps = results[(optimizer, pruner)]
            epochs = statistics.mean(s.epochs for s in sweeps.values())
            wall = statistics.mean(s.wall_s for s in sweeps.values())
            pruned = statistics.mean(s.pruned for s in sweeps.values())
            bests = ", ".join(f"{s.best:.4f}" for s in sweeps.values())
            if pruner == "none":
                saved, within = f"{epochs:.0f}", f"spread {low:.4f} to {high:.4f}"
                timing = f"{wall:.1f} s"
            else:
                saved = f"{epochs:.0f}: {_change(epochs, base_epochs, 'fewer', 'more')}"
                timing = f"{wall:.1f} s: {_change(wall, base_wall, 'less', 'more')}"
                inside = sum(s.best <= high for s in sweeps.values())
                within = f"{inside} of {len(sweeps)} at or below {high:.4f}"
            print(
                f"| {optimizer} | {pruner} | {saved} | {timing} | {pruned:.1f} of {trials} | "
                f"{bests} | {within} |"
            )


if __name__ == "__main__":
    main()
