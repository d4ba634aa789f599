"""What the pipeline costs around the arithmetic, side by side in one run.

1. One 25-epoch MLP trial (default config, Adam and GAO): bare ``fit`` on preloaded data vs
   ``run_experiment`` (data from the cache, model, optimizer, fit, MLflow run). Reports the
   ratio and the share of the run spent inside MLflow client calls, in a warm process (as every
   sweep trial after the first), plus the one-off cost of the first run in a process.
2. ``python train.py optimizer=gao -m`` (30 trials x 25 epochs) as a subprocess, its wall time
   split into process start-up, training (sum of epoch times), the rest of run_experiment, and
   Hydra/Optuna between trials (gaps between consecutive MLflow runs).

MLflow writes to a temporary SQLite store and Hydra to a temporary sweep dir; nothing lands in
mlruns/ or outputs/. Trial timings are the minimum over --repeats interleaved repetitions (other
processes on a 2-core machine only ever add time); the load average is printed for context.

    python benchmarks/bench_pipeline.py [--repeats 5] [--skip-sweep]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

from sweeps import run_sweeps

ROOT = Path(__file__).resolve().parents[1]


def compose(*overrides: str):
    from gradalign.report.configs import compose_config

    return compose_config(ROOT / "conf", overrides)


class MlflowTimer:
    """Accumulates the time spent inside MlflowClient's methods (patched for this benchmark)."""

    METHODS = ("create_run", "log_batch", "log_artifacts", "set_terminated", "search_runs")

    def __init__(self) -> None:
        from mlflow.tracking import MlflowClient

        self.seconds = 0.0
        for name in self.METHODS:
            setattr(MlflowClient, name, self._timed(getattr(MlflowClient, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def trial_overhead(repeats: int) -> None:
    import torch

    from gradalign.components import build_dataset, build_optimizer
    from gradalign.config import register_resolvers
    from gradalign.experiment import fit_as_configured, run_experiment, seeded_model
    from gradalign.training import Models

    register_resolvers(ROOT)
    timer = MlflowTimer()
    threads = compose().trainer.threads
    torch.set_num_threads(threads)  # as run_experiment does, so both sides run alike
    print(f"torch threads {threads}; 25 epochs, MLP [100, 100] residual, batch 100")
    print(f"{'optimizer':<10}{'bare fit':>10}{'run_exp':>10}{'ratio':>8}{'mlflow':>9}{'share':>8}")
    first_run = None
    for name in ("adam", "gao"):
        cfg = compose(f"optimizer={name}")
        splits = build_dataset(cfg)
        if first_run is None:  # the once-per-process cost: MLflow client, store, experiment
            start = time.perf_counter()
            run_experiment(cfg)
            first_run = time.perf_counter() - start
        bare, tracked, mlflow = [], [], []
        for _ in range(repeats):  # interleaved, so drifting machine load hits both alike
            start = time.perf_counter()
            model = seeded_model(cfg, splits)
            optimizer = build_optimizer(cfg, model.parameters())
            fit_as_configured([cfg], Models(model), optimizer, splits, "cpu")
            bare.append(time.perf_counter() - start)
            timer.seconds = 0.0
            start = time.perf_counter()
            run_experiment(cfg)
            tracked.append(time.perf_counter() - start)
            mlflow.append(timer.seconds)
        b, t, m = (min(x) for x in (bare, tracked, mlflow))
        print(f"{name:<10}{b:>9.3f}s{t:>9.3f}s{t / b:>7.2f}x{m * 1000:>7.0f}ms{m / t:>7.1%}")
    print(f"first run_experiment in a process: {first_run:.2f} s (MLflow client + store set-up)")


def sweep_wall_time() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sweep_dir = f"hydra.sweep.dir={tmp}/sweep"  # the only addition to the command
        command = [sys.executable, str(ROOT / "train.py"), "optimizer=gao", sweep_dir, "-m"]
        start, wall, client, runs = run_sweeps([command], Path(tmp))
        runs.sort(key=lambda run: run.info.start_time)
        histories = [client.get_metric_history(run.info.run_id, "epoch_time") for run in runs]
        epochs = sum(m.value for history in histories for m in history)
        in_runs = sum(run.info.end_time - run.info.start_time for run in runs) / 1000
        gaps = sum(b.info.start_time - a.info.end_time for a, b in itertools.pairwise(runs)) / 1000
        startup = runs[0].info.start_time / 1000 - start
        rest = wall - startup - in_runs - gaps
    n = len(runs)
    print(f"\n`python train.py optimizer=gao -m`: {n} trials, wall {wall:.1f} s (target <= 45 s)")
    print(f"  start-up to the first run    {startup:6.1f} s  (imports, Hydra, Optuna, MLflow)")
    print(f"  training (sum of epochs)     {epochs:6.1f} s  ({epochs / n:.2f} s per trial)")
    print(
        f"  rest of run_experiment       {in_runs - epochs:6.1f} s  "
        f"({(in_runs - epochs) / n * 1000:.0f} ms per trial: data, model, MLflow)"
    )
    print(
        f"  Hydra + Optuna between runs  {gaps:6.1f} s  ({gaps / max(n - 1, 1) * 1000:.0f} ms "
        "per trial)"
    )
    print(f"  after the last run           {rest:6.1f} s")
    print(f"  wall / training              {wall / epochs:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        trial_overhead(args.repeats)
        del os.environ["MLFLOW_TRACKING_URI"]
    if not args.skip_sweep:
        sweep_wall_time()
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
