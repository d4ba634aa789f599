"""A one-line epoch progress display for interactive terminals, silent in logs and CI."""

from __future__ import annotations

import sys
from typing import TextIO

from gradalign.schema import Metric
from gradalign.training import EpochMetrics


class EpochProgress:
    """Rewrites one stderr line per epoch: ``label  epoch 7/25 [=====     ]  val_loss 1.234``.

    Enabled only when the stream is a terminal, so Hydra's log files and CI output stay clean;
    ``close`` erases the line, leaving the terminal as it was.
    """

    def __init__(self, label: str, epochs: int, stream: TextIO | None = None, width: int = 20):
        self.label = label
        self.epochs = epochs
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.enabled = self.stream.isatty()

    def update(self, metrics: EpochMetrics) -> None:
        """Show the epoch just completed and its validation loss."""
        if not self.enabled:
            return
        done = self.width * metrics.epoch // self.epochs
        bar = "=" * done + " " * (self.width - done)
        self.stream.write(
            f"\r{self.label}  epoch {metrics.epoch}/{self.epochs} [{bar}]"
            f"  val_loss {metrics[Metric.VAL_LOSS]:.4f}\x1b[K"
        )
        self.stream.flush()

    def close(self) -> None:
        """Erase the line."""
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
