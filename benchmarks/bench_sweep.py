"""The same 30-trial sweep run serially and in parallel on this machine: throughput ratios.

Modes (each a real ``python train.py -m`` command, as a user types it):

- ``serial``: ``python train.py -m`` (one trial after another, in the sweep's process);
- ``joblib``: ``... parallel=joblib parallel.workers=2`` (trials two at a time, in batches);
- ``shared``: two ``python train.py -m`` processes with half the trials each, sharing one Optuna
  study through a SQLite storage (no batches, so no worker waits for the other's trial);
- ``stacked``: ``... parallel=stacked parallel.workers=K`` (each batch of K trials trained as one
  stacked model, in the sweep's process, on one core; ``--stack`` sets K);
- ``stacked-shared``: ``shared`` with each of its two processes ``parallel=stacked``;
- ``bare``: the serial sweep's trials (the same values, in the same order) trained in one plain
  Python process: the config composed once, then for each trial its model and optimizer built
  and ``training.fit`` run as a trial runs it (the same epochs, batches and evaluation), with no
  Hydra job, no Optuna and no MLflow. Its wall time is what the sweep's trials cost by
  themselves; ``serial / bare`` is the sweep's overhead (needs ``serial`` in the same round).

For each: the command's wall time, and the sweep phase (first trial's MLflow start to last
trial's end, i.e. without start-up) in trials per minute; then each parallel mode's ratio to
serial, and serial's to bare. Modes run interleaved over ``--repeats`` rounds and the fastest
round of each is kept (other processes on a 2-core machine only ever add time). MLflow and Hydra
write to a temporary directory, whose MLflow store is created before the sweep starts (as a
user's is after the first run); nothing lands in mlruns/ or outputs/. ``--root`` runs another
checkout's train.py (with its src/ first on PYTHONPATH), to compare two versions side by side.

    python benchmarks/bench_sweep.py [--trials 30] [--repeats 2] [--stack 10]
        [--modes serial bare joblib shared stacked stacked-shared] [--root DIR]
        [-- training overrides, e.g. trainer.epochs=100]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from sweeps import run_sweeps

ROOT = Path(__file__).resolve().parents[1]
MODES = ("serial", "bare", "joblib", "shared", "stacked", "stacked-shared")


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
    mode: str, trials: int, tmp: Path, overrides: list[str], stack: int, root: Path
) -> list[list[str]]:
    """The train.py command(s) of ``mode``, writing under ``tmp``; ``stack``: the stacked
    modes' trials per batch; ``root``: the checkout whose train.py runs."""
    base = [sys.executable, str(root / "train.py"), "-m", *overrides]
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


def run_mode(
    mode: str, trials: int, overrides: list[str], stack: int, root: Path
) -> tuple[Result, list[dict[str, str]]]:
    """Run ``mode`` once; (its result, the searched values of its trials in trial order)."""
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        MlflowClient(f"sqlite:///{tmp}/mlflow.db").search_experiments()  # a store that exists
        _, wall, _, runs = run_sweeps(commands(mode, trials, tmp, overrides, stack, root), tmp)
        if len(runs) != trials or any(r.info.status != "FINISHED" for r in runs):
            raise RuntimeError(f"{mode}: {len(runs)} runs for {trials} trials, or not finished")
        span = max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)
        best = min(r.data.metrics.get("objective", math.inf) for r in runs)  # pruned: none
        pruned = sum(r.data.tags.get("pruned") == "true" for r in runs)
        ordered = sorted(runs, key=lambda r: int(r.data.tags.get("optuna_trial", 0)))
        values = [{k: v for k, v in r.data.params.items() if k in SEARCHED} for r in ordered]
        return Result(wall, span / 1000, trials, best, pruned), values


SEARCHED = ("optimizer.lr", "optimizer.beta", "optimizer.momentum", "optimizer.weight_decay")


def run_bare(values: list[dict[str, str]], overrides: list[str], root: Path) -> Result:
    """The trials of ``values`` trained in one plain process (see the module docstring)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--bare-child", json.dumps(values), str(root), "--", *overrides],
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    objectives = json.loads(done.stdout.splitlines()[-1])
    return Result(wall, math.nan, len(values), min(objectives), 0)


def bare_child(values: list[dict[str, str]], root: Path, overrides: list[str]) -> None:
    """Train each of ``values`` (a trial's searched values) as a trial would, untracked; print
    their objectives."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from gradalign.components import build_dataset, build_model, build_optimizer
    from gradalign.config import register_resolvers
    from gradalign.hydra_compat import VERSION_BASE
    from gradalign.training import fit

    register_resolvers(root)
    with initialize_config_dir(config_dir=str(root / "conf"), **VERSION_BASE):
        base = compose("config", overrides=overrides)
    if base.trainer.threads is not None:
        torch.set_num_threads(base.trainer.threads)
    splits = build_dataset(base)
    objectives = []
    for trial in values:
        cfg = base.copy()
        for key, value in trial.items():
            OmegaConf.update(cfg, key, float(value))
        torch.manual_seed(cfg.seed.model)
        model = build_model(cfg, splits)
        history = fit(
            model,
            build_optimizer(cfg, model.parameters()),
            splits,
            epochs=cfg.trainer.epochs,
            batch_size=cfg.trainer.batch_size,
            eval_batch_size=cfg.trainer.eval_batch_size,
            data_seed=cfg.seed.data,
            device="cpu",
        )
        objectives.append(history.objective(cfg.objective))
    print(json.dumps(objectives))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--stack", type=int, default=10, help="stacked modes: trials per batch")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to run")
    parser.add_argument("--bare-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="after --: training overrides for every mode")
    args = parser.parse_args()
    if args.bare_child:
        bare_child(json.loads(args.bare_child[0]), Path(args.bare_child[1]), args.overrides)
        return
    if "bare" in args.modes and "serial" not in args.modes:
        parser.error("bare trains the serial sweep's trials: add serial to --modes")
    root = args.root.resolve()
    if root != ROOT:  # that checkout's package, not this one's
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(root / "src"), os.environ.get("PYTHONPATH", "")]
        )
    print(f"cores: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()[0]:.2f}")
    best: dict[str, Result] = {}
    serial_values: list[dict[str, str]] = []
    for round_ in range(args.repeats):
        for mode in [m for m in args.modes if m != "bare"] + (
            ["bare"] if "bare" in args.modes else []
        ):
            if mode == "bare":
                result = run_bare(serial_values, args.overrides, root)
            else:
                result, values = run_mode(mode, args.trials, args.overrides, args.stack, root)
                serial_values = values if mode == "serial" else serial_values
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
            if mode not in ("serial", "bare"):
                print(
                    f"{mode} / serial throughput: {serial.wall_s / r.wall_s:.2f}x (wall), "
                    f"{serial.sweep_s / r.sweep_s:.2f}x (sweep phase)"
                )
    if "bare" in best:
        print(f"serial / bare wall time: {best['serial'].wall_s / best['bare'].wall_s:.2f}x")


if __name__ == "__main__":
    main()
