"""All-gather with gradient, for InfoNCE across ranks (keys, and queries when symmetric).

Each rank's loss uses every rank's embeddings; backward sums, over ranks, the gradient that
reaches the gathered tensor and hands each rank the slice of its own rows, so gradients flow
back to the embeddings' owners. Ranks may hold different numbers of rows.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist


def distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: list[int], rank: int, group: Any):
        # all_gather needs equal shapes: pad every rank's rows to the largest count.
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded.contiguous(), group=group)
        ctx.offset, ctx.rows, ctx.group = sum(sizes[:rank]), x.shape[0], group
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.offset : ctx.offset + ctx.rows], None, None, None


def all_gather_with_grad(x: torch.Tensor, group: Any = None) -> tuple[torch.Tensor, int]:
    """Rows of ``x`` from every rank, concatenated in rank order, and this rank's first row.

    Every rank must call it (a collective). One host sync: the row counts are gathered first.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    count = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c.item()) for c in counts]
    return _AllGatherWithGrad.apply(x, sizes, rank, group), sum(sizes[:rank])


class _SumGradientOverRanks(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over the group's ranks."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def sum_gradient_over_ranks(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``x`` itself, for a tensor that every rank of ``group`` holds whole and uses with its
    own slice of a tensor-parallel layer: in backward each rank gets the sum over ranks of
    the gradients (the full gradient). Every rank must run the backward (a collective)."""
    return _SumGradientOverRanks.apply(x, group)


FSDP2_HINT = (
    "compute the loss inside the model's forward, where FSDP2 has gathered the weight and "
    "reduces its gradient like every other parameter's: "
    "kd_kernels.integrations.transformers.fuse_kd_forward(model) for a Hugging Face causal LM "
    "(README, 'FSDP2'); for a tensor-parallel (vocabulary-sharded) head pass the local rows "
    "(.to_local()) with process_group=..."
)


def reject_dtensor(**tensors: torch.Tensor | None) -> None:
    """Raises a TypeError naming FSDP2 and the supported paths if a tensor is a DTensor.

    An FSDP2-sharded parameter outside its module's forward is a DTensor (Shard(0)). The
    fused loss cannot take it: gathering it (``full_tensor()``) would leave each rank's shard
    with its own batch's gradient only, never reduced across the data-parallel ranks.
    """
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist yet
        return
    from torch.distributed.tensor import DTensor

    for name, tensor in tensors.items():
        if isinstance(tensor, DTensor):
            raise TypeError(
                f"{name} is a DTensor with placements {tuple(tensor.placements)}, as an "
                "FSDP2-sharded (fully_shard) parameter is outside its module's forward; the "
                f"fused loss needs the whole weight and data-parallel gradients: {FSDP2_HINT}"
            )
