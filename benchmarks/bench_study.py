"""A whole study with serial and with stacked sweeps, side by side, and for the research note's
study also as the note's kind of script runs it.

- ``note script``: what the note's script did (one process, torch's default thread count, no
  tracking): an Optuna TPE study per optimizer (Adam's lr; GAO's lr and beta), each trial a
  plain MLP from the same initial weights, fed as light-dataloader's ``TensorDataLoader``
  (``shuffle=True``) feeds it (``tensor_batches``: one permutation of the in-memory tensors per
  epoch, then slices of it; the same steps, without the package), the minimum val loss (on
  mnist1d's test split, in batches) as objective; then each optimizer's best config
  retrained. Its settings (trials, epochs, widths, batch sizes, search ranges) are the
  seed_note preset's (conf/study/seed_note.yaml, conf/experiment/seed_note.yaml:
  30 trials of 25 epochs, 40-128-128-10, batch 64, evaluation in batches of 256, 100-epoch
  finals), so both sides do the same work. The data come from the pipeline's cache, so no
  variant pays for generating them.
  Only with ``--preset seed_note`` (the default).
- ``serial`` / ``stacked``: ``python study.py --preset PRESET --parallel serial|stacked`` (the
  same work, tracked in MLflow, both sweeps at once on the two cores, the finals, the report
  with its plots), each into a fresh store and outputs folder.

The variants alternate within every round and the minimum wall time over the rounds is kept
(other processes only ever add time). Work is counted in epochs trained (the note script counts
its own; the studies' are read from their MLflow runs; in seed_note all epochs are the same
size), so the ratios are per unit of work.

    python benchmarks/bench_study.py [--rounds 1] [--preset seed_note]
        [--variants note serial stacked]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from gradalign.schema import Metric, Stage

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("note", "serial", "stacked")


def note_script() -> int:
    """The note's study as a plain script; the epochs it trained."""
    import optuna
    import torch
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf
    from torch import nn

    from gradalign import GradientAlignmentOptimizer
    from gradalign.components import build_dataset
    from gradalign.config import register_resolvers
    from gradalign.report.configs import compose_config

    register_resolvers(ROOT)  # torch's default thread count, as the note's script ran
    cfg = compose_config(ROOT / "conf", ["experiment=seed_note"])
    preset = OmegaConf.load(ROOT / "conf" / "study" / "seed_note.yaml")
    parser = OverridesParser.create()
    ranges = {k: parser.parse_override(f"{k}={v}").value() for k, v in cfg.search.items()}
    splits = build_dataset(cfg)
    batch, eval_batch = cfg.trainer.batch_size, cfg.trainer.eval_batch_size
    widths = [math.prod(splits.input_shape), *cfg.model.hidden, splits.n_classes]
    epochs_trained = 0

    def model() -> nn.Module:
        torch.manual_seed(cfg.seed.model)
        layers: list[nn.Module] = []
        for n_in, n_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        return nn.Sequential(*layers[:-1])

    def suggest(trial: optuna.Trial, key: str) -> float:
        found = ranges[key]
        return trial.suggest_float(key, found.start, found.end, log="log" in found.tags)

    def run(name: str, params: dict, epochs: int) -> float:
        nonlocal epochs_trained
        net = model()
        adam = torch.optim.Adam(net.parameters(), lr=params["lr"])
        opt = adam if name == "adam" else GradientAlignmentOptimizer(adam, beta=params["beta"])
        best = math.inf
        for _ in range(epochs):
            net.train()
            for x, y in tensor_batches(splits.x_train, splits.y_train, batch):
                opt.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
            epochs_trained += 1
            net.eval()
            with torch.no_grad():
                losses = [
                    nn.functional.cross_entropy(net(x), y).item()
                    for x, y in zip(
                        splits.x_val.split(eval_batch), splits.y_val.split(eval_batch), strict=True
                    )
                ]
            best = min(best, sum(losses) / len(losses))
        return best

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("adam", "gao"):

        def objective(trial: optuna.Trial, name: str = name) -> float:
            params = {"lr": suggest(trial, "lr")}
            if name == "gao":
                params["beta"] = suggest(trial, "beta")
            return run(name, params, cfg.trainer.epochs)

        study = optuna.create_study()
        study.optimize(objective, n_trials=preset.trials)
        run(name, study.best_params, preset.report.final_epochs)
    return epochs_trained


def tensor_batches(x, y, size):
    """The batches light-dataloader's ``TensorDataLoader((x, y), size, shuffle=True)`` yields
    in an epoch: both tensors reordered by one random permutation, then split into ``size``
    rows each."""
    import torch

    order = torch.randperm(len(y))
    xs, ys = x.index_select(0, order).split(size), y.index_select(0, order).split(size)
    yield from zip(xs, ys, strict=True)


def study_command(preset: str, parallel: str, tmp: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "study.py"),
        "--preset",
        preset,
        "--parallel",
        parallel,
        "--name",
        f"bench-{parallel}",
        "--",
        f"paths.outputs={tmp / 'outputs'}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
    ]


def study_epochs(tmp: Path) -> int:
    """Epochs trained by the study's sweep trials and final runs (every experiment of its
    store)."""
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = [
        run
        for stage in (Stage.SWEEP, Stage.FINAL)
        for run in client.search_runs(experiments, f"tags.stage = '{stage}'", max_results=10_000)
    ]
    return sum(len(client.get_metric_history(r.info.run_id, Metric.VAL_LOSS)) for r in runs)


def measure(variant: str, preset: str) -> tuple[float, int]:
    """(wall seconds, epochs trained) of one run of ``variant``."""
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        start = time.perf_counter()
        if variant == "note":
            out = subprocess.run(
                [sys.executable, __file__, "--note-child"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            return time.perf_counter() - start, int(out.split()[-1])
        subprocess.run(study_command(preset, variant, tmp), check=True, capture_output=True)
        return time.perf_counter() - start, study_epochs(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--preset", default="seed_note", help="conf/study/<name>.yaml")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--note-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.note_child:
        print(note_script())
        return
    if "note" in args.variants and args.preset != "seed_note":
        parser.error("the note script is the seed_note study: --variants serial stacked")
    print(f"cores: {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.2f}")
    best: dict[str, tuple[float, int]] = {}
    for round_ in range(args.rounds):
        for variant in args.variants:
            seconds, epochs = measure(variant, args.preset)
            print(f"round {round_ + 1}: {variant:8s}{seconds:8.1f} s, {epochs} epochs", flush=True)
            if variant not in best or seconds < best[variant][0]:
                best[variant] = (seconds, epochs)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    print("| variant | wall | epochs | epochs/s | per epoch vs note script | vs serial |")
    print("|---|---|---|---|---|---|")
    rates = {variant: epochs / seconds for variant, (seconds, epochs) in best.items()}
    for variant, (seconds, epochs) in best.items():
        note = f"{rates[variant] / rates['note']:.2f}x" if "note" in rates else "-"
        serial = f"{seconds / best['serial'][0]:.2f}x wall" if "serial" in best else "-"
        print(
            f"| {variant} | {seconds:.1f} s | {epochs} | {rates[variant]:.2f} | {note} | {serial} |"
        )


if __name__ == "__main__":
    main()
