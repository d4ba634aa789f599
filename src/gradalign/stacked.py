"""Training K models of one configuration as one stacked model, each as ``training.fit`` would.

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
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from gradalign.checks import positive_int
from gradalign.data import Splits
from gradalign.optim import GradientAlignmentOptimizer, keep_models
from gradalign.stacked_adam import StackedAdam, StackedAdamW
from gradalign.training import (
    EpochMetrics,
    History,
    LossFn,
    ScaleMean,
    epoch_outcome,
    loss_function,
)

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


class Stack:
    """K models of one architecture as one: ``params`` maps each parameter name to a leaf
    tensor of shape (K, *shape) (model k's tensor at index k), and ``logits`` runs all K.

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

    def metrics(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        """(K, 2): every model's [mean loss, accuracy] on the shared batch (x, y)."""

        def one(params: dict, buffers: dict) -> torch.Tensor:
            logits = self._call(params, buffers, x)
            loss = loss_fn(logits, y)
            accuracy = (logits.argmax(dim=-1) == y).to(loss.dtype).mean()
            return torch.stack([loss, accuracy])

        return vmap(one)(self.params, self.buffers)

    def losses(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        """(K,): model k's mean loss on its own batch (x[k], y[k])."""

        def one(params: dict, buffers: dict, xk: torch.Tensor, yk: torch.Tensor) -> torch.Tensor:
            return loss_fn(self._call(params, buffers, xk), yk)

        return vmap(one)(self.params, self.buffers, x, y)

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


def fit_stacked(
    stack: Stack,
    optimizer: torch.optim.Optimizer,
    splits: Splits,
    *,
    epochs: int,
    batch_size: int,
    data_seeds: Sequence[int],
    device: torch.device | str,
    eval_batch_size: int | None = None,
    on_epoch: Callable[[int, EpochMetrics], None] | None = None,
    should_stop: Sequence[Callable[[History], bool] | None] | None = None,
) -> list[History]:
    """Train the stacked models with ``optimizer`` (over ``stack.params``) and return each
    model's history, as ``training.fit`` of that model with ``data_seed=data_seeds[k]`` and
    ``should_stop=should_stop[k]`` would.

    Model k's batches follow its own ``torch.randperm`` from a CPU generator seeded with
    ``data_seeds[k]``; losses, metrics, alignment scales and divergence are fit's, per model. A
    model that diverges ends its history there (``History(diverged=True, reason)``), and one
    whose ``should_stop`` says so before the last epoch ends there stopped; either is no longer
    passed to ``on_epoch`` and leaves the stack (``Stack.keep``), so the others train on
    without computing it. ``on_epoch(k, metrics)`` receives model
    k's completed epochs; ``epoch_time`` is each model's share of the stacked epoch's wall time.
    The stack's tensors must be on ``device``; the trained ones are copied back into the models
    at the end.
    """
    positive_int("trainer.epochs", epochs)
    positive_int("trainer.batch_size", batch_size)
    if eval_batch_size is not None:
        positive_int("trainer.eval_batch_size", eval_batch_size)
    n_models = len(stack.models)
    if len(data_seeds) != n_models:
        raise ValueError(f"data_seeds has {len(data_seeds)} seeds for {n_models} stacked models")
    should_stop = list(should_stop or [None] * n_models)
    if len(should_stop) != n_models:
        raise ValueError(f"should_stop has {len(should_stop)} entries for {n_models} models")
    data = splits.to(device)
    n_train = len(data.y_train)
    if n_train == 0:
        raise ValueError("splits has no training samples")
    batch_sizes = torch.full(((n_train + batch_size - 1) // batch_size, 1), float(batch_size))
    batch_sizes[-1] = n_train - batch_size * (len(batch_sizes) - 1)
    batch_sizes = batch_sizes.to(device)
    generators = [torch.Generator().manual_seed(seed) for seed in data_seeds]
    if stack.active != list(range(n_models)):
        raise ValueError(f"the stack holds models {stack.active}, not all {n_models}")
    names = _parameter_names(stack, optimizer) if hasattr(optimizer, "last_scales") else None
    loss_fn = loss_function(data.y_train)
    histories = [History([], False, None) for _ in range(n_models)]

    stack.train()
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        active = stack.active
        orders = torch.stack([torch.randperm(n_train, generator=generators[k]) for k in active])
        losses = []
        scales = ScaleMean()
        for idx in orders.to(device).split(batch_size, dim=1):
            optimizer.zero_grad()
            loss = stack.losses(data.x_train[idx], data.y_train[idx], loss_fn)
            loss.sum().backward()  # model k's parameters get the gradient of its own loss only
            optimizer.step()
            losses.append(loss.detach())
            if names is not None:
                scales.add(optimizer.last_scales)

        step_losses = torch.stack(losses)  # (steps, K)
        parts = [(step_losses * batch_sizes).sum(0) / n_train]
        stack.train(False)
        with torch.no_grad():
            parts.append(_evaluate(stack, data.x_val, data.y_val, eval_batch_size, loss_fn))
            parts.append(_evaluate(stack, data.x_test, data.y_test, eval_batch_size, loss_fn))
        stack.train()
        if (mean := scales.mean()) is not None:
            parts.append(mean.T)  # (models, parameters)
        values = torch.cat([p.view(len(active), -1) for p in parts], 1).tolist()  # one sync
        epoch_time = (time.perf_counter() - start) / len(active)
        going_on = []
        for position, k in enumerate(active):
            losses_k = step_losses[:, position]
            metrics = epoch_outcome(epoch, values[position], losses_k, epoch_time, names)
            if isinstance(metrics, str):
                histories[k] = History(histories[k].epochs, True, metrics)
                continue
            histories[k].epochs.append(metrics)
            if on_epoch is not None:
                on_epoch(k, metrics)
            stop = should_stop[k] is not None and should_stop[k](histories[k])
            if stop and epoch < epochs:
                histories[k].stopped = True
                continue
            going_on.append(k)
        if not going_on:
            break
        if going_on != active and epoch < epochs:
            stack.keep(going_on, optimizer)
    stack.unstack()
    return histories


def _evaluate(
    stack: Stack, x: torch.Tensor, y: torch.Tensor, batch_size: int | None, loss_fn: LossFn
) -> torch.Tensor:
    """(K, 2): every model's [loss, accuracy] as ``training``'s evaluation computes it."""
    if batch_size is None:
        return stack.metrics(x, y, loss_fn)
    batches = zip(x.split(batch_size), y.split(batch_size), strict=True)
    return torch.stack([stack.metrics(xb, yb, loss_fn) for xb, yb in batches]).mean(dim=0)


def _parameter_names(stack: Stack, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in param_groups order (``param<i>`` if not stacked)."""
    by_id = {id(t): name for name, t in stack.params.items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [by_id.get(id(p), f"param{i}") for i, p in enumerate(params)]


def _first_line(error: Any) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
