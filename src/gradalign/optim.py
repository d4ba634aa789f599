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

The wrapper is a first-class ``torch.optim.Optimizer``: ``param_groups`` and ``state`` are the base
optimizer's own objects (not copies), and the EMA lives in that state (``state[p]["gao_ema"]``), so
LR schedulers, ``add_param_group``, checkpoints and every tool that reads or writes
``optimizer.state`` (``torch.distributed.checkpoint``, ``ZeroRedundancyOptimizer``, Lightning, HF
Trainer) carry it. Parameters sharded with FSDP2 (``fully_shard``, DTensor) keep a sharded EMA and
get the cosine of the whole tensor. Only torch is imported here, so the module can be dropped into
any PyTorch project.
"""

from __future__ import annotations

import importlib
import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain
from typing import Any, NamedTuple

import torch
from torch.optim import Optimizer

TARGETS = ("grad", "update")
GRANULARITIES = ("tensor", "global", "row")
_EMA_KEY = "gao_ema"
# Where GAO's state dict nests a base whose own state dict is not torch's layout (Lookahead-style).
_BASE_KEY = "gao_base"
_LOW_PRECISION = (torch.float16, torch.bfloat16)

# A sharded tensor's mesh and the mesh dimensions over which its local sums add up to the whole's.
_ShardSum = tuple[Any, tuple[int, ...]]


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
    betas: list[float], target: str, granularity: str, min_scale: float, eps: float, stack_dims: int
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
    if not eps > 0.0:
        raise ValueError(f"eps={eps!r} must be > 0")
    if isinstance(stack_dims, bool) or not isinstance(stack_dims, int) or stack_dims < 0:
        raise ValueError(
            f"stack_dims={stack_dims!r} is not an integer >= 0 (0: each parameter is one model's; "
            "1: dim 0 indexes models, as torch.func.stack_module_state stacks them)"
        )


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


def _stack_shape(params: Iterable[torch.Tensor], stack_dims: int) -> tuple[int, ...] | None:
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


def _refuse_fsdp1(params: Iterable[torch.Tensor]) -> None:
    """FSDP1 hands the optimizer flat 1-D shards of its parameters: a cosine over a rank's shard is
    not the tensor's, and nothing on the shard says which process group would complete it."""
    for p in params:
        if getattr(p, "_fsdp_flattened", False):
            raise ValueError(
                "GradientAlignmentOptimizer cannot use FullyShardedDataParallel (FSDP1) "
                "parameters: each rank holds a flat shard, so the cosine would be the shard's, "
                "not the tensor's. Shard with torch.distributed.fsdp.fully_shard (FSDP2) instead, "
                "or use DDP."
            )


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
        eps: floor of the norm product in the cosine's denominator; it only guards the division
            (a zero gradient or EMA gives s = 0 whatever eps is).
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
        **base_kwargs: keyword arguments of ``base`` (``lr``, ``weight_decay``, ...).

    After each step ``last_scales`` holds the mean scale applied to every parameter, in
    ``param_groups`` order (NaN where a parameter had no gradient), as a float32 tensor on the
    parameters' device, for logging without a host synchronisation. Its shape is (parameters,
    *models' leading dims*): (parameters,) by default, and with ``stack_dims=1``
    ``last_scales[i, k]`` is model k's mean scale of parameter i. It is ``None`` before the
    first step and then updated in place (so a ``torch.compile``-d step updates it too): copy it to
    keep a step's values. Public attributes GAO lacks are read from the base (``opt.train()`` of a
    schedule-free base).
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
        eps: float = 1e-30,
        stack_dims: int = 0,
        **base_kwargs: Any,
    ) -> None:
        per_model = not isinstance(beta, int | float)
        betas = [float(b) for b in beta] if per_model else [float(beta)]
        _validate(betas, target, granularity, min_scale, eps, stack_dims)
        if isinstance(params_or_optimizer, Optimizer):
            if base is not None or base_kwargs:
                raise TypeError(
                    "wrapping an optimizer instance takes no base or base keyword arguments; "
                    f"got base={base!r}, {sorted(base_kwargs)}"
                )
            self.base = params_or_optimizer
        else:
            self.base = resolve_base(base)(params_or_optimizer, **base_kwargs)
        _refuse_fsdp1(self._params())
        models = _stack_shape(self._params(), stack_dims)
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
        self.eps = eps
        self.last_scales: torch.Tensor | None = None
        self._flat_emas: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Optimizer.__init__ is deliberately not called: it would copy param_groups, and copies go
        # stale when the base's groups change. Set up the hook registries it would have made.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

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
        _refuse_fsdp1(self.base.param_groups[-1]["params"])
        try:
            _stack_shape(self._params(), self.stack_dims)
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
            f"granularity={self.granularity!r}, min_scale={self.min_scale}, eps={self.eps}, "
            f"stack_dims={self.stack_dims}, base={self.base!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer's own pickling keeps only defaults/state/param_groups, which live on the base.
        # The flat views are keyed by the parameters' ids, which a copy does not keep.
        return {**self.__dict__, "_flat_emas": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # an optimizer pickled before per-model betas existed has no _ema_weights
        self.__dict__.update({"_ema_weights": None, "_ema_weight_views": {}, **state})

    # --- checkpointing ---------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The base's state dict, in which each parameter's entry holds its EMA as ``"gao_ema"``.

        A base whose state dict is not torch's layout (``"state"`` keyed by parameter position,
        ``"param_groups"``) is nested whole under ``"gao_base"``, beside GAO's own ``"state"`` and
        ``"param_groups"``, as Lookahead nests its base.
        """
        emas = self._take_emas()
        try:
            base_state = self.base.state_dict()
        finally:
            self._put_emas(emas)
        positions = {p: i for i, p in enumerate(self._params())}
        own = {positions[p]: {_EMA_KEY: ema} for p, ema in emas.items() if p in positions}
        if _is_torch_layout(base_state):
            state = dict(base_state["state"])
            for index, entry in own.items():
                state[index] = {**state.get(index, {}), **entry}
            return {**base_state, "state": state}
        groups = [{"params": [positions[p] for p in g["params"]]} for g in self.param_groups]
        return {"state": own, "param_groups": groups, _BASE_KEY: base_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the base state and the EMAs, so a resumed run continues exactly.

        Entries are matched to parameters through the saved ``param_groups`` ids exactly as torch
        does, so integer keys (``state_dict()``) and parameter names
        (``torch.distributed.checkpoint``) both load. EMAs are copied, in float32 for
        low-precision parameters, onto each parameter's device.
        """
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
                ema = entry[_EMA_KEY].to(device=p.device, dtype=_ema_dtype(p), copy=True)
                state[p][_EMA_KEY] = ema

    def _take_emas(self) -> dict[torch.Tensor, torch.Tensor]:
        """Remove the EMAs from the base's state (to let the base save only its own)."""
        state = self.base.state
        return {
            p: entry.pop(_EMA_KEY)
            for p, entry in state.items()
            if isinstance(entry, dict) and _EMA_KEY in entry
        }

    def _put_emas(self, emas: dict[torch.Tensor, torch.Tensor]) -> None:
        state = self.base.state
        for p, ema in emas.items():
            state[p][_EMA_KEY] = ema

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
        if self.target == "grad":
            if batch.params:
                torch._foreach_mul_(batch.grads, scales.grad_factors(batch.grads))
            self._base_step(batch)
        else:
            weights = scales.update_weights(batch.values)
            before = torch._foreach_clone(batch.values) if batch.params else []
            self._base_step(batch)
            if batch.params:
                torch._foreach_lerp_(batch.values, before, weights)  # before + s*(after - before)
        return loss

    def _gather(self) -> _Batch:
        """The parameters that have a gradient, with their local tensors and EMAs (new ones at
        zero). Raises before changing anything if a gradient is sparse or the tensors are spread
        over several devices."""
        state = self.base.state
        all_params = self._params()
        rows, pending, lonely = [], [], []
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
                ema = _new_ema(p)
                pending.append((p, ema))
            elif len(entry) == 1:  # only GAO's: the base has not set up its own state for p yet
                lonely.append(entry)
                pending.append((p, ema))
            rows.append((index, p, grad, ema))
        batch = _Batch(len(all_params), rows, pending)
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

    def _base_step(self, batch: _Batch) -> None:
        """Step the base, then store the EMAs it must not see before (new and lonely ones)."""
        try:
            self.base.step()
        finally:
            state = self.base.state
            for p, ema in batch.pending:
                state[p][_EMA_KEY] = ema

    def _align(self, batch: _Batch) -> _Scales:
        """Update the EMAs, record ``last_scales`` and return the parameters' scales."""
        device = batch.grads[0].device if batch.grads else _any_device(self._params())
        if not batch.params:  # no gradient at all: every scale NaN, as for each absent one
            models = self._models_shape() if self.stack_dims else ()
            self._record(torch.empty((0, *models), device=device), [], batch.n_params, device)
            return _Scales([], None)
        ema_grads = [
            g if g.dtype == m.dtype else g.to(m.dtype)
            for g, m in zip(batch.grads, batch.emas, strict=True)
        ]
        if self._ema_weights is None:
            torch._foreach_lerp_(batch.emas, ema_grads, 1.0 - self.beta)
        else:  # one decay per model (dim 0)
            for ema, g in zip(batch.emas, ema_grads, strict=True):
                ema.lerp_(g, self._ema_weights_like(ema))
        if self.stack_dims:
            scales, means = self._stacked_scales(ema_grads, batch)
            self._record(means, batch.indices, batch.n_params, device)
            return _Scales(scales, None)
        if self.granularity == "row":
            scales, means = self._row_scales(ema_grads, batch)
        else:
            scales, means = self._tensor_scales(ema_grads, batch)
        self._record(means, batch.indices, batch.n_params, device)
        return _Scales(scales, means if self.granularity != "row" else None)

    def _tensor_scales(
        self, grads: list[torch.Tensor], batch: _Batch
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One scale per tensor (or one for all), with no host synchronisation.

        On small models a step costs its number of torch calls, not its arithmetic: every call
        here is one per step or one per tensor, on flat views.
        """
        flat_grads = [g if g.dim() == 1 else g.reshape(-1) for g in grads]
        if torch.compiler.is_compiling():  # free in the graph; the eager cache would be guarded
            flat_emas = [m.reshape(-1) for m in batch.emas]
        else:
            flat_emas = [self._flat(p, m) for p, m in zip(batch.params, batch.emas, strict=True)]
        products = torch.stack(
            [torch.dot(g, m) for g, m in zip(flat_grads, flat_emas, strict=True)]
            + [torch.dot(g, g) for g in flat_grads]
            + [torch.dot(m, m) for m in flat_emas]
        ).view(3, -1)
        if batch.sharded:
            products = _sum_over_shards(products, batch.tensor_sums)
        if self.granularity == "global":
            scale = self._scale(products.sum(1))
            return [scale] * len(grads), scale.expand(len(grads))
        scale = self._scale(products)
        return list(scale.unbind(0)), scale

    def _row_scales(
        self, grads: list[torch.Tensor], batch: _Batch
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One scale per output unit (slice along dim 0) of each parameter, shaped to broadcast
        over it, and each parameter's mean scale. The cosines of all rows of all parameters are
        one ``_scale`` call (elementwise, so the same bits as one call per parameter)."""
        rows = [g.shape[0] if p.dim() >= 2 else 1 for p, g in zip(batch.params, grads, strict=True)]
        products = []
        for g, m, n in zip(grads, batch.emas, rows, strict=True):
            shape = (n, g.numel() // n if n else 0)  # an FSDP2 shard may hold no row at all
            g_rows, m_rows = g.reshape(shape), m.reshape(shape)
            dot, grad_square = (g_rows * m_rows).sum(1), g_rows.square().sum(1)
            products.append(torch.stack([dot, grad_square, m_rows.square().sum(1)]))
        products = torch.cat(products, 1)
        if batch.sharded:
            row_sums = [s for s, n in zip(batch.row_sums, rows, strict=True) for _ in range(n)]
            products = _sum_over_shards(products, row_sums)
        per_row = self._scale(products).split(rows)
        scales = [
            s.view((n,) + (1,) * (g.dim() - 1) if p.dim() >= 2 else ())
            for s, n, g, p in zip(per_row, rows, grads, batch.params, strict=True)
        ]
        sums = torch.stack([s.sum() for s in per_row]).view(1, -1)
        if batch.sharded:
            sums = _sum_over_shards(sums, batch.mean_sums)
        counts = [p.shape[0] if p.dim() >= 2 else 1 for p in batch.params]
        return scales, sums.view(-1) / torch.tensor(counts, dtype=sums.dtype, device=sums.device)

    def _stacked_scales(
        self, grads: list[torch.Tensor], batch: _Batch
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-model scales of stacked parameters (the leading ``stack_dims`` dims index models),
        shaped to broadcast over each parameter, and each parameter's mean scale per model,
        shaped (parameters, *models). Each tensor is cut into the slices that get one cosine (a
        model's tensor, or a model's row) and all their cosines are one ``_scale`` call."""
        models = tuple(batch.params[0].shape[: self.stack_dims])
        n_models = math.prod(models)
        leads = [
            self.stack_dims + 1
            if self.granularity == "row" and p.dim() > self.stack_dims + 1
            else self.stack_dims
            for p in batch.params
        ]
        slices, products = [], []
        for g, m, lead in zip(grads, batch.emas, leads, strict=True):
            n = math.prod(g.shape[:lead])
            g_rows, m_rows = g.reshape(n, -1), m.reshape(n, -1)
            dot, grad_square = (g_rows * m_rows).sum(1), g_rows.square().sum(1)
            products.append(torch.stack([dot, grad_square, m_rows.square().sum(1)]))
            slices.append(n)
        products = torch.cat(products, 1)
        if self.granularity == "global":  # each tensor is one slice per model: add them up
            scale = self._scale(products.view(3, len(grads), n_models).sum(1))
            per_slice = [scale] * len(grads)
            means = scale.expand(len(grads), n_models)
        else:
            per_slice = self._scale(products).split(slices)
            means = torch.stack([s.view(n_models, -1).mean(1) for s in per_slice])
        scales = [
            s.view(*g.shape[:lead], *(1,) * (g.dim() - lead))
            for s, g, lead in zip(per_slice, grads, leads, strict=True)
        ]
        return scales, means.view(len(grads), *models)

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

    def _scale(self, products: torch.Tensor) -> torch.Tensor:
        """clamp(cos(g, m), min_scale, 1) from stacked products [g.m, g.g, m.m]; 0 if a norm is 0.

        All three products come from the same kernel and the cosine is g.m / sqrt(g.g * m.m), so
        m == g gives exactly 1 (sqrt(x * x) == x); float64 keeps g.g * m.m from underflowing.
        """
        dot, grad_square, ema_square = products.double().unbind(0)
        norm_product = (grad_square * ema_square).sqrt()
        scale = (dot / norm_product.clamp_min(self.eps)).clamp_(self.min_scale, 1.0)
        if self.min_scale > 0:  # with min_scale = 0 the clamp already gives 0 for a zero norm
            scale.masked_fill_(norm_product == 0, 0.0)
        return scale

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

    def _models_shape(self) -> tuple[int, ...]:
        """The models' grid: the leading ``stack_dims`` dims of the parameters."""
        return _stack_shape(self._params(), self.stack_dims) or ()


class _Batch:
    """What a step acts on: the parameters that have a gradient, in ``param_groups`` order, with
    the local tensors of each (the rank's shard under FSDP2, the tensor itself otherwise) and,
    for sharded ones, how their local sums add up to the whole tensor's (None: already whole)."""

    def __init__(
        self,
        n_params: int,
        rows: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]],
        pending: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        self.n_params = n_params  # of all parameters, with a gradient or not
        self.pending = pending  # EMAs to store after the base's step (new ones, lonely ones)
        columns = [list(column) for column in zip(*rows, strict=True)] or [[], [], [], []]
        self.indices, self.params, grads, emas = columns  # indices: positions among all
        layouts = [
            None if type(g) is torch.Tensor or not _is_dtensor(p, g) else _shard_sums(p, g, m)
            for p, g, m in zip(self.params, grads, emas, strict=True)
        ]
        self.sharded = any(layouts)
        if not self.sharded:  # plain tensors: the common case, with no per-tensor work
            self.values, self.grads, self.emas = self.params, grads, emas
            self.tensor_sums = self.row_sums = self.mean_sums = [None] * len(rows)
            return
        self.values = [_local(p) for p in self.params]
        self.grads = [_local(g) for g in grads]
        self.emas = [_local(m) for m in emas]
        # Which sharded tensor dims the local sums of a tensor, of one of its rows, and of its row
        # scales run over (a 0/1-d tensor has one "row": the whole tensor).
        self.tensor_sums, self.row_sums, self.mean_sums = [], [], []
        for layout, p in zip(layouts, self.params, strict=True):
            by_rows = p.dim() >= 2
            self.tensor_sums.append(layout and layout(_any_dim))
            self.row_sums.append(layout and layout(_not_dim_0 if by_rows else _any_dim))
            self.mean_sums.append(layout(_dim_0) if layout and by_rows else None)


def _any_dim(dim: int) -> bool:
    return True


def _not_dim_0(dim: int) -> bool:
    return dim != 0


def _dim_0(dim: int) -> bool:
    return dim == 0


def _dtensor_type() -> type | None:
    """DTensor, or None where torch.distributed is not built in."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def _is_dtensor(*tensors: torch.Tensor) -> bool:
    """Whether any of the tensors is a DTensor (other tensor subclasses are used as they are)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the same storage: in-place ops act on the DTensor), else ``t``."""
    return t.to_local() if _is_dtensor(t) else t


def _shard_sums(
    p: torch.Tensor, grad: torch.Tensor, ema: torch.Tensor
) -> Callable[[Callable[[int], bool]], _ShardSum | None]:
    """For a DTensor parameter, a function of a predicate on tensor dims giving the mesh dims that
    shard such a dim (their local sums must be added up); checks that the layouts fit GAO."""
    if not all(_is_dtensor(t) for t in (p, grad, ema)):
        raise TypeError(
            "a DTensor parameter needs a DTensor gradient and EMA, and a DTensor gradient a "
            f"DTensor parameter; got {type(p).__name__}, {type(grad).__name__} and "
            f"{type(ema).__name__}"
        )
    if not (grad.placements == p.placements == ema.placements):
        raise ValueError(
            f"the gradient ({grad.placements}) and EMA ({ema.placements}) of a DTensor parameter "
            f"must be laid out like it ({p.placements})"
        )
    dims = [_sharded_dim(placement) for placement in p.placements]

    def sums(keep: Callable[[int], bool]) -> _ShardSum | None:
        mesh_dims = tuple(i for i, dim in enumerate(dims) if dim is not None and keep(dim))
        return (p.device_mesh, mesh_dims) if mesh_dims else None

    return sums


def _sharded_dim(placement: Any) -> int | None:
    """The tensor dim a placement splits (Shard, _StridedShard), None if it replicates."""
    if placement.is_replicate():
        return None
    if placement.is_partial() or not hasattr(placement, "dim"):
        raise ValueError(
            f"GradientAlignmentOptimizer needs parameters sharded or replicated, not {placement}"
        )
    return placement.dim


def _sum_over_shards(values: torch.Tensor, sums: Sequence[_ShardSum | None]) -> torch.Tensor:
    """Add up local partial sums across the ranks that hold the other shards.

    ``values`` is (k, n) and column j belongs to a tensor laid out as ``sums[j]`` says (None: the
    column is already whole). Columns with the same layout go through one all-gather per mesh dim,
    summed in rank order, so every rank gets the same bits and equal inputs give equal outputs
    (a cosine of an EMA equal to its gradient is exactly 1 on every rank).
    """
    groups: dict[_ShardSum, list[int]] = defaultdict(list)
    for column, layout in enumerate(sums):
        if layout is not None:
            groups[layout].append(column)
    for (mesh, mesh_dims), columns in groups.items():
        index = torch.tensor(columns, device=values.device)
        part = values.index_select(1, index)
        for mesh_dim in mesh_dims:
            part = _all_gather_sum(part, mesh.get_group(mesh_dim))
        values = values.index_copy(1, index, part)
    return values


def _all_gather_sum(part: torch.Tensor, group: Any) -> torch.Tensor:
    import torch.distributed as dist

    world = dist.get_world_size(group)
    gathered = part.new_empty((world * part.shape[0], *part.shape[1:]))  # ranks' parts, stacked
    # all_gather_single is torch >= 2.13's name of all_gather_into_tensor (deprecated there)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, part.contiguous(), group=group)
    return gathered.view(world, *part.shape).sum(0)


class _Scales(NamedTuple):
    """A step's scales in float64: one per parameter (0-d, or one entry per row shaped to broadcast
    over it) and, when they are all 0-d, the same as one vector."""

    per_param: list[torch.Tensor]
    vector: torch.Tensor | None

    def grad_factors(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """What to multiply the gradients by. A 0-d float64 scale acts in the gradient's dtype;
        float64 rows on float32 gradients would take torch's per-element casting loop."""
        return self.per_param if self.vector is not None else _in_dtypes(self.per_param, grads)

    def update_weights(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """1 - s in each parameter's dtype (lerp's weight must match it), cast as one vector when
        the parameters share a dtype."""
        dtypes = {v.dtype for v in values}
        if self.vector is not None and len(dtypes) == 1:
            return list((1.0 - self.vector).to(dtypes.pop()).unbind(0))
        return _in_dtypes([1.0 - s for s in self.per_param], values)


def _in_dtypes(scales: list[torch.Tensor], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [s.to(t.dtype) for s, t in zip(scales, tensors, strict=True)]


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


def _any_device(params: list[torch.Tensor]) -> torch.device | None:
    return params[0].device if params else None


def _new_ema(p: torch.Tensor) -> torch.Tensor:
    """A zero EMA shaped (and, for a DTensor, sharded) like ``p``."""
    return torch.zeros_like(p, dtype=_ema_dtype(p), memory_format=torch.contiguous_format)


def _ema_dtype(p: torch.Tensor) -> torch.dtype:
    # A bfloat16 EMA with beta=0.99 would lose the (1 - beta) * g increments to rounding.
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype
