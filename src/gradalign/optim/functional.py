"""GAO's arithmetic on lists of tensors: the alignment scales of a step from the gradients and
their EMAs (already updated), for each granularity, with no host synchronisation.

On small models a step costs its number of torch calls, not its arithmetic: every call here is
one per step or one per tensor. The cosine is g.m / sqrt(g.g * m.m) with the three products from
the same kernel, in float64, so m == g gives exactly 1 (sqrt(x * x) == x) and g.g * m.m does not
underflow. Sharded (FSDP2) tensors pass their local products through ``sharding.sum_over_shards``
with the layouts given; None means nothing is sharded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from gradalign.optim.sharding import ShardSum, sum_over_shards

LOW_PRECISION = (torch.float16, torch.bfloat16)
Layouts = Sequence[ShardSum | None] | None


def ema_dtype(p: torch.Tensor) -> torch.dtype:
    """The EMA's dtype: a bfloat16 EMA with beta=0.99 would lose the (1 - beta) * g increments
    to rounding, so low-precision parameters keep a float32 one."""
    return torch.float32 if p.dtype in LOW_PRECISION else p.dtype


def new_ema(p: torch.Tensor) -> torch.Tensor:
    """A zero EMA shaped (and, for a DTensor, sharded) like ``p``."""
    return torch.zeros_like(p, dtype=ema_dtype(p), memory_format=torch.contiguous_format)


def real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor's real view (a trailing dim of 2: real and imaginary parts), as torch's
    optimizers read complex parameters; any other tensor as it is."""
    return torch.view_as_real(t) if t.is_complex() else t


def host_readable(t: torch.Tensor) -> bool:
    """Whether a value computed from ``t`` can be read on the host for free: on the CPU, in an
    eager step (an accelerator would have to synchronise; a compiled step would break its graph).
    """
    return t.is_cpu and not torch.compiler.is_compiling()


def all_finite(values: list[torch.Tensor]) -> bool:
    """Whether every one of ``values`` (0-d tensors) is finite: one host read."""
    return all(map(math.isfinite, torch.stack(values).tolist()))


def complex_like(like: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values``, a real view computed for ``like``, as a complex tensor if ``like`` is one."""
    return torch.view_as_complex(values) if like.is_complex() else values


def zeroed(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients as GAO reads them for its EMA and its cosine: every element that is not
    finite (NaN, inf) as 0; copies, so the gradients stay the caller's."""
    return [torch.nan_to_num(g, 0.0, 0.0, 0.0) for g in grads]


def readable(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """``zeroed(grads)``, or the gradients themselves where a host read can tell that every
    element is finite (the common case, on the CPU: ``host_readable``)."""
    if host_readable(grads[0]) and all_finite(torch._foreach_norm(grads)):  # inf/NaN if one is
        return grads
    return zeroed(grads)


def cosine_scales(products: torch.Tensor, min_scale: float, eps: float) -> torch.Tensor:
    """clamp(cos(g, m), min_scale, 1) in float64 from stacked products [g.m, g.g, m.m] (each
    row over the slices that get one cosine); 0 where a norm is 0, whatever ``min_scale``."""
    dot, grad_square, ema_square = products.double().unbind(0)  # views of a float64 copy
    norm_product = grad_square.mul_(ema_square).sqrt_()
    if min_scale == 0:  # the clamp gives 0 for a zero norm
        return dot.div_(norm_product.clamp_min_(eps)).clamp_(0.0, 1.0)
    scale = dot.div_(norm_product.clamp_min(eps)).clamp_(min_scale, 1.0)
    return scale.masked_fill_(norm_product == 0, 0.0)


def squares(flat: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each flat tensor's dot product with itself, by the kernel of the cosine's g.m."""
    return [torch.dot(t, t) for t in flat]


def tensor_scales(
    flat_grads: list[torch.Tensor],
    flat_emas: list[torch.Tensor],
    grad_squares: list[torch.Tensor],
    whole: bool,
    min_scale: float,
    eps: float,
    sums: Layouts = None,
) -> torch.Tensor:
    """One scale per tensor (of flat gradients, their ``squares`` and flat EMAs), or the one of
    all of them together for each (``whole``: granularity "global"), as a vector."""
    products = torch.stack(
        [torch.dot(g, m) for g, m in zip(flat_grads, flat_emas, strict=True)]
        + grad_squares
        + squares(flat_emas)
    ).view(3, -1)
    if sums is not None:
        products = sum_over_shards(products, sums)
    if whole:
        return cosine_scales(products.sum(1), min_scale, eps).expand(len(flat_grads))
    return cosine_scales(products, min_scale, eps)


def slice_scales(
    grads: list[torch.Tensor],
    emas: list[torch.Tensor],
    shapes: list[torch.Size],
    stack_dims: int,
    granularity: str,
    min_scale: float,
    eps: float,
    row_sums: Layouts = None,
    mean_sums: Layouts = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The scales of a step that cuts tensors into slices, each slice one cosine: per model
    (the leading ``stack_dims`` dims of the parameters, of ``shapes``, index models) and, for
    ``"row"``, per output unit (the next dim, of a parameter with one beyond it; a 0/1-d
    parameter's own tensor is one "row"); for ``"global"`` one cosine per model over all its
    tensors. Returns the scales shaped to broadcast over each gradient, and each parameter's
    mean scale per model, shaped (parameters, *models). The cosines of all slices are one
    ``cosine_scales`` call (elementwise: the same bits as one per tensor). Under FSDP2
    (``stack_dims=0``) a gradient is a shard of the parameter: ``row_sums`` lay out its rows'
    products, ``mean_sums`` its row scales' sum."""
    models = tuple(grads[0].shape[:stack_dims])
    n_models = math.prod(models)
    leads = [
        stack_dims + 1 if granularity == "row" and len(shape) > stack_dims + 1 else stack_dims
        for shape in shapes
    ]
    slices, products = [], []
    for g, m, lead in zip(grads, emas, leads, strict=True):
        n = math.prod(g.shape[:lead])
        shape = (n, g.numel() // n if n else 0)  # an FSDP2 shard may hold no row at all
        g_rows, m_rows = g.reshape(shape), m.reshape(shape)
        dot, grad_square = (g_rows * m_rows).sum(1), g_rows.square().sum(1)
        products.append(torch.stack([dot, grad_square, m_rows.square().sum(1)]))
        slices.append(n)
    products = torch.cat(products, 1)
    if row_sums is not None:
        per_row_sums = [s for s, n in zip(row_sums, slices, strict=True) for _ in range(n)]
        products = sum_over_shards(products, per_row_sums)
    if granularity == "global":  # each tensor is one slice per model: add them up
        scale = cosine_scales(products.view(3, len(grads), n_models).sum(1), min_scale, eps)
        per_slice = [scale] * len(grads)
        means = scale.expand(len(grads), n_models)
    else:
        per_slice = cosine_scales(products, min_scale, eps).split(slices)
        if mean_sums is None:
            means = torch.stack([s.view(n_models, -1).mean(1) for s in per_slice])
        else:  # sharded, so one model: add the shards' sums, then divide by the rows
            sums = torch.stack([s.view(n_models, -1).sum(1) for s in per_slice])
            sums = sum_over_shards(sums.view(1, -1), mean_sums).view(-1, 1)
            counts = [
                math.prod(shape[stack_dims:lead]) for shape, lead in zip(shapes, leads, strict=True)
            ]
            means = sums / torch.tensor(counts, dtype=sums.dtype, device=sums.device).view(-1, 1)
    scales = [
        s.view(tuple(g.shape[:lead]) + (1,) * (g.dim() - lead))
        for s, g, lead in zip(per_slice, grads, leads, strict=True)
    ]
    return scales, means.view(len(grads), *models)


class Scales(NamedTuple):
    """A step's scales in float64: one vector of a 0-d scale per tensor, or a list of scales each
    shaped to broadcast over its tensor (one per row or model)."""

    vector: torch.Tensor | None
    per_param: list[torch.Tensor] | None = None

    def grad_factors(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """s in each gradient's dtype (a 0-d float64 scale would make a float64 product; float64
        rows on float32 gradients would take torch's per-element casting loop)."""
        return self._in_dtypes(self.vector, self.per_param, grads)

    def update_weights(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """1 - s in each parameter's dtype (lerp's weight must match it)."""
        if self.vector is not None:
            return self._in_dtypes(1.0 - self.vector, None, values)
        return self._in_dtypes(None, [1.0 - s for s in self.per_param], values)

    @staticmethod
    def _in_dtypes(
        vector: torch.Tensor | None,
        per_param: list[torch.Tensor] | None,
        tensors: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """The scales in ``tensors``' dtypes, cast as one vector when they share one."""
        dtypes = {t.dtype for t in tensors}
        if vector is not None and len(dtypes) == 1:
            return list(vector.to(dtypes.pop()).unbind(0))
        scales = per_param if vector is None else vector.unbind(0)
        return [s.to(t.dtype) for s, t in zip(scales, tensors, strict=True)]
