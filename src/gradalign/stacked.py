"""K models of one configuration as one stacked model, which the epoch engine
(``training.fit_models``) trains each as ``training.fit`` would train it alone.

The models are tiny, so a step's time goes to per-kernel call overhead, not arithmetic: K models
whose parameters are stacked along a new leading dim (``torch.func.stack_module_state``) and run
through ``torch.func.vmap`` of ``functional_call`` (PyTorch's ensembling pattern) make one call
per kernel for all K. Each model keeps its own initial weights and its own data order, and an
elementwise optimizer (Adam, AdamW, SGD, RMSprop, or GAO with ``stack_dims=1`` around one) over
the stacked tensors steps each model exactly as it would alone, so the K histories mean what K
``fit`` calls would return (equal up to float rounding: batched kernels reduce in another order).
The models' optimizer values may differ too (``StackedAdam``, GAO's per-model ``beta``: a
sweep's trials). A model that diverges or is stopped (a pruned trial) leaves the stack, so the
others go on without computing it.

Not every model stacks: ``model_refusal`` says why one does not (buffers, random draws in
training, an op vmap cannot batch or would only loop over), and callers then train one by one.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from gradalign.optim import GradientAlignmentOptimizer
from gradalign.optim.stacking import keep_models
from gradalign.stacked_adam import StackedAdam, StackedAdamW
from gradalign.training import Models, batch_metrics, cross_entropy

# Optimizers whose update of an element depends on that element's own history only, so one
# instance over stacked tensors is K independent instances (with shared hyperparameters, or,
# for StackedAdam, each model's own).
ELEMENTWISE = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.SGD,
    torch.optim.RMSprop,
    StackedAdam,
    StackedAdamW,
)
_PROBE_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


class NotStackable(Exception):
    """Models or an optimizer that cannot train stacked; the message says why."""


class Stack(Models):
    """K models of one architecture as one, for the epoch engine (``training.fit_models``):
    ``params`` maps each parameter name to a leaf tensor of shape (K, *shape) (model k's tensor
    at index k), and ``logits`` runs all K.

    ``keep`` cuts the stack to some of its models (those still training): ``active`` lists the
    models (positions in ``models``) its tensors hold, in order."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        self.models = list(models)
        self.active = list(range(len(self.models)))
        self.params, self.buffers = stack_module_state(self.models)
        self._base = copy.deepcopy(self.models[0]).to("meta")  # the architecture, no weights

    def train(self, mode: bool = True) -> None:
        self._base.train(mode)

    def _call(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self._base, (params, buffers), (x,))

    def logits(self, x: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """Every model's logits, (K, N, ...): of its own inputs x[k], or of x for all when
        ``shared``."""
        return vmap(self._call, in_dims=(0, 0, None if shared else 0))(self.params, self.buffers, x)

    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def one(params: dict, buffers: dict) -> torch.Tensor:
            return batch_metrics(self._call(params, buffers, x), y)

        return vmap(one)(self.params, self.buffers)

    def backward(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        def one(params: dict, buffers: dict, xk: torch.Tensor, yk: torch.Tensor) -> torch.Tensor:
            return cross_entropy(self._call(params, buffers, xk), yk)

        loss = vmap(one)(self.params, self.buffers, x[idx], y[idx])
        loss.sum().backward()  # model k's parameters get the gradient of its own loss only
        return loss.detach()

    @torch.no_grad()
    def unstack(self) -> None:
        """Copy the stacked tensors back into the active models (their trained weights)."""
        for name, tensor in self.params.items():
            for k, value in zip(self.active, tensor.unbind(0), strict=True):
                self.models[k].get_parameter(name).copy_(value)

    @torch.no_grad()
    def keep(self, kept: Sequence[int], optimizer: torch.optim.Optimizer) -> None:
        """Go on with the models ``kept`` (of ``active``) only: the others get their weights
        back (``unstack``); the stacked tensors are replaced by their kept slices, in
        ``optimizer`` too, whose state is cut the same way."""
        self.unstack()
        positions = torch.tensor([self.active.index(k) for k in kept])
        models = len(self.active)
        replaced = {}
        for name, tensor in self.params.items():
            cut = tensor.detach()[positions.to(tensor.device)].requires_grad_(tensor.requires_grad)
            replaced[tensor] = self.params[name] = cut
        for group in optimizer.param_groups:
            group["params"] = [replaced.get(p, p) for p in group["params"]]
        state = optimizer.state
        for old, new in replaced.items():
            if old in state:
                state[new] = state.pop(old)
        keep_models(optimizer, positions, models)
        self.active = list(kept)


def model_refusal(models: Sequence[nn.Module], x: torch.Tensor) -> str | None:
    """Why ``models`` cannot train stacked (None: they can), found by running them stacked on
    the examples ``x`` in training mode and comparing with each model's own output."""
    if not models:
        return "there are no models"
    shapes = [[(n, p.shape) for n, p in m.named_parameters()] for m in models]
    if len({type(m) for m in models}) > 1 or any(s != shapes[0] for s in shapes):
        return "the models differ in architecture"
    buffers = [name for name, _ in models[0].named_buffers()]
    if buffers:
        return f"it has buffers ({', '.join(buffers)}) that training may update per model"
    stack = Stack(models)
    stack.train()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:
            together = stack.logits(x, shared=True)
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as error:
            return f"torch.func.vmap cannot run it: {_first_line(error)}"
    looped = [w for w in caught if "batching rule" in str(w.message)]
    if looped:
        return f"vmap would loop over the models: {_first_line(looped[0].message)}"
    with torch.no_grad():
        alone = torch.stack([model(x) for model in models])
    if not torch.allclose(together, alone, **_PROBE_TOLERANCE):
        return "its stacked outputs differ from the models' own"
    return None


def optimizer_refusal(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer`` over stacked tensors would not step each model as alone (None: it
    does): it must be elementwise, or GAO with ``stack_dims=1`` around an elementwise base."""
    inner = optimizer
    if isinstance(optimizer, GradientAlignmentOptimizer):
        if optimizer.stack_dims != 1:
            return f"GAO has stack_dims={optimizer.stack_dims}, not 1: its cosines would mix models"
        inner = optimizer.base
    if type(inner) not in ELEMENTWISE:
        allowed = ", ".join(cls.__name__ for cls in ELEMENTWISE)
        return f"{type(inner).__name__} is not known to be elementwise (stacking needs {allowed})"
    return None


def _first_line(error: Any) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
