"""All-gather with gradient, for InfoNCE across ranks (keys, and queries when symmetric).

Each rank's loss uses every rank's embeddings; backward sums, over ranks, the gradient that
reaches the gathered tensor and hands each rank the slice of its own rows, so gradients flow
back to the embeddings' owners. Ranks may hold different numbers of rows.
"""

from __future__ import annotations

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
