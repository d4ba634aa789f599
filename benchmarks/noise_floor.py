"""How far one configuration's objective moves under numerical differences alone, and under seeds:
the noise floor an effect between optimizers must clear before it means anything.

One configuration (GAO at the issue's trial, lr 2.0548e-3 and beta 0.94499, on the default
config: the residual MLP on mnist1d, 25 epochs, objective = last val loss, unless overrides say
otherwise) is trained, untracked, in this process:

- ``reference``: serially, 1 thread, full-batch evaluation, seed 0 (what a serial sweep's trial
  computes);
- ``2 threads``: the same with ``torch.set_num_threads(2)``;
- ``eval in batches``: the same with the val/test metrics evaluated in batches of each of
  ``--eval-batch`` (``trainer.eval_batch_size``: the mean of batch means). A size that divides
  the 800 validation samples (200) changes only the order of the sums; one that does not (256:
  three batches of 256 and one of 32) weighs the last batch's mean like the others', which is
  another estimator, not a rounding difference;
- ``stacked``: the same trained as model 0 of a stack of ``--stack`` models (the others at other
  learning rates, as a stacked sweep's trials are: ``parallel=stacked``);
- ``seed s``: serially, with seed.model = seed.data = s for each of ``--seeds`` (what a report's
  final runs vary).

Each numerical variant computes the same mathematics as the reference; only the order of
floating-point operations differs. The table gives each one's objective, its difference from the
reference, and the first epoch whose val loss differs from the reference's by more than 1e-6
(training is chaotic: differences of one rounding grow); the seeds' rows give their spread.

    python benchmarks/noise_floor.py [--seeds 1 2 3 4] [--stack 4] [--eval-batch 200 256]
                                     [-- overrides]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from gradalign.components import build_dataset, build_optimizer
from gradalign.config import register_resolvers
from gradalign.experiment import fit_as_configured, seeded_model, stack_and_optimizer
from gradalign.report.configs import compose_config, seeded
from gradalign.schema import Metric
from gradalign.training import History, Models

ROOT = Path(__file__).resolve().parents[1]
# The trial the issue measured serially and stacked (#28): GAO's best of a default sweep.
CONFIGURATION = (
    "optimizer=gao",
    "optimizer.lr=0.002054762512591136",
    "optimizer.beta=0.9449947273902578",
)
# The learning rates of the other models of a stack, as multiples of the configuration's.
STACK_LR_FACTORS = (0.5, 2.0, 4.0, 0.25, 8.0, 0.125)
DIFFERS = 1e-6  # a val loss "differs" from the reference's beyond this


def serial(cfg: DictConfig, threads: int = 1) -> History:
    """``cfg`` trained alone, untracked, with ``threads`` intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        splits = build_dataset(cfg)
        model = seeded_model(cfg, splits)
        optimizer = build_optimizer(cfg, model.parameters())
        return fit_as_configured([cfg], Models(model), optimizer, splits, "cpu")[0]
    finally:
        torch.set_num_threads(before)


def stacked(cfg: DictConfig, size: int) -> History:
    """``cfg`` trained as model 0 of a stack of ``size`` models, the others at other lrs."""
    torch.set_num_threads(1)
    cfgs = [cfg]
    for factor in STACK_LR_FACTORS[: size - 1]:
        other = cfg.copy()
        other.optimizer.lr = cfg.optimizer.lr * factor
        cfgs.append(other)
    splits = build_dataset(cfg)
    models = [seeded_model(one, splits) for one in cfgs]
    stack, optimizer = stack_and_optimizer(cfgs, models, splits, "cpu")
    return fit_as_configured(cfgs, stack, optimizer, splits, "cpu")[0]


def first_difference(history: History, reference: History) -> str:
    """The first epoch whose val loss differs from the reference's by more than DIFFERS."""
    for mine, theirs in zip(history.epochs, reference.epochs, strict=True):
        if abs(mine[Metric.VAL_LOSS] - theirs[Metric.VAL_LOSS]) > DIFFERS:
            return str(mine.epoch)
    return "none"


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--stack", type=int, default=4, choices=range(2, 8))
    parser.add_argument("--eval-batch", type=int, nargs="+", default=[200, 256])
    parser.add_argument("overrides", nargs="*", help="after --: overrides of the configuration")
    args = parser.parse_args(argv)
    register_resolvers(ROOT)
    overrides = [*CONFIGURATION, *args.overrides]
    cfg = compose_config(
        ROOT / "conf", [*overrides, f"paths.data_cache={ROOT / '.cache' / 'data'}"]
    )
    build_dataset(cfg)  # generated (cached) before the first timing
    kind = cfg.objective
    print(
        f"configuration: {' '.join(overrides)}; {cfg.trainer.epochs} epochs, "
        f"objective {kind} val loss, seed 0 unless said"
    )

    started = time.perf_counter()
    reference = serial(cfg)
    validation = len(build_dataset(cfg).x_val)
    numerical = {  # the same mathematics, only the order of floating-point operations differs
        "2 threads (vs 1)": serial(cfg, threads=2),
        f"stacked, model 0 of {args.stack} (vs serial)": stacked(cfg, args.stack),
    }
    estimators = {}  # an evaluation batch that leaves a smaller last batch: another estimator
    for size in args.eval_batch:
        history = serial(_with(cfg, "trainer.eval_batch_size", size))
        last = validation % size
        if last:
            label = f"eval in batches of {size}, the last of {last} (vs full batch)"
            estimators[f"{label}: mean of batch means, another estimator"] = history
        else:
            numerical[f"eval in batches of {size}, dividing {validation} (vs full batch)"] = history
    seeds = {seed: serial(seeded(cfg, seed)) for seed in args.seeds}
    outcomes = {
        f"objective ({kind} val loss)": lambda h: h.objective(kind),
        "min val loss": lambda h: h.best_val_loss,
    }
    header = ["variant"]
    for outcome in outcomes:
        header += [outcome, "difference"]
    rows = [["reference: serial, 1 thread, full-batch eval"]]
    for value in outcomes.values():
        rows[0] += [f"{value(reference):.6f}", ""]
    for name, history in {**numerical, **estimators, **seeds}.items():
        row = [name if isinstance(name, str) else f"seed {name} (vs seed 0)"]
        for value in outcomes.values():
            difference = value(history) - value(reference)
            row += [f"{value(history):.6f}", f"{difference:+.2e}" if difference else "0"]
        rows.append([*row, first_difference(history, reference) if isinstance(name, str) else ""])
    rows[0].append("")
    print(table(rows, [*header, "first epoch differing > 1e-6"]))
    for outcome, value in outcomes.items():
        largest = max(abs(value(h) - value(reference)) for h in numerical.values())
        values = [value(reference), *(value(h) for h in seeds.values())]
        print(
            f"{outcome}: numerical differences alone move it by up to {largest:.4f}; seeds "
            f"0,{','.join(map(str, args.seeds))}: mean {statistics.mean(values):.4f}, "
            f"std {statistics.stdev(values):.4f}, range {max(values) - min(values):.4f}"
        )
    print(f"{time.perf_counter() - started:.0f} s")


def _with(cfg: DictConfig, key: str, value: object) -> DictConfig:
    """A copy of ``cfg`` with ``key`` (dotted) set to ``value``."""
    copy = cfg.copy()
    section, name = key.rsplit(".", 1)
    copy[section][name] = value
    return copy


if __name__ == "__main__":
    main()
