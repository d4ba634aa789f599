"""The Gradient Alignment Optimizer (GAO): a wrapper that scales each step of a base optimizer.

Per step, for every parameter tensor ``p`` with gradient ``g`` (the research note's semantics)::

    m <- beta * m + (1 - beta) * g          # EMA of the gradient, starts at zero
    s <- clamp(cos(g, m), min_scale, 1)     # s = 0 when a norm is zero
    g <- s * g                              # target="grad": then the base optimizer steps

With ``target="update"`` the gradient reaches the base optimizer untouched and the parameter change
it makes is scaled by ``s`` instead. Adam is invariant to a constant rescaling of its gradient, so
``target="grad"`` only acts through the variation of ``s`` over time, while ``target="update"`` is
the per-tensor learning-rate modulation the note's hypothesis describes; both exist so a study can
tell which one helps.

The package imports torch only, so it can be dropped into any PyTorch project:

- ``optimizer``: ``GradientAlignmentOptimizer``, the ``torch.optim.Optimizer`` (state, state
  dict, hooks, the step);
- ``functional``: the step's arithmetic on lists of tensors;
- ``reference``: ``ReferenceGAO``, GAO written plainly: the definition the optimizer is tested
  against (complex tensors read as real views, non-finite gradient elements read as 0);
- ``sharding``: FSDP2 (DTensor) parameters; ``stacking``: stacked models (the pipeline's
  stacked sweeps cut an optimizer's state with it).
"""

from gradalign.optim.optimizer import (
    GRANULARITIES,
    TARGETS,
    GradientAlignmentOptimizer,
    resolve_base,
)

__all__ = [
    "GRANULARITIES",
    "TARGETS",
    "GradientAlignmentOptimizer",
    "resolve_base",
]
