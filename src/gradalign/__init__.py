"""gradalign: the Gradient Alignment Optimizer and the experiment pipeline around it."""

from gradalign.optim import GradientAlignmentOptimizer

__all__ = ["GradientAlignmentOptimizer"]
