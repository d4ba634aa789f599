"""Stacked models: parameters whose leading dims index models trained together (as
``torch.func.stack_module_state`` stacks them), and cutting an optimizer down to some of them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer


def keep_stacked(
    state: Mapping[torch.Tensor, dict[str, Any]], positions: torch.Tensor, models: int
) -> None:
    """Keep, in an optimizer's per-parameter ``state``, the slices ``positions`` (along dim 0)
    of every tensor stacked over ``models`` models: what an optimizer of stacked models keeps
    when the others leave the stack. Scalars (a step count) stay as they are."""
    for entry in state.values():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == models:
                entry[key] = value[positions]


def keep_models(optimizer: Optimizer, positions: torch.Tensor, models: int) -> None:
    """Cut ``optimizer`` (of ``models`` stacked models, its parameters already cut) to the
    models at ``positions``: through its own ``keep_models`` when it has one (GAO,
    StackedAdam, which hold per-model values beside their state), else ``keep_stacked`` of its
    state (torch's elementwise optimizers)."""
    keep = getattr(optimizer, "keep_models", None)
    if keep is not None:
        keep(positions, models)
    else:
        keep_stacked(optimizer.state, positions, models)


def stack_shape(params: Iterable[torch.Tensor], stack_dims: int) -> tuple[int, ...] | None:
    """The leading ``stack_dims`` dims all ``params`` share (the models' grid); None if there are
    no parameters. Raises ValueError naming the first parameter that does not have them."""
    shape = None
    for index, p in enumerate(params):
        lead = tuple(p.shape[:stack_dims])
        if p.dim() < stack_dims or (shape is not None and lead != shape):
            raise ValueError(
                f"parameter {index} of shape {tuple(p.shape)} does not fit stack_dims="
                f"{stack_dims}: every parameter needs >= {stack_dims} dims, the leading ones "
                f"equal to the first parameter's {shape or lead}"
            )
        shape = lead
    return shape
