"""Adam and AdamW over stacked parameters, with hyperparameters of their own for every model.

A stacked parameter of shape (K, *shape) holds K models' tensors (``torch.func.
stack_module_state``). ``torch.optim.Adam`` over it steps each model as Adam alone would, but
with one learning rate for all: its ``lr`` may be a tensor, never one value per slice. A sweep
that trains K trials as one stacked model needs exactly that, so this optimizer takes ``lr``,
``betas``, ``eps`` and ``weight_decay`` either as one value or as K values, and steps model k as
``torch.optim.Adam`` (or AdamW, ``decoupled=True``) with model k's values would: the same update
formula, in the same order of operations, so the results agree to float rounding. Only torch is
imported here (and gradalign.optim, which is torch only too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from gradalign.optim.stacking import keep_stacked

PerModel = float | Sequence[float]
_HYPERPARAMETERS = ("lr", "beta1", "beta2", "eps", "weight_decay")


def _per_model(name: str, value: PerModel, models: int, low: float, high: float) -> list[float]:
    """``value`` as ``models`` floats, each checked to lie in [low, high)."""
    values = (
        [float(value)] * models if isinstance(value, int | float) else [float(v) for v in value]
    )
    if len(values) != models:
        raise ValueError(f"{name} has {len(values)} values for {models} stacked models")
    for v in values:
        if not low <= v < high:
            raise ValueError(f"{name}={v!r} is outside the allowed range [{low}, {high})")
    return values


class StackedAdam(Optimizer):
    """Adam (``decoupled=False``) or AdamW (``decoupled=True``) over parameters whose dim 0
    indexes K models, each with its own ``lr``, ``betas``, ``eps`` and ``weight_decay`` (one
    value for all, or a sequence of K). ``per_model[name]`` holds the K values of each as a
    float64 tensor on the CPU (set at construction, by ``load_state_dict`` and by
    ``keep_models``; ``step`` keeps copies of them on the parameters' device)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: PerModel = 1e-3,
        betas: tuple[PerModel, PerModel] = (0.9, 0.999),
        eps: PerModel = 1e-8,
        weight_decay: PerModel = 0.0,
        *,
        decoupled: bool = False,
    ) -> None:
        params = list(params)
        if not params:
            raise ValueError("StackedAdam got no parameters")
        models = params[0].shape[0] if params[0].dim() else 0
        for index, p in enumerate(params):
            if p.dim() == 0 or p.shape[0] != models:
                raise ValueError(
                    f"parameter {index} of shape {tuple(p.shape)} is not stacked like parameter "
                    f"0 (dim 0 = {models} models)"
                )
        values = {
            "lr": _per_model("lr", lr, models, 0.0, float("inf")),
            "beta1": _per_model("betas[0]", betas[0], models, 0.0, 1.0),
            "beta2": _per_model("betas[1]", betas[1], models, 0.0, 1.0),
            "eps": _per_model("eps", eps, models, 0.0, float("inf")),
            "weight_decay": _per_model("weight_decay", weight_decay, models, 0.0, float("inf")),
        }
        self.models = models
        self.decoupled = decoupled
        self._set_per_model({k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()})
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )

    def _set_per_model(self, per_model: dict[str, torch.Tensor]) -> None:
        self.per_model = per_model
        self._decays = bool(per_model["weight_decay"].any())
        self._views: dict[tuple, dict[str, Any]] = {}  # _per_model_views, by device/dtype/rank

    def __repr__(self) -> str:
        kind = "AdamW" if self.decoupled else "Adam"
        values = {k: v.tolist() for k, v in self.per_model.items()}
        return f"StackedAdam({kind}, {self.models} models, {values})"

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Adam step of every model, each with its own hyperparameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                self._update(p, state, int(state["step"].item()))
        return loss

    def _per_model_views(self, p: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """The per-model values ``p``'s update needs, as (K, 1, ...) tensors of ``p``'s device,
        dtype and rank: made once (the step's bias corrections once per step), so a step costs
        no host-to-device copy per parameter."""
        key = (p.device, p.dtype, p.dim())
        shape = (self.models,) + (1,) * (p.dim() - 1)
        h = self.per_model
        views = self._views.get(key)
        if views is None:
            values = {
                "decay": 1 - h["lr"] * h["weight_decay"],
                "weight_decay": h["weight_decay"],
                "ema_weight": 1 - h["beta1"],
                "beta2": h["beta2"],
                "sq_weight": 1 - h["beta2"],
                "eps": h["eps"],
            }
            views = {k: v.to(device=p.device, dtype=p.dtype).view(shape) for k, v in values.items()}
            self._views[key] = views
        if views.get("step") != step:
            # torch.optim.Adam's scalars, in float64 as its Python floats are, one per model
            step_size = h["lr"] / (1 - h["beta1"] ** step)
            bias_correction2_sqrt = (1 - h["beta2"] ** step).sqrt()
            views["step"] = step
            views["neg_step_size"] = (-step_size).to(device=p.device, dtype=p.dtype).view(shape)
            views["bias_correction2_sqrt"] = bias_correction2_sqrt.to(
                device=p.device, dtype=p.dtype
            ).view(shape)
        return views

    def _update(self, p: torch.Tensor, state: dict[str, Any], step: int) -> None:
        """torch.optim.Adam's single-tensor update of ``p``, with per-model (K,) scalars."""
        v = self._per_model_views(p, step)
        grad = p.grad
        if self.decoupled:
            p.mul_(v["decay"])
        elif self._decays:
            grad = grad.addcmul(p, v["weight_decay"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, v["ema_weight"])
        exp_avg_sq.mul_(v["beta2"]).addcmul_(grad, grad * v["sq_weight"])
        denom = (exp_avg_sq.sqrt() / v["bias_correction2_sqrt"]).add_(v["eps"])
        p.addcmul_(exp_avg / denom, v["neg_step_size"])

    def keep_models(self, positions: torch.Tensor, models: int) -> None:
        """After the parameters were cut to the models at ``positions`` (of ``models``): keep
        their hyperparameters and state, drop the rest."""
        self._set_per_model({k: v[positions] for k, v in self.per_model.items()})
        self.models = len(positions)
        keep_stacked(self.state, positions, models)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer's state dict, with the per-model hyperparameters."""
        return {
            **super().state_dict(),
            "per_model": {k: v.clone() for k, v in self.per_model.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state and the per-model hyperparameters of ``state_dict``."""
        state_dict = dict(state_dict)
        per_model = state_dict.pop("per_model")
        if set(per_model) != set(_HYPERPARAMETERS):
            raise ValueError(f"per_model has {sorted(per_model)}, not {sorted(_HYPERPARAMETERS)}")
        super().load_state_dict(state_dict)
        self._set_per_model(
            {k: torch.as_tensor(v, dtype=torch.float64).clone() for k, v in per_model.items()}
        )
        self.models = len(self.per_model["lr"])


class StackedAdamW(StackedAdam):
    """StackedAdam with decoupled weight decay, as ``torch.optim.AdamW`` (whose default weight
    decay, 1e-2, it shares)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: PerModel = 1e-3,
        betas: tuple[PerModel, PerModel] = (0.9, 0.999),
        eps: PerModel = 1e-8,
        weight_decay: PerModel = 1e-2,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, decoupled=True)
