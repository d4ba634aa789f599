"""The report's figure: per-epoch curves of the final runs, mean over seeds with a 95% band.

The band is the 95% confidence interval of the mean over seeds (t-interval,
mean +- t_{0.975, n-1} * sd / sqrt(n)), so two optimizers whose bands do not overlap differ by
more than seed noise; with one seed there is no band. Drawn on a bare matplotlib Figure (no
pyplot state, no display needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import stats

from gradalign.schema import Metric

Curves = Mapping[str, Sequence[float]]  # metric key -> value per epoch (epoch 1 first)
BAND = "95% CI of the mean over seeds"


def band(rows: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(epochs, mean, low, high) over ``rows`` (one per seed; shorter rows end early).

    At each epoch only the seeds that reached it count; where fewer than 2 did, low = high = mean.
    """
    length = max(len(row) for row in rows)
    table = np.full((len(rows), length), np.nan)
    for i, row in enumerate(rows):
        table[i, : len(row)] = row
    n = np.sum(~np.isnan(table), axis=0)  # >= 1 at every epoch
    mean = np.nanmean(table, axis=0)
    dof = np.maximum(n - 1, 1)
    sd = np.sqrt(np.nansum((table - mean) ** 2, axis=0) / dof)
    half = np.where(n > 1, stats.t.ppf(0.975, dof) * sd / np.sqrt(n), 0.0)
    return np.arange(1, length + 1), mean, mean - half, mean + half


def panel(
    ax: Axes, runs: Mapping[str, Sequence[Curves]], key: str, title: str, log: bool = False
) -> None:
    """Mean and band per optimizer; with ``log``, both of the log values (a geometric mean), on a
    log axis where a linear band could reach below zero."""
    for optimizer, per_seed in runs.items():
        rows = [curves[key] for curves in per_seed]
        if log:
            epochs, *stats_ = band([np.log(row) for row in rows])
            mean, low, high = np.exp(stats_)
            ax.set_yscale("log")
        else:
            epochs, mean, low, high = band(rows)
        (line,) = ax.plot(epochs, mean, label=optimizer)
        ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.25, linewidth=0)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend()


def _alignment_panel(
    ax: Axes, runs: Mapping[str, Sequence[Curves]], colors: Mapping[str, str]
) -> None:
    """Per optimizer with alignment traces: one thin line per parameter tensor (mean over seeds)
    and a thick line for their mean."""
    ax.set_title("GAO alignment scale s (thin: per parameter tensor)")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    drawn = False
    for optimizer, per_seed in runs.items():
        keys = sorted(k for k in per_seed[0] if k.startswith(Metric.ALIGNMENT_PREFIX))
        if not keys:
            continue
        layers = [band([curves[key] for curves in per_seed]) for key in keys]
        for epochs, mean, _, _ in layers:
            ax.plot(epochs, mean, color=colors[optimizer], alpha=0.35, linewidth=0.8)
        length = min(len(mean) for _, mean, _, _ in layers)
        overall = np.mean([mean[:length] for _, mean, _, _ in layers], axis=0)
        ax.plot(
            np.arange(1, length + 1), overall, color=colors[optimizer], linewidth=2, label=optimizer
        )
        drawn = True
    if drawn:
        ax.legend()
    else:
        ax.text(
            0.5,
            0.5,
            "no GAO optimizer in this comparison",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )


def plot_convergence(runs: Mapping[str, Sequence[Curves]], path: Path, *, title: str) -> Path:
    """Write the 2x2 figure (val loss, train loss (log scale), val accuracy, GAO alignment) of
    ``runs`` (optimizer -> curves of its final runs, one per seed) to ``path``."""
    fig = Figure(figsize=(11, 7.5))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.9, wspace=0.2, hspace=0.3)
    (val_loss, train_loss), (val_acc, alignment) = fig.subplots(2, 2)
    panel(val_loss, runs, Metric.VAL_LOSS, f"val loss (band: {BAND})")
    panel(
        train_loss,
        runs,
        Metric.TRAIN_LOSS,
        "train loss (geometric mean, band in log space)",
        log=True,
    )
    panel(val_acc, runs, Metric.VAL_ACC, "val accuracy")
    colors = {name: line.get_color() for name, line in zip(runs, val_loss.get_lines(), strict=True)}
    _alignment_panel(alignment, runs, colors)
    for ax in (val_loss, train_loss, val_acc, alignment):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.savefig(path, dpi=90)
    return path
