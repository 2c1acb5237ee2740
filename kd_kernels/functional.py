"""Public loss functions: argument checks, shape normalisation and backend dispatch.

Each function accepts any float dtype, returns the loss in float32 (float64 for float64
input on the cpu/torch backends) and gives gradients in the input's dtype.
"""

from __future__ import annotations

import torch

from kd_kernels import _ops, reference
from kd_kernels._backend import resolve_backend
from kd_kernels._checks import (
    check_choice,
    check_float_tensor,
    check_row_tensor,
    check_same_device,
    check_temperature,
    labels_out_of_range,
)

__all__ = ["kd_loss"]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    kind: str = "kl",
    reduction: str = "batchmean",
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    beta: float = 0.5,
    scale_t2: bool = True,
    inplace_grad: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Temperature-softmax knowledge-distillation loss, fused.

    Args:
        student_logits: (..., C) float tensor; the only input that receives a gradient.
        teacher_logits: (..., C) like the student, or (K, ..., C) for an ensemble of K
            teachers whose probabilities (not logits) are averaged, as in MT-DNN-KD.
        temperature: t > 0. With p_S = softmax(student / t), p_T = softmax(teacher / t):
        kind: per row, ``"kl"``: sum p_T (log p_T - log p_S); ``"soft_ce"``:
            sum -p_T log p_S; ``"reverse_kl"``: sum p_S (log p_S - log p_T); ``"jsd"``:
            beta KL(p_T || m) + (1 - beta) KL(p_S || m) with m = beta p_T + (1 - beta) p_S.
        scale_t2: multiply the soft term by t^2 (Hinton), so gradients keep their size.
        mask: bool (...), rows where it is False do not count.
        labels: int (...), rows equal to ``ignore_index`` do not count; with
            ``hard_weight != 0`` each counted row adds hard_weight * CE(student at t=1, label).
        soft_weight: weight of the soft term.
        reduction: ``"batchmean"`` (sum / counted rows), ``"sum"``, ``"mean"``
            (sum / (counted rows * C)), ``"none"`` (per-row losses, shape (...), 0 where a row
            does not count). No counted row gives 0 and a zero gradient.
        inplace_grad: write the gradient over the student logits' storage instead of a new
            (N, C) buffer (the logits must not be used afterwards; backward runs once).
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``.

    Returns:
        float32 loss (float64 for float64 input): a scalar, or shape (...) for "none".

    Teacher logits of -inf are legal (0 log 0 = 0); a student -inf where the teacher has mass
    gives +inf. A counted row holding NaN or +inf gives a NaN loss (and NaN gradient row).
    """
    check_float_tensor("student_logits", student_logits)
    check_float_tensor("teacher_logits", teacher_logits)
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    if student_logits.dim() == 0:
        raise ValueError("student_logits must have a class dimension, got a 0-d tensor")
    if teacher_logits.dtype != student_logits.dtype:
        raise TypeError(
            f"student_logits and teacher_logits must share a dtype, got {student_logits.dtype} "
            f"and {teacher_logits.dtype}; cast the teacher with .to(student_logits.dtype)"
        )
    if teacher_logits.shape == student_logits.shape:
        num_teachers = 1
    elif (
        teacher_logits.dim() == student_logits.dim() + 1
        and teacher_logits.shape[1:] == student_logits.shape
        and teacher_logits.shape[0] >= 1
    ):
        num_teachers = teacher_logits.shape[0]
    else:
        raise ValueError(
            "teacher_logits must have the student's shape (..., C) or (K, ..., C) for an "
            f"ensemble; got student {tuple(student_logits.shape)}, "
            f"teacher {tuple(teacher_logits.shape)}"
        )
    check_temperature(temperature)
    check_choice("kind", kind, reference.KD_KINDS)
    check_choice("reduction", reduction, reference.KD_REDUCTIONS)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    row_shape = student_logits.shape[:-1]
    num_classes = student_logits.shape[-1]
    if num_classes == 0:
        raise ValueError("student_logits has 0 classes")
    if mask is not None:
        check_row_tensor("mask", mask, row_shape, student_logits.device, kind="bool")
    if labels is not None:
        check_row_tensor("labels", labels, row_shape, student_logits.device, kind="int")
        if not torch.compiler.is_compiling() and labels_out_of_range(
            labels, num_classes, ignore_index
        ):
            raise ValueError(
                f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}"
            )
    elif hard_weight != 0.0:
        raise ValueError(f"hard_weight={hard_weight} needs labels, got labels=None")

    chosen = resolve_backend(backend, student_logits.device, student_logits.dtype)
    options = dict(
        temperature=float(temperature),
        kind=kind,
        soft_weight=float(soft_weight),
        hard_weight=float(hard_weight),
        beta=float(beta),
        scale_t2=bool(scale_t2),
        ignore_index=int(ignore_index),
    )
    if chosen == "torch":
        return reference.kd_loss(
            student_logits, teacher_logits, reduction=reduction, mask=mask, labels=labels, **options
        )

    student = student_logits.reshape(-1, num_classes)
    if student.stride(-1) != 1:
        student = student.contiguous()
    teacher = teacher_logits.reshape(num_teachers, -1, num_classes)
    if teacher.stride(-1) != 1:
        teacher = teacher.contiguous()
    flat_mask = None if mask is None else mask.reshape(-1).contiguous()
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    op_args = (
        teacher,
        flat_labels,
        flat_mask,
        options["temperature"],
        kind,
        options["soft_weight"],
        options["hard_weight"],
        options["beta"],
        options["scale_t2"],
        options["ignore_index"],
    )
    forward_op, forward_out_op = _kd_ops(chosen)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    if inplace_grad and need_grad:
        if student_logits.is_leaf:
            raise ValueError(
                "inplace_grad=True writes the gradient over the logits, so they cannot be a "
                "leaf tensor (its .grad would alias its data); use the LM head's output"
            )
        if student.data_ptr() != student_logits.data_ptr() or not student.is_contiguous():
            raise ValueError("inplace_grad=True needs contiguous student_logits")
        row_loss = _ops.KDLossGradInStudent.apply(student, forward_out_op, *op_args)
    else:
        row_loss, _ = forward_op(student, *op_args, need_grad)
    return _reduce_rows(
        row_loss, reduction, row_shape, num_classes, flat_mask, flat_labels, int(ignore_index)
    )


def _kd_ops(backend: str):
    """The (functional, out) op pair that runs the KD loss on ``backend``."""
    if backend == "triton":
        from kd_kernels.triton import kd_loss as triton_kd_loss

        return triton_kd_loss.kd_loss_forward_triton, triton_kd_loss.kd_loss_forward_out_triton
    ops = torch.ops.kd_kernels
    return ops.kd_loss_forward, ops.kd_loss_forward_out


def _reduce_rows(
    row_loss: torch.Tensor,
    reduction: str,
    row_shape: torch.Size,
    num_classes: int,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    ignore_index: int,
) -> torch.Tensor:
    """Applies ``reduction`` to per-row losses, counting rows on the device (no host sync)."""
    if reduction == "none":
        return row_loss.reshape(row_shape)
    total = row_loss.sum()
    if reduction == "sum":
        return total
    if mask is None and labels is None:
        counted = max(row_loss.shape[0], 1)
    else:
        counted_rows = torch.ones_like(row_loss, dtype=torch.bool)
        if mask is not None:
            counted_rows = counted_rows & mask
        if labels is not None:
            counted_rows = counted_rows & (labels != ignore_index)
        counted = counted_rows.sum().clamp_min(1)
    if reduction == "batchmean":
        return total / counted
    return total / (counted * num_classes)
