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
optimizer's own objects (not copies), so LR schedulers, ``add_param_group`` and
``load_state_dict`` act on the base directly. Only torch is imported here, so the module can be
dropped into any PyTorch project.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

TARGETS = ("grad", "update")
GRANULARITIES = ("tensor", "global", "row")
_EMA_KEY = "gao_ema"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _resolve_base(base: type[Optimizer] | str | None) -> type[Optimizer]:
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


def _validate(beta: float, target: str, granularity: str, min_scale: float, eps: float) -> None:
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
        beta: decay of the gradient EMA, in [0, 1).
        target: ``"grad"`` scales the gradient before the base step (the note's method);
            ``"update"`` scales the parameter change the base step makes.
        granularity: ``"tensor"`` one cosine per parameter tensor (the note's method), ``"global"``
            one cosine over all parameters, ``"row"`` one per output unit (slice along dim 0;
            0/1-d tensors such as biases get one scale each).
        min_scale: lower clamp of the scale, in [0, 1].
        eps: floor of the norm product in the cosine's denominator; it only guards the division
            (a zero gradient or EMA gives s = 0 whatever eps is).
        **base_kwargs: keyword arguments of ``base`` (``lr``, ``weight_decay``, ...).

    After each step ``last_scales`` holds the mean scale applied to every parameter, in
    ``param_groups`` order (NaN where a parameter had no gradient), as a float32 tensor on the
    parameters' device, for logging without a host synchronisation.
    """

    def __init__(
        self,
        params_or_optimizer: Optimizer | Iterable[Any],
        base: type[Optimizer] | str | None = None,
        *,
        beta: float = 0.9,
        target: str = "grad",
        granularity: str = "tensor",
        min_scale: float = 0.0,
        eps: float = 1e-30,
        **base_kwargs: Any,
    ) -> None:
        _validate(beta, target, granularity, min_scale, eps)
        if isinstance(params_or_optimizer, Optimizer):
            if base is not None or base_kwargs:
                raise TypeError(
                    "wrapping an optimizer instance takes no base or base keyword arguments; "
                    f"got base={base!r}, {sorted(base_kwargs)}"
                )
            self.base = params_or_optimizer
        else:
            self.base = _resolve_base(base)(params_or_optimizer, **base_kwargs)
        self.beta = beta
        self.target = target
        self.granularity = granularity
        self.min_scale = min_scale
        self.eps = eps
        self.last_scales: torch.Tensor | None = None
        self._ema: dict[torch.Tensor, torch.Tensor] = {}
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
        """The base optimizer's per-parameter state (the EMA lives in ``ema_state``)."""
        return self.base.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base.defaults

    @property
    def ema_state(self) -> dict[torch.Tensor, torch.Tensor]:
        """The gradient EMA per parameter (a view, shaped like it): all the state GAO keeps."""
        return {p: ema.view(p.shape) for p, ema in self._ema.items()}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return (
            f"GradientAlignmentOptimizer(beta={self.beta}, target={self.target!r}, "
            f"granularity={self.granularity!r}, min_scale={self.min_scale}, eps={self.eps}, "
            f"base={self.base!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer's own pickling keeps only defaults/state/param_groups, which live on the base.
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # --- checkpointing ---------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict with each parameter's EMA under ``"gao_ema"``."""
        state_dict = self.base.state_dict()
        state = dict(state_dict["state"])
        for index, p in enumerate(self._params()):
            ema = self._ema.get(p)
            if ema is not None:
                state[index] = {**state.get(index, {}), _EMA_KEY: ema.view(p.shape)}
        return {**state_dict, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the base state and the EMAs, so a resumed run continues exactly."""
        base_state: dict[Any, Any] = {}
        emas: dict[int, torch.Tensor] = {}
        for index, entry in state_dict["state"].items():
            rest = {k: v for k, v in entry.items() if k != _EMA_KEY}
            if _EMA_KEY in entry:
                emas[int(index)] = entry[_EMA_KEY]
            if rest:
                base_state[index] = rest
        self.base.load_state_dict({**state_dict, "state": base_state})
        params = self._params()
        self._ema = {
            params[i]: ema.to(device=params[i].device, dtype=_ema_dtype(params[i]))
            .flatten()
            .clone()
            for i, ema in emas.items()
        }

    # --- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate ``closure`` (if any), compute the alignment scales, and step the base."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, scales = self._align()
        if self.target == "grad":
            if params:
                if self.granularity == "row":  # as the 0-d scales of the other granularities act:
                    # in the EMA's precision; float64 rows on float32 grads take a casting loop
                    scales = [s.to(_ema_dtype(p)) for p, s in zip(params, scales, strict=True)]
                torch._foreach_mul_([p.grad for p in params], scales)
            self.base.step()
        else:
            before = [p.clone() for p in params]
            self.base.step()
            if params:
                weights = [(1.0 - s).to(p.dtype) for p, s in zip(params, scales, strict=True)]
                torch._foreach_lerp_(params, before, weights)  # before + s * (after - before)
        return loss

    def _align(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Update the EMAs and return the parameters that have a gradient with their scales.

        Each scale broadcasts over its parameter (0-d, or one entry per row). Parameters without a
        gradient are skipped and keep their EMA.
        """
        all_params = self._params()
        params, indices = [], []
        for index, p in enumerate(all_params):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    "GradientAlignmentOptimizer does not support sparse gradients "
                    f"(parameter {index} of shape {tuple(p.shape)} has one)"
                )
            params.append(p)
            indices.append(index)
        if not params:  # no gradient at all: every scale NaN, as for each absent one below
            device = all_params[0].device if all_params else None
            self._record(torch.empty(0, device=device), [], len(all_params))
            return [], []
        emas = [self._flat_ema(p) for p in params]
        grads = [
            p.grad.reshape(-1) if p.grad.dtype == m.dtype else p.grad.reshape(-1).to(m.dtype)
            for p, m in zip(params, emas, strict=True)
        ]
        devices = {g.device for g in grads}
        if len(devices) > 1:
            raise RuntimeError(
                "GradientAlignmentOptimizer needs all parameters with gradients on one device, "
                f"got {sorted(map(str, devices))}"
            )
        torch._foreach_lerp_(emas, grads, 1.0 - self.beta)
        if self.granularity == "row":
            scales, means = self._row_scales(grads, emas, params)
        else:
            scales, means = self._tensor_scales(grads, emas)
        self._record(means, indices, len(all_params))
        return params, scales

    def _flat_ema(self, p: torch.Tensor) -> torch.Tensor:
        """The EMA of ``p``, created at zero on first use; kept flat so a step needs no reshape."""
        ema = self._ema.get(p)
        if ema is None:
            ema = self._ema[p] = torch.zeros(p.numel(), dtype=_ema_dtype(p), device=p.device)
        return ema

    def _tensor_scales(
        self, grads: list[torch.Tensor], emas: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One scale per tensor (or one for all), with no host synchronisation.

        On small models a step costs its number of torch calls, not its arithmetic: every call
        here is one per step or one per tensor, on flat views.
        """
        products = torch.stack(
            [torch.dot(g, m) for g, m in zip(grads, emas, strict=True)]
            + [torch.dot(g, g) for g in grads]
            + [torch.dot(m, m) for m in emas]
        ).view(3, -1)
        if self.granularity == "global":
            scale = self._scale(products.sum(1))
            return [scale] * len(grads), scale.expand(len(grads))
        scale = self._scale(products)
        return list(scale.unbind(0)), scale

    def _row_scales(
        self, grads: list[torch.Tensor], emas: list[torch.Tensor], params: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One scale per output unit (slice along dim 0) of each parameter, shaped to broadcast
        over it, and each parameter's mean scale. The cosines of all rows of all parameters are
        one ``_scale`` call (elementwise, so the same bits as one call per parameter)."""
        rows = [p.shape[0] if p.dim() >= 2 else 1 for p in params]
        products = []
        for g, m, n in zip(grads, emas, rows, strict=True):
            g_rows, m_rows = g.view(n, -1), m.view(n, -1)
            dot, grad_square = (g_rows * m_rows).sum(1), g_rows.square().sum(1)
            products.append(torch.stack([dot, grad_square, m_rows.square().sum(1)]))
        per_row = self._scale(torch.cat(products, 1)).split(rows)
        scales = [
            s.view((n,) + (1,) * (p.dim() - 1) if n > 1 else ())
            for s, n, p in zip(per_row, rows, params, strict=True)
        ]
        return scales, torch.stack([s.mean() for s in scales])

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

    def _record(self, means: torch.Tensor, indices: list[int], n_params: int) -> None:
        means = means.float()
        if len(indices) == n_params:
            self.last_scales = means
            return
        last = torch.full((n_params,), float("nan"), device=means.device)
        last[torch.tensor(indices, dtype=torch.long, device=means.device)] = means
        self.last_scales = last


def _ema_dtype(p: torch.Tensor) -> torch.dtype:
    # A bfloat16 EMA with beta=0.99 would lose the (1 - beta) * g increments to rounding.
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype
