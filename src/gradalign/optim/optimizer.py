"""GradientAlignmentOptimizer: GAO as a first-class ``torch.optim.Optimizer`` around a base
optimizer, over the arithmetic of ``functional``.

``param_groups`` and ``state`` are the base optimizer's own objects (not copies), and the EMA
lives in that state (``state[p]["gao_ema"]``), so LR schedulers, ``add_param_group``, checkpoints
and every tool that reads or writes ``optimizer.state`` (``torch.distributed.checkpoint``,
``ZeroRedundancyOptimizer``, Lightning, HF Trainer) carry it. Parameters sharded with FSDP2
(``fully_shard``, DTensor) keep a sharded EMA and get the cosine of the whole tensor.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer

from gradalign.optim import functional
from gradalign.optim.functional import Scales, complex_like, ema_dtype, new_ema, real
from gradalign.optim.sharding import is_dtensor, like, local, refuse_fsdp1, shard_sums
from gradalign.optim.stacking import keep_models, stack_shape

TARGETS = ("grad", "update")
GRANULARITIES = ("tensor", "global", "row")
_EMA_KEY = "gao_ema"
# Where GAO's state dict nests a base whose own state dict is not torch's layout (Lookahead-style).
_BASE_KEY = "gao_base"


def resolve_base(base: type[Optimizer] | str | None) -> type[Optimizer]:
    """Turn ``Adam``, ``"Adam"`` or ``"torch.optim.Adam"`` into an optimizer class."""
    if isinstance(base, type) and issubclass(base, Optimizer):
        return base
    if isinstance(base, str):
        module_name, _, attr = base.rpartition(".")
        try:
            module = importlib.import_module(module_name or "torch.optim")
        except ImportError:
            module = None
        found = getattr(module, attr, None)
        if isinstance(found, type) and issubclass(found, Optimizer):
            return found
    raise ValueError(
        f"base={base!r} is not an optimizer: pass a torch.optim.Optimizer subclass or its name "
        "(e.g. 'Adam', 'torch.optim.SGD', 'mypkg.MyOptimizer')"
    )


def _validate(
    betas: list[float],
    target: str,
    granularity: str,
    min_scale: float,
    cos_eps: float,
    stack_dims: int,
) -> None:
    for beta in betas:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta={beta!r} is outside the allowed range [0, 1)")
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not one of {TARGETS}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}")
    if not 0.0 <= min_scale <= 1.0:
        raise ValueError(f"min_scale={min_scale!r} is outside the allowed range [0, 1]")
    if not cos_eps > 0.0:
        raise ValueError(f"cos_eps={cos_eps!r} must be > 0")
    if isinstance(stack_dims, bool) or not isinstance(stack_dims, int) or stack_dims < 0:
        raise ValueError(
            f"stack_dims={stack_dims!r} is not an integer >= 0 (0: each parameter is one model's; "
            "1: dim 0 indexes models, as torch.func.stack_module_state stacks them)"
        )


def _refuse_misplaced_arguments(params: Any, base: Any, base_kwargs: dict[str, Any]) -> None:
    """The base optimizer given first (``GradientAlignmentOptimizer(Adam, params=...)``), or an
    optimizer instance given with a base or base arguments: each in one line saying what to do."""
    is_class = isinstance(params, type) and issubclass(params, Optimizer)
    if is_class or isinstance(params, str):
        name = params.__name__ if is_class else params
        given = "params= as a keyword" if "params" in base_kwargs else "the parameters second"
        raise TypeError(
            f"GradientAlignmentOptimizer got the base optimizer {name!r} first and {given}: "
            f"pass the parameters (or an optimizer instance) first and the base second, "
            f"GradientAlignmentOptimizer(params, {name!r}, lr=...)"
        )
    if not isinstance(params, Optimizer):
        return
    if "eps" in base_kwargs:
        raise TypeError(
            "eps is the base optimizer's argument: build the wrapped instance with it (GAO's own "
            "floor of the cosine's denominator, called eps before 2026-12, is cos_eps)"
        )
    if base is not None or base_kwargs:
        raise TypeError(
            "wrapping an optimizer instance takes no base or base keyword arguments; "
            f"got base={base!r}, {sorted(base_kwargs)}"
        )


def _refuse_differentiable(groups: list[dict[str, Any]]) -> None:
    """GAO's step (the EMA update, the cosine, the gradient it hands its base) runs without
    autograd, so a differentiable base step through it would give wrong gradients."""
    if any(group.get("differentiable") for group in groups):
        raise ValueError(
            "differentiable=True is not supported by GradientAlignmentOptimizer: its step is not "
            "differentiable; build the base optimizer with differentiable=False"
        )


def _step_without_hooks(optimizer: Optimizer) -> None:
    """``optimizer.step()`` without the wrapper torch puts around every optimizer class's step,
    which runs the global and the optimizer's own step hooks: they ran around GAO's step, once.
    A step that is not torch's wrapper (an instance's own, another library's) is called as it is.
    """
    function = getattr(optimizer.step, "__func__", None)
    if getattr(function, "hooked", False):
        function.__wrapped__(optimizer)
    else:
        optimizer.step()


class GradientAlignmentOptimizer(Optimizer):
    """Scale a base optimizer's step by the alignment of each gradient with its moving average.

    Build it around an optimizer instance::

        opt = GradientAlignmentOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), beta=0.99)

    or from parameters and a base class (or its name), which is what a config system needs::

        opt = GradientAlignmentOptimizer(model.parameters(), "Adam", lr=1e-3, beta=0.99)

    Args:
        params_or_optimizer: the optimizer to wrap, or the parameters (or param-group dicts) to
            build ``base`` on.
        base: optimizer class or name; only with parameters.
        beta: decay of the gradient EMA, in [0, 1); with ``stack_dims=1``, also a sequence of
            one decay per stacked model (a sweep's trials trained as one stacked model).
        target: ``"grad"`` scales the gradient before the base step (the note's method);
            ``"update"`` scales the parameter change the base step makes.
        granularity: ``"tensor"`` one cosine per parameter tensor (the note's method), ``"global"``
            one cosine over all parameters, ``"row"`` one per output unit (slice along dim 0;
            0/1-d tensors such as biases get one scale each).
        min_scale: lower clamp of the scale, in [0, 1].
        cos_eps: floor of the norm product in the cosine's denominator; it only guards the
            division (a zero gradient or EMA gives s = 0 whatever cos_eps is). It was called
            ``eps`` before 2026-12; ``eps`` is now the base's own (Adam's, ...).
        stack_dims: how many leading dims of every parameter index separate models trained
            together (an integer >= 0). 0 (default): each parameter is one model's tensor. With
            ``stack_dims=1`` a parameter of shape (K, *shape) holds K models' tensors (as
            ``torch.func.stack_module_state`` stacks them) and every granularity acts per model:
            ``"tensor"`` one cosine per model and tensor, ``"row"`` one per model and output unit
            (slices along dim ``stack_dims``; tensors with no dim beyond the models' get one per
            model), ``"global"`` one per model over all its tensors. All parameters must share
            the leading dims (checked when they are added) and must not be DTensors. With an
            elementwise base (Adam, AdamW, SGD, RMSprop) whose hyperparameters the models share,
            each model then steps exactly as it would alone.
        **base_kwargs: keyword arguments of ``base`` (``lr``, ``eps``, ``weight_decay``, ...);
            ``differentiable=True`` is refused (GAO's step is not differentiable).

    After each step ``last_scales`` holds the mean scale applied to every parameter, in
    ``param_groups`` order (NaN where a parameter had no gradient), as a float32 tensor on the
    parameters' device, for logging without a host synchronisation. Its shape is (parameters,
    *models' leading dims*): (parameters,) by default, and with ``stack_dims=1``
    ``last_scales[i, k]`` is model k's mean scale of parameter i. It is ``None`` before the
    first step and then updated in place (so a ``torch.compile``-d step updates it too): copy it to
    keep a step's values. Public attributes GAO lacks are read from the base (``opt.train()`` of a
    schedule-free base).

    It keeps the conventions of torch's optimizers: the base steps on the scaled gradient, and
    ``p.grad`` holds the caller's own gradient again after the step; complex parameters are read
    as their real views, so a complex tensor's cosine is the real part of the conjugate product
    over the norms; the step hooks (global ones too) run once per ``step()``, and the state-dict
    hooks registered on GAO run around its ``state_dict()`` and ``load_state_dict()``. A gradient
    element that is not finite (NaN, inf) is read as 0 for the EMA and the cosine, and reaches
    the base as it is: the base loses that element as it would alone, and nothing else is lost.
    """

    def __init__(
        self,
        params_or_optimizer: Optimizer | Iterable[Any],
        base: type[Optimizer] | str | None = None,
        *,
        beta: float | Sequence[float] = 0.9,
        target: str = "grad",
        granularity: str = "tensor",
        min_scale: float = 0.0,
        cos_eps: float = 1e-30,
        stack_dims: int = 0,
        **base_kwargs: Any,
    ) -> None:
        per_model = not isinstance(beta, int | float)
        if isinstance(beta, str | bytes) or (
            per_model and not all(isinstance(b, int | float) for b in beta)
        ):
            raise ValueError(
                f"beta={beta!r} is invalid: must be a number in [0, 1), or one per model"
            )
        betas = [float(b) for b in beta] if per_model else [float(beta)]
        _validate(betas, target, granularity, min_scale, cos_eps, stack_dims)
        _refuse_misplaced_arguments(params_or_optimizer, base, base_kwargs)
        if isinstance(params_or_optimizer, Optimizer):
            self.base = params_or_optimizer
        else:
            self.base = resolve_base(base)(params_or_optimizer, **base_kwargs)
        _refuse_differentiable(self.base.param_groups)
        refuse_fsdp1(self._params())
        models = stack_shape(self._params(), stack_dims)
        if per_model and (stack_dims != 1 or models is None or models[0] != len(betas)):
            raise ValueError(
                f"beta has {len(betas)} values: one per model needs stack_dims=1 and as many "
                f"models (dim 0 of the parameters: {models and models[0]}, stack_dims={stack_dims})"
            )
        self.stack_dims = stack_dims
        self.beta = betas if per_model else float(beta)
        self._ema_weights = torch.tensor([1.0 - b for b in betas]) if per_model else None
        self._ema_weight_views: dict[tuple, torch.Tensor] = {}  # _ema_weights_like's
        self.target = target
        self.granularity = granularity
        self.min_scale = min_scale
        self.cos_eps = cos_eps
        self.last_scales: torch.Tensor | None = None
        self._flat_emas: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Optimizer.__init__ is deliberately not called: it would copy param_groups, and copies go
        # stale when the base's groups change. Optimizer.__setstate__ sets up the rest of what an
        # optimizer has, as torch does for an unpickled one: the hook registries, and the wrapper
        # of step() that runs the step hooks.
        super().__setstate__({})

    # --- delegation to the base optimizer -------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.base.param_groups = groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The base optimizer's per-parameter state; each EMA is ``state[p]["gao_ema"]``."""
        return self.base.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base.defaults

    @property
    def ema_state(self) -> dict[torch.Tensor, torch.Tensor]:
        """The gradient EMA of each parameter that has one (``state[p]["gao_ema"]``, shaped and,
        under FSDP2, sharded like it): all the state GAO keeps."""
        state = self.base.state
        return {p: state[p][_EMA_KEY] for p in self._params() if _EMA_KEY in state.get(p, ())}

    def __getattr__(self, name: str) -> Any:
        """Public attributes GAO lacks come from the base, e.g. ``train()``/``eval()`` of a
        schedule-free optimizer; private names are not delegated, so torch's own feature checks
        (``hasattr(opt, "_...")``) see GAO, not its base."""
        base = self.__dict__.get("base")
        if base is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(base, name)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base.add_param_group(param_group)
        try:
            _refuse_differentiable(self.base.param_groups[-1:])
            refuse_fsdp1(self.base.param_groups[-1]["params"])
            stack_shape(self._params(), self.stack_dims)
        except ValueError:
            self.base.param_groups.pop()  # refused: the optimizer stays as it was
            raise

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def keep_models(self, positions: torch.Tensor, models: int) -> None:
        """With ``stack_dims=1``, after the parameters were cut to the models at ``positions``
        (of ``models``): keep their EMAs, per-model betas and the base's state (``keep_models``
        of the base), drop the rest."""
        if self.stack_dims != 1:
            raise ValueError(f"keep_models needs stack_dims=1, not {self.stack_dims}")
        if self._ema_weights is not None:
            self._ema_weights = self._ema_weights[positions]
            self._ema_weight_views = {}
            self.beta = [self.beta[i] for i in positions.tolist()]
        self.last_scales = None
        self._flat_emas = {}
        keep_models(self.base, positions, models)

    def __repr__(self) -> str:
        return (
            f"GradientAlignmentOptimizer(beta={self.beta}, target={self.target!r}, "
            f"granularity={self.granularity!r}, min_scale={self.min_scale}, "
            f"cos_eps={self.cos_eps}, stack_dims={self.stack_dims}, base={self.base!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        """GAO's attributes (its base holds defaults, state and param_groups) but, as torch's
        optimizers do, no hooks; the flat EMA views are keyed by the parameters' ids, which a
        copy does not keep."""
        kept = {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}
        return {**kept, "_flat_emas": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Older pickles: no per-model betas before stacking, and GAO's floor was named eps.
        state = {"_ema_weights": None, "_ema_weight_views": {}, **state}
        if "eps" in state:
            state["cos_eps"] = state.pop("eps")
        super().__setstate__(state)

    # --- checkpointing ---------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """The base's state dict, in which each parameter's entry holds its EMA as ``"gao_ema"``.

        A base whose state dict is not torch's layout (``"state"`` keyed by parameter position,
        ``"param_groups"``) is nested whole under ``"gao_base"``, beside GAO's own ``"state"`` and
        ``"param_groups"``, as Lookahead nests its base. The state-dict hooks registered on GAO
        run around it as ``torch.optim.Optimizer.state_dict`` runs them.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self.base.state
        emas = {  # out of the base's state while it saves its own
            p: entry.pop(_EMA_KEY)
            for p, entry in state.items()
            if isinstance(entry, dict) and _EMA_KEY in entry
        }
        try:
            base_state = self.base.state_dict()
        finally:
            for p, ema in emas.items():
                state[p][_EMA_KEY] = ema
        positions: dict[torch.Tensor, int] = {}  # a parameter listed twice: its first position,
        for index, p in enumerate(self._params()):  # as torch's state_dict() numbers it
            positions.setdefault(p, index)
        own = {positions[p]: {_EMA_KEY: ema} for p, ema in emas.items() if p in positions}
        if _is_torch_layout(base_state):
            merged = dict(base_state["state"])
            for index, entry in own.items():
                merged[index] = {**merged.get(index, {}), **entry}
            state_dict = {**base_state, "state": merged}
        else:
            groups = [{"params": [positions[p] for p in g["params"]]} for g in self.param_groups]
            state_dict = {"state": own, "param_groups": groups, _BASE_KEY: base_state}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hook_result = post_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the base state and the EMAs, so a resumed run continues exactly.

        Entries are matched to parameters through the saved ``param_groups`` ids exactly as torch
        does, so integer keys (``state_dict()``) and parameter names
        (``torch.distributed.checkpoint``) both load. EMAs are copied, in float32 for
        low-precision parameters, onto each parameter's device. The load-state-dict hooks
        registered on GAO run around it as ``torch.optim.Optimizer.load_state_dict`` runs them.
        """
        state_dict = state_dict.copy()  # shallow, as torch's: a pre-hook may edit it
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        if _BASE_KEY in state_dict:
            self.base.load_state_dict(state_dict[_BASE_KEY])
        else:
            self.base.load_state_dict(_without_emas(state_dict))
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = dict(zip(saved_ids, self._params(), strict=True))
        state = self.base.state
        for key, entry in state_dict["state"].items():
            p = params.get(key)
            if p is not None and isinstance(entry, dict) and _EMA_KEY in entry:
                ema = entry[_EMA_KEY].to(device=p.device, dtype=ema_dtype(p), copy=True)
                state[p][_EMA_KEY] = ema
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # --- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate ``closure`` (if any), compute the alignment scales, and step the base."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batch = self._gather()
        scales = self._align(batch)
        if not batch.params:  # no gradient: nothing to scale, the base steps as it would
            self._base_step(batch)
        elif self.target == "grad":  # the base steps on scaled copies in p.grad (_base_step)
            scaled = torch._foreach_mul(batch.grads, scales.grad_factors(batch.grads))
            self._base_step(batch, batch.as_param_grads(scaled))
        else:
            weights = scales.update_weights(batch.values)
            before = torch._foreach_clone(batch.values)
            self._base_step(batch)
            torch._foreach_lerp_(batch.values, before, weights)  # before + s*(after - before)
        return loss

    def _gather(self) -> _Batch:
        """The parameters that have a gradient, with their local tensors and EMAs (new ones at
        zero). Raises before changing anything if a gradient is sparse or the tensors are spread
        over several devices."""
        state = self.base.state
        all_params = self._params()
        batch = _Batch(len(all_params))
        lonely = []
        special = False
        for index, p in enumerate(all_params):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    "GradientAlignmentOptimizer does not support sparse gradients "
                    f"(parameter {index} of shape {tuple(p.shape)} has one)"
                )
            entry = state.get(p)
            ema = entry.get(_EMA_KEY) if entry else None
            if ema is None:
                ema = new_ema(p)
                batch.pending.append((p, ema))
            elif len(entry) == 1:  # only GAO's: the base has not set up its own state for p yet
                lonely.append(entry)
                batch.pending.append((p, ema))
            batch.indices.append(index)
            batch.params.append(p)
            batch.param_grads.append(grad)
            batch.emas.append(ema)
            special = special or type(grad) is not torch.Tensor or p.is_complex()
        batch.prepare(special)
        if batch.sharded and self.stack_dims:
            raise ValueError(
                f"stack_dims={self.stack_dims} needs plain tensors; DTensor parameters (FSDP2) "
                "are allowed only with stack_dims=0"
            )
        devices = {g.device for g in batch.grads}
        if len(devices) > 1:
            raise RuntimeError(
                "GradientAlignmentOptimizer needs all parameters with gradients on one device, "
                f"got {sorted(map(str, devices))}"
            )
        for entry in lonely:  # hidden during the base's step, which would take it for its own
            del entry[_EMA_KEY]
        return batch

    def _base_step(self, batch: _Batch, grads: list[torch.Tensor] | None = None) -> None:
        """Step the base, on ``grads`` in place of the parameters' gradients if given, and give
        each parameter its own gradient back after: a torch optimizer leaves ``p.grad`` as the
        caller's (gradient logging, clipping checks, a second optimizer read it after the step).
        Then store the EMAs the base must not see before (new and lonely ones)."""
        if grads is not None:
            for p, g in zip(batch.params, grads, strict=True):
                p.grad = g
        try:
            _step_without_hooks(self.base)
        finally:
            if grads is not None:
                for p, g in zip(batch.params, batch.param_grads, strict=True):
                    p.grad = g
            state = self.base.state
            for p, ema in batch.pending:
                state[p][_EMA_KEY] = ema

    def _align(self, batch: _Batch) -> Scales:
        """Update the EMAs, record ``last_scales`` and return the parameters' scales."""
        if not batch.params:  # no gradient at all: every scale NaN, as for each absent one
            params = self._params()
            device = params[0].device if params else None
            models = stack_shape(params, self.stack_dims) or ()
            self._record(torch.empty((0, *models), device=device), [], batch.n_params, device)
            return Scales(None, [])
        device = batch.grads[0].device
        emas = batch.emas  # in the EMA's dtype: float32 for low-precision parameters
        grads = [
            g if g.dtype == m.dtype else g.to(m.dtype)
            for g, m in zip(batch.grads, emas, strict=True)
        ]
        cosine = (self.min_scale, self.cos_eps)
        if self.stack_dims or self.granularity == "row":
            grads = functional.readable(grads)
            self._update_emas(emas, grads)
            scales, means = functional.slice_scales(
                grads,
                emas,
                [p.shape for p in batch.params],
                self.stack_dims,
                self.granularity,
                *cosine,
                batch.row_sums,
                batch.mean_sums,
            )
            self._record(means, batch.indices, batch.n_params, device)
            return Scales(None, scales)
        flat_grads = [g if g.dim() == 1 else g.reshape(-1) for g in grads]
        grad_squares = None  # the cosine's g.g: where it can be read, it tells if all is finite
        if functional.host_readable(grads[0]):
            grad_squares = functional.squares(flat_grads)
            if not functional.all_finite(grad_squares):
                grad_squares = None
        if grad_squares is None:  # maybe not finite: read those elements as 0
            grads = functional.zeroed(grads)
            flat_grads = [g if g.dim() == 1 else g.reshape(-1) for g in grads]
            grad_squares = functional.squares(flat_grads)
        self._update_emas(emas, grads)
        if torch.compiler.is_compiling():  # free in the graph; the eager cache would be guarded
            flat_emas = [m.reshape(-1) for m in emas]
        else:
            flat_emas = [self._flat(p, m) for p, m in zip(batch.params, emas, strict=True)]
        whole = self.granularity == "global"
        scales = functional.tensor_scales(
            flat_grads, flat_emas, grad_squares, whole, *cosine, batch.tensor_sums
        )
        self._record(scales, batch.indices, batch.n_params, device)
        return Scales(scales)

    def _update_emas(self, emas: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """m <- beta * m + (1 - beta) * g, with one decay per model (dim 0) if given so."""
        if self._ema_weights is None:
            torch._foreach_lerp_(emas, grads, 1.0 - self.beta)
        else:
            for ema, g in zip(emas, grads, strict=True):
                ema.lerp_(g, self._ema_weights_like(ema))

    def _flat(self, p: torch.Tensor, ema: torch.Tensor) -> torch.Tensor:
        """A flat view of ``p``'s EMA, made once per EMA tensor: a reshape costs a torch call,
        and the EMAs (unlike gradients) live from step to step. An EMA replaced in the state (a
        checkpoint load) gets a new view; one that is not contiguous gets a copy each step."""
        if ema.dim() == 1:
            return ema
        cached = self._flat_emas.get(id(p))
        if cached is not None and cached[0] is ema:
            return cached[1]
        flat = ema.reshape(-1)
        if ema.is_contiguous():  # a view, which sees the in-place EMA updates
            self._flat_emas[id(p)] = (ema, flat)
        return flat

    def _record(
        self, means: torch.Tensor, indices: list[int], n_params: int, device: torch.device
    ) -> None:
        """Write this step's mean scales into ``last_scales`` in place (NaN where no gradient)."""
        last = self.last_scales
        shape = (n_params, *means.shape[1:])  # (parameters, *models)
        if last is None or last.shape != shape or last.device != device:
            last = self._new_last_scales(shape, device)
        if len(indices) == n_params:
            last.copy_(means)
            return
        last.fill_(math.nan)
        if indices:
            last.index_copy_(0, torch.tensor(indices, device=device), means.to(last.dtype))

    @torch._disable_dynamo  # a compiled step drops attribute stores on optimizers; this one runs
    def _new_last_scales(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        self.last_scales = torch.full(shape, math.nan, device=device)
        return self.last_scales

    def _ema_weights_like(self, ema: torch.Tensor) -> torch.Tensor:
        """The per-model EMA weights (1 - beta) as a (K, 1, ...) tensor of ``ema``'s device,
        dtype and rank, made once."""
        key = (ema.device, ema.dtype, ema.dim())
        weights = self._ema_weight_views.get(key)
        if weights is None:
            weights = self._ema_weights.to(device=ema.device, dtype=ema.dtype)
            weights = weights.view(-1, *(1,) * (ema.dim() - 1))
            self._ema_weight_views[key] = weights
        return weights


class _Batch:
    """What a step acts on: the parameters that have a gradient, in ``param_groups`` order, with
    the tensors the arithmetic reads of each (the rank's shard under FSDP2, the real view of a
    complex tensor, the tensor itself otherwise) and, for sharded ones, how their local sums add
    up to the whole tensor's (None: nothing is sharded)."""

    def __init__(self, n_params: int) -> None:
        self.n_params = n_params  # of all parameters, with a gradient or not
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # EMAs to store after the
        # base's step (new ones, lonely ones)
        self.indices: list[int] = []  # positions among all parameters
        self.params: list[torch.Tensor] = []
        self.param_grads: list[torch.Tensor] = []  # the parameters' own gradients
        self.emas: list[torch.Tensor] = []
        self.sharded = False
        self.tensor_sums = self.row_sums = self.mean_sums = None

    def prepare(self, special: bool) -> None:
        """Set up the tensors the arithmetic reads: the parameters' own, unless some are DTensors
        or complex (``special``)."""
        self.plain = not special  # the parameters' own tensors are the ones the arithmetic reads
        self.values, self.grads = self.params, self.param_grads
        if self.plain:
            return
        layouts = [
            shard_sums(p, g, m) if is_dtensor(p, g) else None
            for p, g, m in zip(self.params, self.param_grads, self.emas, strict=True)
        ]
        self.sharded = any(layout is not None for layout in layouts)
        self.values = [real(local(p)) for p in self.params]
        self.grads = [real(local(g)) for g in self.param_grads]
        self.emas = [real(local(m)) for m in self.emas]
        if self.sharded:  # of each tensor: how its local sums, its rows' and its row scales' add up
            whole = (None, None, None)
            sums = zip(*(layout or whole for layout in layouts), strict=True)
            self.tensor_sums, self.row_sums, self.mean_sums = map(list, sums)

    def as_param_grads(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Gradients computed on the batch's tensors (local shards, real views) as gradients of
        the parameters themselves (DTensors, complex tensors)."""
        if self.plain:
            return grads
        return [
            like(own, complex_like(local(own), g)) if self.sharded else complex_like(own, g)
            for own, g in zip(self.param_grads, grads, strict=True)
        ]


def _is_torch_layout(state_dict: Any) -> bool:
    return (
        isinstance(state_dict, dict)
        and isinstance(state_dict.get("state"), dict)
        and isinstance(state_dict.get("param_groups"), list)
    )


def _without_emas(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The state dict without its EMA entries (what the base loads); entries left empty go, and
    what is not a parameter's entry (torch keeps unknown keys' values) stays as it is."""
    state = {}
    for key, entry in state_dict["state"].items():
        if not isinstance(entry, dict):
            state[key] = entry
        elif rest := {k: v for k, v in entry.items() if k != _EMA_KEY}:
            state[key] = rest
    return {**state_dict, "state": state}
