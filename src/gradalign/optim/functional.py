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


def cosine_scales(products: torch.Tensor, min_scale: float, eps: float) -> torch.Tensor:
    """clamp(cos(g, m), min_scale, 1) in float64 from stacked products [g.m, g.g, m.m] (each
    row over the slices that get one cosine); 0 where a norm is 0, whatever ``min_scale``."""
    dot, grad_square, ema_square = products.double().unbind(0)
    norm_product = (grad_square * ema_square).sqrt()
    scale = (dot / norm_product.clamp_min(eps)).clamp_(min_scale, 1.0)
    if min_scale > 0:  # with min_scale = 0 the clamp already gives 0 for a zero norm
        scale.masked_fill_(norm_product == 0, 0.0)
    return scale


def tensor_scales(
    flat_grads: list[torch.Tensor],
    flat_emas: list[torch.Tensor],
    whole: bool,
    min_scale: float,
    eps: float,
    sums: Layouts = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One 0-d scale per tensor (of flat gradients and EMAs), or one for all of them together
    (``whole``: granularity "global"), and the same as a vector."""
    products = torch.stack(
        [torch.dot(g, m) for g, m in zip(flat_grads, flat_emas, strict=True)]
        + [torch.dot(g, g) for g in flat_grads]
        + [torch.dot(m, m) for m in flat_emas]
    ).view(3, -1)
    if sums is not None:
        products = sum_over_shards(products, sums)
    if whole:
        scale = cosine_scales(products.sum(1), min_scale, eps)
        return [scale] * len(flat_grads), scale.expand(len(flat_grads))
    scale = cosine_scales(products, min_scale, eps)
    return list(scale.unbind(0)), scale


def row_scales(
    grads: list[torch.Tensor],
    emas: list[torch.Tensor],
    shapes: list[torch.Size],
    min_scale: float,
    eps: float,
    row_sums: Layouts = None,
    mean_sums: Layouts = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One scale per output unit (slice along dim 0) of each tensor whose parameter (of
    ``shapes``) has >= 2 dims (one for a 0/1-d one), shaped to broadcast over the gradient, and
    each parameter's mean scale. The cosines of all rows are one ``cosine_scales`` call
    (elementwise: the same bits as one per tensor). Under FSDP2 a gradient is a shard of the
    parameter: ``row_sums`` lay out its rows' products, ``mean_sums`` its row scales' sum."""
    by_rows = [len(shape) >= 2 for shape in shapes]
    rows = [g.shape[0] if r else 1 for g, r in zip(grads, by_rows, strict=True)]
    products = []
    for g, m, n in zip(grads, emas, rows, strict=True):
        shape = (n, g.numel() // n if n else 0)  # an FSDP2 shard may hold no row at all
        g_rows, m_rows = g.reshape(shape), m.reshape(shape)
        dot, grad_square = (g_rows * m_rows).sum(1), g_rows.square().sum(1)
        products.append(torch.stack([dot, grad_square, m_rows.square().sum(1)]))
    products = torch.cat(products, 1)
    if row_sums is not None:
        per_row_sums = [s for s, n in zip(row_sums, rows, strict=True) for _ in range(n)]
        products = sum_over_shards(products, per_row_sums)
    per_row = cosine_scales(products, min_scale, eps).split(rows)
    scales = [
        s.view((n,) + (1,) * (g.dim() - 1) if r else ())
        for s, n, g, r in zip(per_row, rows, grads, by_rows, strict=True)
    ]
    sums = torch.stack([s.sum() for s in per_row]).view(1, -1)
    if mean_sums is not None:
        sums = sum_over_shards(sums, mean_sums)
    counts = [shape[0] if r else 1 for shape, r in zip(shapes, by_rows, strict=True)]
    return scales, sums.view(-1) / torch.tensor(counts, dtype=sums.dtype, device=sums.device)


def stacked_scales(
    grads: list[torch.Tensor],
    emas: list[torch.Tensor],
    shapes: list[torch.Size],
    stack_dims: int,
    granularity: str,
    min_scale: float,
    eps: float,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-model scales of stacked tensors (the leading ``stack_dims`` dims of the parameters,
    of ``shapes``, index models), shaped to broadcast over each gradient, and each parameter's
    mean scale per model, shaped (parameters, *models). Each tensor is cut into the slices that
    get one cosine (a model's tensor, or a model's row) and all their cosines are one
    ``cosine_scales`` call."""
    models = tuple(grads[0].shape[:stack_dims])
    n_models = math.prod(models)
    leads = [
        stack_dims + 1 if granularity == "row" and len(shape) > stack_dims + 1 else stack_dims
        for shape in shapes
    ]
    slices, products = [], []
    for g, m, lead in zip(grads, emas, leads, strict=True):
        n = math.prod(g.shape[:lead])
        g_rows, m_rows = g.reshape(n, -1), m.reshape(n, -1)
        dot, grad_square = (g_rows * m_rows).sum(1), g_rows.square().sum(1)
        products.append(torch.stack([dot, grad_square, m_rows.square().sum(1)]))
        slices.append(n)
    products = torch.cat(products, 1)
    if granularity == "global":  # each tensor is one slice per model: add them up
        scale = cosine_scales(products.view(3, len(grads), n_models).sum(1), min_scale, eps)
        per_slice = [scale] * len(grads)
        means = scale.expand(len(grads), n_models)
    else:
        per_slice = cosine_scales(products, min_scale, eps).split(slices)
        means = torch.stack([s.view(n_models, -1).mean(1) for s in per_slice])
    scales = [
        s.view(*g.shape[:lead], *(1,) * (g.dim() - lead))
        for s, g, lead in zip(per_slice, grads, leads, strict=True)
    ]
    return scales, means.view(len(grads), *models)


class Scales(NamedTuple):
    """A step's scales in float64: one per tensor (0-d, or one entry per row or model shaped to
    broadcast over it) and, when they are all 0-d, the same as one vector."""

    per_param: list[torch.Tensor]
    vector: torch.Tensor | None

    def grad_factors(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """What to multiply the gradients by. A 0-d float64 scale acts in the gradient's dtype;
        float64 rows on float32 gradients would take torch's per-element casting loop."""
        return self.per_param if self.vector is not None else in_dtypes(self.per_param, grads)

    def update_weights(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """1 - s in each parameter's dtype (lerp's weight must match it), cast as one vector when
        the parameters share a dtype."""
        dtypes = {v.dtype for v in values}
        if self.vector is not None and len(dtypes) == 1:
            return list((1.0 - self.vector).to(dtypes.pop()).unbind(0))
        return in_dtypes([1.0 - s for s in self.per_param], values)


def in_dtypes(scales: list[torch.Tensor], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [s.to(t.dtype) for s, t in zip(scales, tensors, strict=True)]
