"""Which configs can train as one stacked model, and the optimizer that gives each its own
hyperparameters.

Runs of a sweep differ in the values its sampler chose (``optimizer.lr``, ``optimizer.beta``),
a report's finals in their seeds. Runs can train stacked when their configs are equal but for
those: the seeds always (each model has its own initial weights and data order), and the
optimizer's values that a stacked optimizer takes per model: Adam's and AdamW's ``lr``, ``eps``
and ``weight_decay`` (``StackedAdam`` / ``StackedAdamW``), and, when GAO's base is one of them,
those of its base and GAO's ``beta``. Every other difference (a model width, a batch size,
SGD's momentum) keeps runs apart, because one stacked model has one architecture, one batch size
and one optimizer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from gradalign.optim import GradientAlignmentOptimizer, resolve_base

# The stacked optimizer that takes per-model values in place of each torch optimizer.
STACKED = {
    torch.optim.Adam: "gradalign.stacked_adam.StackedAdam",
    torch.optim.AdamW: "gradalign.stacked_adam.StackedAdamW",
}
BASE_KEYS = ("lr", "eps", "weight_decay")  # StackedAdam's per-model arguments
# GAO's: its base's and its beta (its cos_eps, the cosine's floor, is one for all).
GAO_KEYS = (*BASE_KEYS, "beta")
# Bookkeeping that differs between a sweep's trials and is no part of what they train.
BOOKKEEPING = ("tracking.optuna_trial", "tracking.run_id")  # set per trial by the sweep


def _stacked_base(optimizer: DictConfig) -> type[torch.optim.Optimizer] | None:
    """The torch optimizer a STACKED one replaces in ``optimizer`` (itself, or GAO's base)."""
    try:
        target = get_class(optimizer._target_)
        if issubclass(target, GradientAlignmentOptimizer):
            target = resolve_base(OmegaConf.select(optimizer, "base", default=None))
    except (ImportError, ValueError, TypeError, AttributeError):
        return None  # not buildable: the config check names the problem
    return target if target in STACKED else None


def per_model_keys(optimizer: DictConfig) -> tuple[str, ...]:
    """The keys of ``optimizer`` (a ``cfg.optimizer``) that stacked models may hold values of
    their own for; () when its models must share every value."""
    base = _stacked_base(optimizer)
    if base is None:
        return ()
    is_gao = issubclass(get_class(optimizer._target_), GradientAlignmentOptimizer)
    return GAO_KEYS if is_gao else BASE_KEYS


def stack_key(cfg: DictConfig) -> str:
    """``cfg`` without what stacked models may differ in (seeds, per-model optimizer values,
    bookkeeping), as text: runs with equal keys can train as one stacked model."""
    rest = OmegaConf.to_container(cfg, resolve=True)
    rest.pop("seed", None)
    for key in per_model_keys(cfg.optimizer):
        rest["optimizer"].pop(key, None)
    for dotted in BOOKKEEPING:
        node, _, leaf = dotted.rpartition(".")
        rest.get(node, {}).pop(leaf, None)
    return json.dumps(rest, sort_keys=True, default=str)


def varying_keys(optimizers: Sequence[DictConfig]) -> list[str]:
    """The keys whose values differ between ``optimizers`` (the stacked models' configs)."""
    specs = [OmegaConf.to_container(o, resolve=True) for o in optimizers]
    keys = sorted({k for spec in specs for k in spec})
    return [k for k in keys if len({json.dumps(s.get(k), default=str) for s in specs}) > 1]


def per_model_spec(optimizers: Sequence[DictConfig]) -> dict[str, Any]:
    """An optimizer node (for ``components.build``) over the stacked models of ``optimizers``
    (equal but for ``per_model_keys``): their differing values as one list each, and the
    STACKED optimizer in place of the torch one; raises ValueError for any other difference."""
    first = optimizers[0]
    allowed = per_model_keys(first)
    spec = OmegaConf.to_container(first, resolve=True)
    for key in varying_keys(optimizers):
        if key not in allowed:
            raise ValueError(
                f"optimizer.{key} differs between the stacked models, and only "
                f"{list(allowed) or 'none of its values'} may ({first.name!r})"
            )
        spec[key] = [o[key] for o in optimizers]
    stacked = STACKED[_stacked_base(first)]
    if issubclass(get_class(first._target_), GradientAlignmentOptimizer):
        spec["base"] = stacked
    else:
        spec["_target_"] = stacked
    return spec
