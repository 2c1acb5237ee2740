"""Public loss functions: argument checks, shape normalisation and backend dispatch.

Each function accepts any float dtype, returns the loss in float32 (float64 for float64
input on the cpu/torch backends) and gives gradients in the input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kd_kernels import _ops, distributed, reference
from kd_kernels._backend import resolve_backend
from kd_kernels._checks import (
    as_bool_mask,
    check_choice,
    check_float_tensor,
    check_layer_pairs,
    check_row_tensor,
    check_same_device,
    check_teacher_topk,
    check_temperature,
    check_token_mask,
    labels_out_of_range,
    normalizer_divisor,
)

__all__ = ["attention_mse_loss", "hidden_mse_loss", "info_nce_loss", "kd_loss"]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    topk_remainder: str = "renormalize",
    temperature: float = 1.0,
    kind: str = "kl",
    reduction: str = "batchmean",
    normalizer: float | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    beta: float = 0.5,
    scale_t2: bool = True,
    inplace_grad: bool = False,
    backend: str = "auto",
    process_group: object | None = None,
) -> torch.Tensor:
    """Temperature-softmax knowledge-distillation loss, fused.

    Args:
        student_logits: (..., C) float tensor; the only input that receives a gradient.
        teacher_logits: (..., C) like the student, or (K, ..., C) for an ensemble of K
            teachers whose probabilities (not logits) are averaged, as in MT-DNN-KD.
        teacher_topk: instead of ``teacher_logits``, a sparse teacher as stored offline:
            ``(indices, logprobs)``, both (..., k), int indices (distinct per row) and the
            teacher's log-probabilities of those classes at temperature 1.
        topk_remainder: what the sparse teacher gives the other C - k classes:
            ``"renormalize"`` nothing (p_T is the softmax of the top k alone) or ``"spread"``
            its missing mass 1 - sum exp(logprobs), split evenly. The dense equivalent is
            ``reference.topk_teacher_logits``; it is built in the student's dtype (one
            (..., C) buffer; ``fused_linear_kd_loss`` builds it chunk by chunk).
            ``"bucket"``: the missing mass r and the student's mass outside the same k
            classes are one extra class of both distributions, the loss is the ``kind``'s
            divergence of the (k + 1)-class distributions p = softmax([logprobs, log r] / t)
            and (q_topk, Q_R), q = softmax(student / t) (``reference.topk_bucket_row_losses``).
            Float32 math for half-precision students (one float32 copy of the logits).
        temperature: t > 0. With p_S = softmax(student / t), p_T = softmax(teacher / t):
        kind: per row, ``"kl"``: sum p_T (log p_T - log p_S); ``"soft_ce"``:
            sum -p_T log p_S; ``"reverse_kl"``: sum p_S (log p_S - log p_T); ``"jsd"``:
            beta KL(p_T || m) + (1 - beta) KL(p_S || m) with m = beta p_T + (1 - beta) p_S.
            (``reverse_kl`` against a renormalized top-k teacher is +inf unless the student
            puts no mass outside the top k.)
        scale_t2: multiply the soft term by t^2 (Hinton), so gradients keep their size.
        mask: (...) bool, integer or float (1.0 / 0.0 as Hugging Face code holds it): rows
            where it is 0 (False) do not count, every non-zero value counts as 1.
        labels: int (...), rows equal to ``ignore_index`` do not count; with
            ``hard_weight != 0`` each counted row adds hard_weight * CE(student at t=1, label).
        soft_weight: weight of the soft term.
        reduction: ``"batchmean"`` (sum / counted rows), ``"sum"``, ``"mean"``
            (sum / (counted rows * C)), ``"none"`` (per-row losses, shape (...), 0 where a row
            does not count). No counted row gives 0 and a zero gradient.
        normalizer: with ``"batchmean"`` (or ``"mean"``), divide the summed loss by this
            instead of the counted rows (or by normalizer * C): a number > 0 or a 0-dim tensor
            (read on the device, no host sync), e.g. the counted tokens of all micro-batches of
            an optimizer step (HF Trainer's ``num_items_in_batch``), so that accumulated
            micro-batches equal one big batch.
        inplace_grad: write the gradient over the student logits' storage instead of a new
            (N, C) buffer (the logits must not be used afterwards; backward runs once).
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``.
        process_group: vocabulary-parallel KD (tensor-parallel heads): rank r of the group
            holds the classes [r C/P, (r+1) C/P) of the student and teacher logits (C = P times
            the last dim); labels are global ids; row statistics are all-reduced, never the
            logits, and every rank returns the loss of all C classes (see
            ``kd_kernels.vocab_parallel``; float32 torch math, ``backend`` and
            ``inplace_grad`` are not used).

    Returns:
        float32 loss (float64 for float64 input): a scalar, or shape (...) for "none".

    Teacher logits of -inf are legal (0 log 0 = 0); a student -inf where the teacher has mass
    gives +inf. A counted row holding NaN or +inf gives a NaN loss (and NaN gradient row).
    """
    if normalizer is not None:
        check_float_tensor("student_logits", student_logits)
        num_classes = student_logits.shape[-1] if student_logits.dim() else 1
        if process_group is not None:
            num_classes *= torch.distributed.get_world_size(process_group)
        divisor = normalizer_divisor(normalizer, reduction, num_classes, student_logits.device)
        total = kd_loss(
            student_logits,
            teacher_logits,
            teacher_topk=teacher_topk,
            topk_remainder=topk_remainder,
            temperature=temperature,
            kind=kind,
            reduction="sum",
            mask=mask,
            labels=labels,
            ignore_index=ignore_index,
            hard_weight=hard_weight,
            soft_weight=soft_weight,
            beta=beta,
            scale_t2=scale_t2,
            inplace_grad=inplace_grad,
            backend=backend,
            process_group=process_group,
        )
        return total / (divisor.to(total.dtype) if torch.is_tensor(divisor) else divisor)
    if process_group is not None:
        from kd_kernels import vocab_parallel

        return vocab_parallel.kd_loss(
            student_logits,
            teacher_logits,
            process_group=process_group,
            teacher_topk=teacher_topk,
            topk_remainder=topk_remainder,
            temperature=temperature,
            kind=kind,
            reduction=reduction,
            mask=mask,
            labels=labels,
            ignore_index=ignore_index,
            hard_weight=hard_weight,
            soft_weight=soft_weight,
            beta=beta,
            scale_t2=scale_t2,
        )
    check_float_tensor("student_logits", student_logits)
    if student_logits.dim() == 0:
        raise ValueError("student_logits must have a class dimension, got a 0-d tensor")
    row_shape = student_logits.shape[:-1]
    num_classes = student_logits.shape[-1]
    if num_classes == 0:
        raise ValueError("student_logits has 0 classes")
    check_kd_options(
        temperature,
        kind,
        reduction,
        beta,
        row_shape,
        num_classes,
        student_logits.device,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
        hard_weight=hard_weight,
    )
    mask = as_bool_mask(mask)
    if teacher_topk is not None:
        if teacher_logits is not None:
            raise ValueError("pass the teacher once: teacher_logits or teacher_topk, not both")
        check_choice("topk_remainder", topk_remainder, reference.TOPK_REMAINDERS)
        indices, logprobs = check_teacher_topk(
            teacher_topk, row_shape, num_classes, student_logits.device, topk_remainder
        )
        if topk_remainder == "bucket":
            return _topk_bucket_kd_loss(
                student_logits,
                indices,
                logprobs.detach(),
                temperature=temperature,
                kind=kind,
                reduction=reduction,
                mask=mask,
                labels=labels,
                ignore_index=ignore_index,
                hard_weight=hard_weight,
                soft_weight=soft_weight,
                beta=beta,
                scale_t2=scale_t2,
                inplace_grad=inplace_grad,
                backend=backend,
            )
        teacher_logits = reference.topk_teacher_logits(
            indices, logprobs.detach(), num_classes, topk_remainder
        ).to(student_logits.dtype)
    elif teacher_logits is None:
        raise ValueError("kd_loss needs a teacher: teacher_logits or teacher_topk")
    num_teachers = check_teacher_logits(
        teacher_logits, student_logits.shape, student_logits.dtype, student_logits.device
    )

    chosen = resolve_backend(backend, student_logits.device, student_logits.dtype)
    options = kd_op_options(
        temperature, kind, soft_weight, hard_weight, beta, scale_t2, ignore_index
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
    if need_grad and (inplace_grad or not torch.compiler.is_compiling()):
        divisor = None
        if reduction != "none":
            counted = counted_rows(
                student.shape[0], flat_mask, flat_labels, int(ignore_index), student.device
            )
            divisor = row_divisor(reduction, student.shape[0], num_classes, counted)
        loss = _ops.KDLossWithGrad.apply(student, forward_out_op, inplace_grad, divisor, *op_args)
        return loss.reshape(row_shape) if divisor is None else loss
    # No gradient, or inside torch.compile: the op and its registered autograd.
    row_loss, _ = forward_op(student, *op_args, need_grad)
    return _reduce_rows(
        row_loss, reduction, row_shape, num_classes, flat_mask, flat_labels, int(ignore_index)
    )


def _topk_bucket_kd_loss(
    student_logits: torch.Tensor,
    indices: torch.Tensor,
    logprobs: torch.Tensor,
    *,
    reduction: str,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    ignore_index: int,
    inplace_grad: bool,
    backend: str,
    **options,
) -> torch.Tensor:
    """kd_loss against a sparse teacher with ``topk_remainder="bucket"`` (checked inputs).

    The ``torch`` backend runs the spec (``reference.topk_bucket_row_losses``). The kernels get
    the dense teacher of ``reference.topk_bucket_teacher_logits``, whose kl, reverse_kl and jsd
    losses and gradients are the bucket's; soft_ce runs as kl (the same gradient) plus the
    bucket teacher's entropy per row (``reference.topk_bucket_teacher_entropy``, k + 1 terms,
    no gradient), not as dense soft_ce minus an entropy of C - k terms (that difference would
    cost fp32 digits). The teacher must be exact per class (its ratio to the student constant
    outside the top k): rounded to float16 / bfloat16 its logits would break that by up to
    |T| 2^-9 per class (measured: loss errors to 1e-3, gradient to 2e-2 relative in bfloat16),
    so half-precision students run the kernel on a float32 copy of the logits and a float32
    teacher (the gradient is cast back to the input dtype by autograd).
    """
    temperature, kind = options["temperature"], options["kind"]
    if resolve_backend(backend, student_logits.device, student_logits.dtype) == "torch":
        return reference.kd_loss(
            student_logits,
            teacher_topk=(indices, logprobs),
            topk_remainder="bucket",
            reduction=reduction,
            mask=mask,
            labels=labels,
            ignore_index=ignore_index,
            **options,
        )
    compute = student_logits
    if compute.dtype not in (torch.float32, torch.float64):
        compute = compute.float()
    teacher = reference.topk_bucket_teacher_logits(student_logits, indices, logprobs, temperature)
    loss = kd_loss(
        compute,
        teacher.to(compute.dtype),
        reduction=reduction,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
        inplace_grad=inplace_grad,
        backend=backend,
        **{**options, "kind": "kl" if kind == "soft_ce" else kind},
    )
    if kind != "soft_ce":
        return loss
    num_classes = student_logits.shape[-1]
    entropy = reference.topk_bucket_teacher_entropy(logprobs, num_classes, temperature)
    scale = options["soft_weight"] * (temperature * temperature if options["scale_t2"] else 1.0)
    flat_mask = None if mask is None else mask.reshape(-1)
    flat_labels = None if labels is None else labels.reshape(-1)
    counted = counted_rows(entropy.numel(), flat_mask, flat_labels, ignore_index, loss.device)
    entropy = scale * entropy.reshape(-1).to(loss.dtype)
    if counted is not None:  # an uncounted row may hold NaN: where, not a product
        entropy = torch.where(counted, entropy, 0.0)
    return loss + _reduce_rows(
        entropy,
        reduction,
        student_logits.shape[:-1],
        num_classes,
        flat_mask,
        flat_labels,
        ignore_index,
    )


def _kd_ops(backend: str):
    """The (functional, out) op pair that runs the KD loss on ``backend``."""
    if backend == "triton":
        from kd_kernels.triton import kd_loss as triton_kd_loss

        return triton_kd_loss.kd_loss_forward_triton, triton_kd_loss.kd_loss_forward_out_triton
    ops = torch.ops.kd_kernels
    return ops.kd_loss_forward, ops.kd_loss_forward_out


def kd_op_options(
    temperature: float,
    kind: str,
    soft_weight: float,
    hard_weight: float,
    beta: float,
    scale_t2: bool,
    ignore_index: int,
) -> dict:
    """kd_loss's scalar options as the ops take them (Python floats, bool, int)."""
    return dict(
        temperature=float(temperature),
        kind=kind,
        soft_weight=float(soft_weight),
        hard_weight=float(hard_weight),
        beta=float(beta),
        scale_t2=bool(scale_t2),
        ignore_index=int(ignore_index),
    )


def check_kd_options(
    temperature: object,
    kind: str,
    reduction: str,
    beta: float,
    row_shape: torch.Size,
    num_classes: int,
    device: torch.device,
    *,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    ignore_index: int,
    hard_weight: float,
) -> None:
    """The checks of kd_loss's options and per-row tensors, shared with fused_linear_kd_loss."""
    check_temperature(temperature)
    check_choice("kind", kind, reference.KD_KINDS)
    check_choice("reduction", reduction, reference.KD_REDUCTIONS)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if mask is not None:
        check_row_tensor("mask", mask, row_shape, device, kind="mask")
    if labels is not None:
        check_row_tensor("labels", labels, row_shape, device, kind="int")
        if not torch.compiler.is_compiling() and labels_out_of_range(
            labels, num_classes, ignore_index
        ):
            raise ValueError(
                f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}"
            )
    elif hard_weight != 0.0:
        raise ValueError(f"hard_weight={hard_weight} needs labels, got labels=None")


def check_teacher_logits(
    teacher: torch.Tensor, student_shape: torch.Size, dtype: torch.dtype, device: torch.device
) -> int:
    """Teacher logits shaped like the student's (..., C) or (K, ..., C); returns K."""
    check_float_tensor("teacher_logits", teacher)
    if teacher.device != device:
        raise ValueError(
            f"inputs must be on one device, got the student on {device}, "
            f"teacher_logits on {teacher.device}"
        )
    if teacher.dtype != dtype:
        raise TypeError(
            f"student_logits and teacher_logits must share a dtype, got {dtype} and "
            f"{teacher.dtype}; cast the teacher with .to(student_logits.dtype)"
        )
    if teacher.shape == student_shape:
        return 1
    if (
        teacher.dim() == len(student_shape) + 1
        and teacher.shape[1:] == student_shape
        and teacher.shape[0] >= 1
    ):
        return teacher.shape[0]
    raise ValueError(
        "teacher_logits must have the student's shape (..., C) or (K, ..., C) for an ensemble; "
        f"got student {tuple(student_shape)}, teacher {tuple(teacher.shape)}"
    )


def counted_rows(
    num_rows: int,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    ignore_index: int,
    device: torch.device,
) -> torch.Tensor | None:
    """(N,) bool, the rows that count (mask True, label != ignore_index); None: all count."""
    if mask is None and labels is None:
        return None
    counted = torch.ones(num_rows, dtype=torch.bool, device=device)
    if mask is not None:
        counted = counted & mask
    if labels is not None:
        counted = counted & (labels != ignore_index)
    return counted


def row_divisor(
    reduction: str, num_rows: int, num_classes: int, counted: torch.Tensor | None
) -> torch.Tensor | int:
    """What the sum of row losses is divided by: 1 ("sum"), the counted rows ("batchmean")
    or counted rows * C ("mean"), at least 1. Counted on the device (no host sync)."""
    if reduction == "sum":
        return 1
    count = max(num_rows, 1) if counted is None else counted.sum().clamp_min(1)
    return count if reduction == "batchmean" else count * num_classes


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
    counted = counted_rows(row_loss.shape[0], mask, labels, ignore_index, row_loss.device)
    return row_loss.sum() / row_divisor(reduction, row_loss.shape[0], num_classes, counted)


def attention_mse_loss(
    student_attn: torch.Tensor | Sequence[torch.Tensor],
    teacher_attn: torch.Tensor | Sequence[torch.Tensor],
    *,
    attention_mask: torch.Tensor | None = None,
    threshold: float | None = -100.0,
    layer_reduction: str = "sum",
    backend: str = "auto",
) -> torch.Tensor:
    """TinyBERT attention-map MSE over matched layers, all layers in one fused kernel launch.

    Args:
        student_attn, teacher_attn: (B, H, Lq, Lk) float tensors (pre-softmax scores or
            probabilities), or equal-length sequences of them, one per matched layer pair;
            shapes equal pairwise. Only the student gets a gradient.
        attention_mask: (B, Lk) bool or integer (nonzero = real token); needs Lq == Lk.
            Entry (q, k) counts when both tokens are real. None: every entry counts.
        threshold: entries ``<= threshold`` become 0 in both tensors before the difference,
            as TinyBERT's ``torch.where(att <= -1e2, 0, att)`` does for scores masked with
            -10000 (no gradient flows to a replaced student entry). None keeps every value.
        layer_reduction: per layer L_l = sum over counted entries of (s' - t')^2 / count;
            ``"sum"`` (TinyBERT's att_loss), ``"mean"``, or ``"none"`` (shape (layers,)).
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``.

    Returns:
        float32 loss (float64 for float64 input). A layer with no counted entry adds 0.
    """
    students, teachers = check_layer_pairs(
        "student_attn", "teacher_attn", student_attn, teacher_attn, 4
    )
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or math.isnan(threshold)
    ):
        raise TypeError(f"threshold must be a float or None, got {threshold!r}")
    check_choice("layer_reduction", layer_reduction, reference.LAYER_REDUCTIONS)
    mask = None
    if attention_mask is not None:
        for index, student in enumerate(students):
            if student.shape[-2] != student.shape[-1]:
                raise ValueError(
                    f"attention_mask needs square attention maps (Lq == Lk); layer {index} has "
                    f"shape {tuple(student.shape)}"
                )
        mask = check_token_mask(attention_mask, students, token_dim=-1)
    chosen = resolve_backend(backend, students[0].device, students[0].dtype)
    if chosen == "torch":
        layer_losses = reference.attention_mse_layer_losses(
            students, teachers, attention_mask=mask, threshold=threshold
        )
    else:
        threshold = None if threshold is None else float(threshold)
        layer_losses = _fused_layer_mse(chosen, students, teachers, mask, threshold, True)
    return reference.reduce_layers(layer_losses, layer_reduction)


def hidden_mse_loss(
    student_hidden: torch.Tensor | Sequence[torch.Tensor],
    teacher_hidden: torch.Tensor | Sequence[torch.Tensor],
    *,
    attention_mask: torch.Tensor | None = None,
    layer_reduction: str = "sum",
    backend: str = "auto",
) -> torch.Tensor:
    """Hidden-state MSE over matched layers (TinyBERT, TextBrewer's hid_mse_loss), fused.

    Args:
        student_hidden, teacher_hidden: (B, L, D) float tensors or equal-length sequences of
            them (the student already projected to the teacher's width, e.g. TinyBERT's
            fit_dense). Only the student gets a gradient.
        attention_mask: (B, L) bool or integer (nonzero = real token); padded tokens do not
            count. Per layer L_l = sum over real (b, l) and d of (s - t)^2 / (tokens * D).
        layer_reduction: ``"sum"``, ``"mean"`` or ``"none"`` (shape (layers,)).
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``.

    Returns:
        float32 loss (float64 for float64 input). A layer with no real token adds 0.
    """
    students, teachers = check_layer_pairs(
        "student_hidden", "teacher_hidden", student_hidden, teacher_hidden, 3
    )
    check_choice("layer_reduction", layer_reduction, reference.LAYER_REDUCTIONS)
    mask = (
        None if attention_mask is None else check_token_mask(attention_mask, students, token_dim=1)
    )
    chosen = resolve_backend(backend, students[0].device, students[0].dtype)
    if chosen == "torch":
        layer_losses = reference.hidden_mse_layer_losses(students, teachers, attention_mask=mask)
    else:
        # (B, L, D) is the (B, H=1, R=L, C=D) case of the layer MSE op, masked by rows only.
        students = [s.unsqueeze(1) for s in students]
        teachers = [t.unsqueeze(1) for t in teachers]
        layer_losses = _fused_layer_mse(chosen, students, teachers, mask, None, False)
    return reference.reduce_layers(layer_losses, layer_reduction)


def _fused_layer_mse(
    backend: str,
    students: list[torch.Tensor],
    teachers: list[torch.Tensor],
    mask: torch.Tensor | None,
    threshold: float | None,
    mask_columns: bool,
) -> torch.Tensor:
    """Per-layer losses (layers,) from the layer MSE op: row sums of squares / counts.

    Layers are (B, H, R, C). Counted entries per layer: B*H*R*C without a mask,
    H * sum_b n_b^2 with column masking (attention) or H * C * sum_b n_b without, where n_b
    is the number of real tokens of sequence b; counted on the device, with no host sync.
    """
    students = [_unit_last_stride(s) for s in students]
    teachers = [_unit_last_stride(t) for t in teachers]
    row_sq_sum = _layer_mse_op(backend)(students, teachers, mask, threshold, mask_columns)
    rows = [s.shape[0] * s.shape[1] * s.shape[2] for s in students]
    if len(set(rows)) == 1:
        layer_sums = row_sq_sum.view(len(rows), rows[0]).sum(1)
    else:
        layer_sums = torch.stack([part.sum() for part in row_sq_sum.split(rows)])
    if mask is None:
        per_layer = [max(s.numel(), 1) for s in students]
        if len(set(per_layer)) == 1:
            return layer_sums / per_layer[0]
        return layer_sums / layer_sums.new_tensor(per_layer)
    tokens = mask.sum(1, dtype=torch.int64)
    if mask_columns:
        masked_count = tokens.square().sum()
        scales = [s.shape[1] for s in students]
    else:
        masked_count = tokens.sum()
        scales = [s.shape[1] * s.shape[3] for s in students]
    if len(set(scales)) == 1:
        counts = masked_count * scales[0]
    else:
        counts = torch.stack([masked_count * scale for scale in scales])
    return layer_sums / counts.clamp_min(1)


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels walk rows with unit stride; other strides (head slices) are taken as they are."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _layer_mse_op(backend: str):
    if backend == "triton":
        from kd_kernels.triton import layer_mse as triton_layer_mse

        return triton_layer_mse.layer_mse_forward_triton
    return torch.ops.kd_kernels.layer_mse_forward


def info_nce_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 0.05,
    labels: torch.Tensor | None = None,
    similarity: str = "cosine",
    symmetric: bool = False,
    reduction: str = "mean",
    gather_distributed: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """In-batch InfoNCE with O(N + M) memory (SimCSE, CLIP, any bi-encoder).

    Args:
        query: (N, D) float tensor. key: (M, D), same dtype. Both get gradients.
        temperature: a float > 0, or a 0-dim float tensor > 0 that may require grad (a learnable
            temperature; for a CLIP logit scale s pass ``1 / s``).
        labels: (N,) integer, index of each query's positive key in [0, M). Default arange(N),
            which needs M >= N: keys past N are hard negatives (supervised SimCSE).
        similarity: ``"cosine"`` (rows L2-normalised as ``F.normalize`` does, inside the
            kernel, gradient included) or ``"dot"``.
            z_ij = sim(q_i, k_j) / temperature; loss_i = logsumexp_j z_ij - z_{i, labels_i}.
        symmetric: CLIP-style, labels must be None: adds rev_i = logsumexp_j z_ji - z_ii over
            the first N keys; each query's loss is (loss_i + rev_i) / 2.
        reduction: ``"mean"`` over queries, ``"sum"``, or ``"none"`` (shape (N,)).
        gather_distributed: inside an initialised torch.distributed group, score the local
            queries against the keys of every rank (and, when symmetric, the local keys against
            every rank's queries), with gradients flowing back to their owners; labels refer to
            local keys and are offset to the gathered ones. Ranks may hold different N.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``.

    Returns:
        float32 loss (float64 for float64 input on cpu/torch).

    The triton backend keeps per-row log-sum-exp statistics and recomputes similarity tiles in
    backward (flash-attention style); cpu and cuda walk blocks of query rows with a bounded
    (rows x M) buffer. Neither holds the N x M matrix; torch (the reference) does. With a
    ``"mean"`` or ``"sum"`` reduction and a gradient to form, the loss and the gradients are
    computed in forward and backward only scales them: cpu and cuda in one walk (three matmuls
    instead of four; for the symmetric loss one walk for both directions), triton in an
    online-softmax walk per query block and one per key block (four tile matmuls instead of
    five; symmetric six instead of ten).
    """
    check_float_tensor("query", query)
    check_float_tensor("key", key)
    check_same_device(query=query, key=key)
    if query.dim() != 2 or key.dim() != 2 or query.shape[1] != key.shape[1]:
        raise ValueError(
            f"query must be (N, D) and key (M, D) with one D, got {tuple(query.shape)} and "
            f"{tuple(key.shape)}"
        )
    if key.dtype != query.dtype:
        raise TypeError(f"query and key must share a dtype, got {query.dtype} and {key.dtype}")
    if 0 in query.shape or key.shape[0] == 0:
        raise ValueError(
            f"need N, M, D >= 1, got query {tuple(query.shape)} and key {tuple(key.shape)}"
        )
    check_choice("similarity", similarity, reference.INFO_NCE_SIMILARITIES)
    check_choice("reduction", reduction, reference.INFO_NCE_REDUCTIONS)
    count, device = query.shape[0], query.device
    if symmetric and labels is not None:
        raise ValueError("symmetric=True pairs query i with key i: pass labels=None")
    if labels is None and key.shape[0] < count:
        raise ValueError(
            f"labels=None pairs query i with key i, so it needs M >= N; got N={count}, "
            f"M={key.shape[0]}"
        )
    temperature = _check_info_nce_temperature(temperature, device)
    chosen = resolve_backend(backend, device, query.dtype)

    keys, key_offset, queries, query_offset = key, 0, query, 0
    if gather_distributed:
        if not distributed.distributed_ready():
            raise ValueError(
                "gather_distributed=True needs an initialised torch.distributed process group"
            )
        keys, key_offset = distributed.all_gather_with_grad(key)
        if symmetric:
            queries, query_offset = distributed.all_gather_with_grad(query)
    if labels is None:
        labels = torch.arange(key_offset, key_offset + count, device=device)
    else:
        check_row_tensor("labels", labels, torch.Size([count]), device, kind="int")
        if not torch.compiler.is_compiling() and labels_out_of_range(labels, key.shape[0]):
            raise ValueError(f"labels must lie in [0, M) = [0, {key.shape[0]})")
        labels = labels.to(torch.int64) + key_offset
    cosine = similarity == "cosine"
    fuse = _info_nce_gradient_in_forward(
        chosen, reduction, gather_distributed, query, key, temperature
    )
    if fuse:
        temperature = _info_nce_temperature_tensor(temperature, query)
        return _ops.InfoNCEGradInForward.apply(
            query,
            key,
            labels,
            temperature,
            cosine,
            symmetric,
            reduction,
            _info_nce_fused_op(chosen),
        )
    losses = _info_nce_rows(chosen, query, keys, labels, temperature, cosine)
    if symmetric:
        reverse_labels = torch.arange(query_offset, query_offset + count, device=device)
        reverse = _info_nce_rows(chosen, key[:count], queries, reverse_labels, temperature, cosine)
        losses = (losses + reverse) / 2
    return reference.reduce_queries(losses, reduction)


def _check_info_nce_temperature(temperature: object, device: torch.device) -> float | torch.Tensor:
    """A float > 0, or a 0-dim float tensor > 0 (one host sync for its value check)."""
    if not isinstance(temperature, torch.Tensor):
        check_temperature(temperature)
        return float(temperature)
    if temperature.dim() != 0 or not temperature.is_floating_point():
        raise TypeError(
            "temperature must be a float or a 0-dim float tensor, got a tensor of shape "
            f"{tuple(temperature.shape)} and dtype {temperature.dtype}"
        )
    if not torch.compiler.is_compiling():
        value = float(temperature.detach())
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"temperature must be a finite number > 0, got {value}")
    return temperature.to(device)


def _info_nce_gradient_in_forward(
    backend: str,
    reduction: str,
    gather_distributed: bool,
    query: torch.Tensor,
    key: torch.Tensor,
    temperature: float | torch.Tensor,
) -> bool:
    """Whether the fused loss-and-gradient op serves this call: a cpu, cuda or triton backend,
    a scalar reduction (row weights known in forward), no gathered keys (the symmetric walk
    needs one shared similarity matrix) and a gradient to form."""
    if backend not in ("cpu", "cuda", "triton") or reduction == "none" or gather_distributed:
        return False
    temperature_grad = isinstance(temperature, torch.Tensor) and temperature.requires_grad
    wants_grad = query.requires_grad or key.requires_grad or temperature_grad
    return torch.is_grad_enabled() and wants_grad


def _info_nce_temperature_tensor(
    temperature: float | torch.Tensor, query: torch.Tensor
) -> torch.Tensor:
    """The ops' temperature: 0-dim, float32 (float64 for float64 inputs), on query's device."""
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    if isinstance(temperature, torch.Tensor):
        return temperature.to(dtype)
    return torch.full((), temperature, dtype=dtype, device=query.device)


def _info_nce_rows(
    backend: str,
    query: torch.Tensor,
    key: torch.Tensor,
    labels: torch.Tensor,
    temperature: float | torch.Tensor,
    cosine: bool,
) -> torch.Tensor:
    """Per-query losses of one direction (N,) on ``backend``."""
    if backend == "torch":
        similarity = "cosine" if cosine else "dot"
        return reference.info_nce_row_losses(query, key, labels, temperature, similarity)
    temperature = _info_nce_temperature_tensor(temperature, query)
    losses, _ = _info_nce_op(backend)(query, key, labels.contiguous(), temperature, cosine)
    return losses


def _info_nce_fused_op(backend: str):
    """The backend's loss-and-gradient op (contract of ``kd_kernels::info_nce_fused``)."""
    if backend == "triton":
        from kd_kernels.triton import info_nce as triton_info_nce

        return triton_info_nce.info_nce_fused_triton
    return torch.ops.kd_kernels.info_nce_fused


def _info_nce_op(backend: str):
    if backend == "triton":
        from kd_kernels.triton import info_nce as triton_info_nce

        return triton_info_nce.info_nce_forward_triton
    return torch.ops.kd_kernels.info_nce_forward
