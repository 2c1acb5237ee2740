"""Fake (meta) implementations and autograd formulas of the kd_kernels ops.

The C++ ops take their schema from csrc/ops.cpp; the Triton ops are Python custom ops with
the same signatures. Both get their fake implementation and their autograd formula here, from
one function per loss, so ``torch.compile(fullgraph=True)`` traces through every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kd_kernels._backend import HAS_EXTENSION


def _kd_loss_forward_fake(
    student: torch.Tensor, teacher: torch.Tensor, *args: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    need_grad = args[-1]
    row_loss = student.new_empty(student.shape[0], dtype=_row_loss_dtype(student))
    grad = torch.empty_like(student) if need_grad else student.new_empty(0)
    return row_loss, grad


def _kd_loss_forward_out_fake(student: torch.Tensor, teacher: torch.Tensor, *args: Any):
    return student.new_empty(student.shape[0], dtype=_row_loss_dtype(student))


def _row_loss_dtype(student: torch.Tensor) -> torch.dtype:
    return torch.float64 if student.dtype == torch.float64 else torch.float32


def _kd_loss_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    _, grad = output
    ctx.mark_non_differentiable(grad)
    # Else autograd would allocate a zero (N, C) gradient for the unused grad output.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad)
    ctx.computed_grad = inputs[-1]


def _kd_loss_backward(ctx: Any, grad_row_loss: torch.Tensor | None, _: Any) -> tuple:
    if grad_row_loss is None:  # grads are not materialised: the loss was not used
        return (None,) * 12
    if not ctx.computed_grad:
        raise RuntimeError(
            "kd_loss: the gradient was not computed in forward (need_grad=False); "
            "call kd_loss with grad enabled and a student that requires grad"
        )
    (grad,) = ctx.saved_tensors
    # The forward already holds d row_loss / d student; backward only scales each row.
    grad_student = grad * grad_row_loss.unsqueeze(-1).to(grad.dtype)
    return (grad_student,) + (None,) * 11


def register_kd_loss_ops(forward_op: str, forward_out_op: str) -> None:
    """Registers fake implementations and autograd for one backend's pair of KD ops."""
    torch.library.register_fake(forward_op)(_kd_loss_forward_fake)
    torch.library.register_fake(forward_out_op)(_kd_loss_forward_out_fake)
    torch.library.register_autograd(
        forward_op, _kd_loss_backward, setup_context=_kd_loss_setup_context
    )


class KDLossWithGrad(torch.autograd.Function):
    """kd_loss's autograd outside ``torch.compile``: forward runs the backend's ``*_out`` op,
    which writes d row_loss / d student along with the loss, and reduces the row losses;
    backward scales the gradient (by grad_output / divisor, or per row for ``"none"``).

    ``divisor``: None returns the (N,) row losses; else the sum of the row losses divided by
    it (an int, or a 0-dim count on the device). The gradient buffer is a new (N, C) tensor
    (backward scales a copy, so it may run twice), or with ``inplace`` the student's own
    storage: no allocation, backward scales it in place and runs once; the op bumps the
    student's version counter, so autograd raises a clear error if anything else saved the
    logits. The formula of the op's registered autograd, in one node and without
    torch.library's per-call Python (filling the schema's defaults, ~60-150 us a call), which
    decided the time of GLUE-head-sized losses.
    """

    @staticmethod
    def forward(
        ctx: Any,
        student: torch.Tensor,
        forward_out: Callable,
        inplace: bool,
        divisor: torch.Tensor | int | None,
        *op_args: Any,
    ) -> torch.Tensor:
        grad = student if inplace else torch.empty_like(student)
        row_loss = forward_out(student, *op_args, grad)
        ctx.grad_storage, ctx.inplace, ctx.divisor = grad, inplace, divisor
        return row_loss if divisor is None else row_loss.sum() / divisor

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple:
        grad = ctx.grad_storage
        if grad is None:
            raise RuntimeError("kd_loss(inplace_grad=True): backward can run only once")
        # "none": one weight per row; else the scalar reduction's weight of every row.
        scale = grad_loss.unsqueeze(-1) if ctx.divisor is None else grad_loss / ctx.divisor
        scale = scale.to(grad.dtype)
        if ctx.inplace:
            ctx.grad_storage = None
            grad_student = grad.mul_(scale)
        else:
            grad_student = grad * scale
        return (grad_student, None, None, None) + (None,) * 10


def _layer_mse_forward_fake(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    mask: torch.Tensor | None,
    threshold: float | None,
    mask_columns: bool,
) -> torch.Tensor:
    total_rows = sum(s.shape[0] * s.shape[1] * s.shape[2] for s in student)
    return student[0].new_empty(total_rows, dtype=_row_loss_dtype(student[0]))


def _layer_mse_backward_fake(grad_rows: torch.Tensor, student: list[torch.Tensor], *args: Any):
    return [torch.empty(s.shape, dtype=s.dtype, device=s.device) for s in student]


def _layer_mse_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    student, teacher, mask, threshold, mask_columns = inputs
    # Backward recomputes the gradient from the inputs themselves: nothing new is kept.
    ctx.save_for_backward(*student, *teacher, mask)
    ctx.layers, ctx.threshold, ctx.mask_columns = len(student), threshold, mask_columns


def register_layer_mse_ops(forward_op: str, backward_op: str, backward: Callable) -> None:
    """Registers fake implementations of one backend's layer MSE pair and the forward's
    autograd, which calls ``backward`` (the backward op) on the saved inputs."""
    torch.library.register_fake(forward_op)(_layer_mse_forward_fake)
    torch.library.register_fake(backward_op)(_layer_mse_backward_fake)

    def layer_mse_autograd(ctx: Any, grad_rows: torch.Tensor) -> tuple:
        saved = ctx.saved_tensors
        student, teacher = list(saved[: ctx.layers]), list(saved[ctx.layers : 2 * ctx.layers])
        grads = backward(grad_rows, student, teacher, saved[-1], ctx.threshold, ctx.mask_columns)
        return grads, [None] * ctx.layers, None, None, None

    torch.library.register_autograd(
        forward_op, layer_mse_autograd, setup_context=_layer_mse_setup_context
    )


def _info_nce_forward_fake(
    query: torch.Tensor,
    key: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    cosine: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = _row_loss_dtype(query)
    return query.new_empty(query.shape[0], dtype=dtype), query.new_empty(
        query.shape[0], dtype=dtype
    )


def _info_nce_backward_fake(
    grad_loss: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    lse: torch.Tensor,
    cosine: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_temperature = temperature.new_empty(())
    return torch.empty_like(query), torch.empty_like(key), grad_temperature


def _info_nce_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    query, key, labels, temperature, cosine = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(query, key, labels, temperature, lse)
    ctx.cosine = cosine


def _info_nce_fused_fake(
    query: torch.Tensor,
    key: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    cosine: bool,
    row_weight: torch.Tensor,
    symmetric: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    losses = query.new_empty(query.shape[0], dtype=_row_loss_dtype(query))
    return losses, torch.empty_like(query), torch.empty_like(key), temperature.new_empty(())


def _info_nce_fused_not_differentiable(ctx: Any, *grads: Any) -> tuple:
    raise RuntimeError(
        "kd_kernels::info_nce_fused returns its own gradients and cannot be differentiated; "
        "call kd_kernels.info_nce_loss, whose autograd uses them"
    )


def register_info_nce_fused_op(fused_op: str) -> None:
    """Registers the fake implementation of one backend's ``info_nce_fused`` op and an
    autograd formula that refuses: the op returns its own gradients."""
    torch.library.register_fake(fused_op)(_info_nce_fused_fake)
    torch.library.register_autograd(
        fused_op, _info_nce_fused_not_differentiable, setup_context=lambda ctx, inputs, output: None
    )


class InfoNCEGradInForward(torch.autograd.Function):
    """info_nce_loss reduced by ``"mean"`` or ``"sum"`` on the cpu, cuda and triton backends.

    The row weights of the objective are known in forward (1/N or 1), so forward runs the
    backend's fused op (``fused``: ``torch.ops.kd_kernels.info_nce_fused`` or its Triton twin
    ``info_nce_fused_triton``), which forms the gradients along with the loss: on cpu/cuda
    three matmuls where the forward op plus a backward that recomputes the similarities take
    four (Triton, which never holds a block of similarities: four where it took five), and
    for the symmetric loss one walk for both directions instead of one per direction.
    Backward only scales the gradients by the scalar ``grad_output`` (out of place: it may
    run twice).
    """

    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        labels: torch.Tensor,
        temperature: torch.Tensor,
        cosine: bool,
        symmetric: bool,
        reduction: str,
        fused: Callable,
    ) -> torch.Tensor:
        count = query.shape[0]
        weight = 1.0 / count if reduction == "mean" else 1.0
        row_weight = torch.full((count,), weight, dtype=temperature.dtype, device=query.device)
        losses, grad_query, grad_key, grad_temperature = fused(
            query, key, labels, temperature, cosine, row_weight, symmetric
        )
        ctx.save_for_backward(grad_query, grad_key, grad_temperature)
        return losses.mean() if reduction == "mean" else losses.sum()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        grad_query, grad_key, grad_temperature = ctx.saved_tensors
        return (
            grad_query * grad_output.to(grad_query.dtype),
            grad_key * grad_output.to(grad_key.dtype),
            None,
            grad_temperature * grad_output.to(grad_temperature.dtype),
            None,
            None,
            None,
            None,
        )


def register_info_nce_ops(forward_op: str, backward_op: str, backward: Callable) -> None:
    """Registers fake implementations of one backend's InfoNCE pair and the forward's autograd,
    which recomputes the similarities block by block in ``backward`` (the backward op)."""
    torch.library.register_fake(forward_op)(_info_nce_forward_fake)
    torch.library.register_fake(backward_op)(_info_nce_backward_fake)

    def info_nce_autograd(ctx: Any, grad_loss: torch.Tensor | None, _: Any) -> tuple:
        if grad_loss is None:  # grads are not materialised: the loss was not used
            return None, None, None, None, None
        query, key, labels, temperature, lse = ctx.saved_tensors
        grad_query, grad_key, grad_temperature = backward(
            grad_loss.contiguous(), query, key, labels, temperature, lse, ctx.cosine
        )
        return grad_query, grad_key, None, grad_temperature, None

    torch.library.register_autograd(
        forward_op, info_nce_autograd, setup_context=_info_nce_setup_context
    )


if HAS_EXTENSION:
    register_kd_loss_ops("kd_kernels::kd_loss_forward", "kd_kernels::kd_loss_forward_out")
    register_layer_mse_ops(
        "kd_kernels::layer_mse_forward",
        "kd_kernels::layer_mse_backward",
        torch.ops.kd_kernels.layer_mse_backward,
    )
    register_info_nce_ops(
        "kd_kernels::info_nce_forward",
        "kd_kernels::info_nce_backward",
        torch.ops.kd_kernels.info_nce_backward,
    )
    register_info_nce_fused_op("kd_kernels::info_nce_fused")
