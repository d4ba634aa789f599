"""gradalign: the Gradient Alignment Optimizer and the experiment pipeline around it.

``from gradalign import GradientAlignmentOptimizer`` imports torch; ``import gradalign`` alone,
which every pipeline module does first, imports nothing, so the entry points answer ``--help``
and refuse a bad setting before torch is loaded.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["GradientAlignmentOptimizer"]


def __getattr__(name: str) -> Any:
    if name == "GradientAlignmentOptimizer":
        from gradalign.optim import GradientAlignmentOptimizer

        return GradientAlignmentOptimizer
    raise AttributeError(f"module 'gradalign' has no attribute {name!r}")
