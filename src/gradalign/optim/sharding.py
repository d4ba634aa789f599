"""Sharded parameters: FSDP2's DTensors, whose cosines need sums over the ranks that hold the
other shards, and FSDP1's flat shards, which cannot give a tensor's cosine at all."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

# A sharded tensor's mesh and the mesh dimensions over which its local sums add up to the whole's.
ShardSum = tuple[Any, tuple[int, ...]]


def refuse_fsdp1(params: Iterable[torch.Tensor]) -> None:
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


def _dtensor_type() -> type | None:
    """DTensor, or None where torch.distributed is not built in."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def is_dtensor(*tensors: torch.Tensor) -> bool:
    """Whether any of the tensors is a DTensor (other tensor subclasses are used as they are)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the same storage: in-place ops act on the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


@torch._disable_dynamo  # in a compiled step a DTensor's shape is symbolic, which from_local refuses
def like(t: torch.Tensor, local_tensor: torch.Tensor) -> torch.Tensor:
    """``local_tensor``, a local shard computed for the DTensor ``t``, as a DTensor laid out as
    ``t`` (its shape and strides given: a shard may be uneven)."""
    return type(t).from_local(
        local_tensor,
        t.device_mesh,
        t.placements,
        run_check=False,
        shape=t.shape,
        stride=t.stride(),
    )


def shard_sums(
    p: torch.Tensor, grad: torch.Tensor, ema: torch.Tensor
) -> tuple[ShardSum | None, ShardSum | None, ShardSum | None]:
    """For a DTensor parameter, the layouts over which local sums add up to the whole's: of the
    tensor, of one of its rows (a slice along dim 0; a 0/1-d tensor is one row) and of its row
    scales (None: nothing to add up). Checks that the layouts fit GAO."""
    if not all(is_dtensor(t) for t in (p, grad, ema)):
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
    sharded = [i for i, dim in enumerate(dims) if dim is not None]  # mesh dims
    if p.dim() < 2:  # one row: the tensor, whose one scale needs no sum
        return _layout(p, sharded), _layout(p, sharded), None
    rows = [i for i in sharded if dims[i] != 0]  # a row is split by the dims past dim 0
    return _layout(p, sharded), _layout(p, rows), _layout(p, [i for i in sharded if dims[i] == 0])


def _layout(p: torch.Tensor, mesh_dims: list[int]) -> ShardSum | None:
    return (p.device_mesh, tuple(mesh_dims)) if mesh_dims else None


def _sharded_dim(placement: Any) -> int | None:
    """The tensor dim a placement splits (Shard, _StridedShard), None if it replicates."""
    if placement.is_replicate():
        return None
    if placement.is_partial() or not hasattr(placement, "dim"):
        raise ValueError(
            f"GradientAlignmentOptimizer needs parameters sharded or replicated, not {placement}"
        )
    return placement.dim


def sum_over_shards(values: torch.Tensor, sums: Sequence[ShardSum | None]) -> torch.Tensor:
    """Add up local partial sums across the ranks that hold the other shards.

    ``values`` is (k, n) and column j belongs to a tensor laid out as ``sums[j]`` says (None: the
    column is already whole). Columns with the same layout go through one all-gather per mesh dim,
    summed in rank order, so every rank gets the same bits and equal inputs give equal outputs
    (a cosine of an EMA equal to its gradient is exactly 1 on every rank).
    """
    groups: dict[ShardSum, list[int]] = defaultdict(list)
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
