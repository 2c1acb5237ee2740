"""The student's LM head and kd_loss fused chunk by chunk: the (N, V) logits never exist whole.

Rows are taken ``rows`` at a time. A chunk's logits h @ W^T + b go straight into the fused
kd_loss kernel of the chosen backend, which writes d loss / d logits over them; the chunk's
hidden-state gradient (G @ W) and its share of the weight and bias gradients (G^T h, sum G) are
taken before the next chunk overwrites the buffer. Peak extra memory is one chunk's logits
(and teacher logits) plus the gradients of h, W and b, whatever N is.

When one row's vocabulary is itself too long (``chunk_size=(rows, vocab)`` with vocab < V),
each row chunk is walked over vocabulary slices with an online log-sum-exp: a first pass finds
the normalisers of student and teacher, a second computes the loss and the gradient of each
slice (a third for ``reverse_kl`` and ``jsd``, whose gradient needs a row sum of the second).
That elementwise work runs in PyTorch (float32) on every backend; the matmuls are the cost.
"""

from __future__ import annotations

import math

import torch

from kd_kernels import reference
from kd_kernels._backend import resolve_backend
from kd_kernels._checks import (
    as_bool_mask,
    check_choice,
    check_float_tensor,
    check_same_device,
    check_teacher_topk,
    normalizer_divisor,
)
from kd_kernels._chunked_kd import ChunkedKD, TeacherSource
from kd_kernels._logit_transform import LogitTransform, check_logit_transform
from kd_kernels.distributed import reject_dtensor
from kd_kernels.functional import (
    check_kd_options,
    check_teacher_logits,
    counted_rows,
    kd_op_options,
    row_divisor,
)

__all__ = ["fused_linear_kd_loss"]

# Elements of one chunk's logits when chunk_size is None: 64 MiB in fp32 on CPU, 256 MiB on GPU
# (large enough that the weight-gradient update, G^T h, stays compute-bound).
CHUNK_BUDGET = {"cpu": 2**24, "cuda": 2**26}
# Fewer rows than this make G^T h a memory-bound rank-k update of the whole weight gradient:
# past that point the vocabulary is chunked instead.
MIN_CHUNK_ROWS = 32


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
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
    chunk_size: int | tuple[int, int | None] | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    teacher_softcap: float | None = None,
    teacher_logit_scale: float | None = None,
    backend: str = "auto",
    process_group: object | None = None,
) -> torch.Tensor:
    """``kd_loss(student_hidden @ student_weight.T + student_bias, teacher, ...)`` without
    the (N, V) student logits.

    Args:
        student_hidden: (..., H) float, the student's last hidden states.
        student_weight: (V, H) the student's LM head, same dtype and device.
        teacher_logits: (..., V) or (K, ..., V) for an ensemble, same dtype. Or instead:
        teacher_hidden, teacher_weight, teacher_bias: the teacher's (..., H_T) hidden states and
            (V, H_T), (V,) head, any float dtype; its logits are made chunk by chunk too (no
            gradient) and cast to the student's dtype. Or instead:
        teacher_topk, topk_remainder: a sparse teacher ``(indices, logprobs)`` of shape (..., k),
            as in :func:`kd_kernels.kd_loss`, densified one chunk at a time. ``"bucket"``:
            its dense form depends on the student's lse outside the top k; in vocabulary
            chunks a first pass over the slices finds it (one more matmul per slice), and
            the chunk math runs in float32 for half-precision inputs.
        student_bias: (V,) or None.
        temperature, kind, reduction, normalizer, mask, labels, ignore_index, hard_weight,
        soft_weight, beta, scale_t2: as in :func:`kd_kernels.kd_loss`, over the rows (...).
        chunk_size: rows per chunk, or ``(rows, vocab)`` to also cut the vocabulary (online
            log-sum-exp). None: rows such that a chunk holds about 16M logits (64M on a GPU),
            at least 32 rows, cutting the vocabulary only past that.
        softcap, logit_scale: the student head's final-logit transform, applied to each chunk's
            logits h @ W^T + b as the model's own forward does: z -> softcap tanh(logit_scale
            z / softcap) (Gemma 2/3 ``final_logit_softcapping``; Cohere ``logit_scale``), the
            gradient taken through it. Each a number > 0 or None (not applied).
        teacher_softcap, teacher_logit_scale: the same for a teacher given as
            ``teacher_hidden`` / ``teacher_weight`` (teacher logits are taken as they are).
        backend: the kd_loss kernel run on each full-vocabulary chunk: ``"auto"``, ``"cpu"``,
            ``"triton"`` or ``"cuda"``; ``"torch"`` is the unfused reference (materialises
            the logits).
        process_group: tensor-parallel heads: rank r of the group holds rows
            [r V/P, (r+1) V/P) of student_weight and student_bias (and of teacher_weight and
            teacher_bias, or that slice of teacher_logits); student_hidden, labels and mask
            are the same on every rank. Row statistics are all-reduced, never the logits;
            every rank returns the loss over all V classes, its weight and bias slices get
            their rows of the gradient, and student_hidden the full gradient (summed over
            ranks in backward). See ``kd_kernels.vocab_parallel``; ``backend`` is not used.

    Returns:
        float32 loss (float64 for float64 input), scalar or (...) for "none". Gradients reach
        student_hidden, student_weight and student_bias (those that require one), in their
        dtypes; the weight gradient is accumulated over chunks in float32.

    The hidden states of rows that do not count (mask False, label == ignore_index) reach
    neither the loss nor any gradient: unlike the unfused composition, NaN there does not
    turn the weight gradient into NaN.
    """
    if normalizer is not None:
        check_float_tensor("student_weight", student_weight)
        num_classes = student_weight.shape[0]
        if process_group is not None:
            num_classes *= torch.distributed.get_world_size(process_group)
        divisor = normalizer_divisor(normalizer, reduction, num_classes, student_weight.device)
        total = fused_linear_kd_loss(
            student_hidden,
            student_weight,
            teacher_logits,
            student_bias=student_bias,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            teacher_bias=teacher_bias,
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
            chunk_size=chunk_size,
            softcap=softcap,
            logit_scale=logit_scale,
            teacher_softcap=teacher_softcap,
            teacher_logit_scale=teacher_logit_scale,
            backend=backend,
            process_group=process_group,
        )
        return total / (divisor.to(total.dtype) if torch.is_tensor(divisor) else divisor)
    transforms = (softcap, logit_scale, teacher_softcap, teacher_logit_scale)
    if process_group is not None and any(x is not None for x in transforms):
        raise NotImplementedError(
            "fused_linear_kd_loss: softcap / logit_scale (and the teacher's) are not "
            "implemented with process_group (vocabulary-parallel heads)"
        )
    if process_group is not None:
        from kd_kernels import vocab_parallel

        return vocab_parallel.fused_linear_kd_loss(
            student_hidden,
            student_weight,
            teacher_logits,
            process_group=process_group,
            student_bias=student_bias,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            teacher_bias=teacher_bias,
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
            chunk_size=chunk_size,
        )
    check_float_tensor("student_hidden", student_hidden)
    check_float_tensor("student_weight", student_weight)
    reject_dtensor(student_weight=student_weight, teacher_weight=teacher_weight)
    if student_hidden.dim() == 0:
        raise ValueError("student_hidden must be (..., H), got a 0-d tensor")
    hidden_size = student_hidden.shape[-1]
    row_shape = student_hidden.shape[:-1]
    _check_head("student", student_hidden, student_weight, student_bias, same_dtype=True)
    device, dtype = student_hidden.device, student_hidden.dtype
    vocab_size = student_weight.shape[0]
    check_kd_options(
        temperature,
        kind,
        reduction,
        beta,
        row_shape,
        vocab_size,
        device,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
        hard_weight=hard_weight,
    )
    mask = as_bool_mask(mask)
    teacher = _teacher_source(
        row_shape,
        vocab_size,
        student_hidden,
        teacher_logits,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        teacher_topk,
        topk_remainder,
        temperature,
    )
    transform = LogitTransform.of(
        check_logit_transform("softcap", softcap),
        check_logit_transform("logit_scale", logit_scale),
    )
    teacher.transform = LogitTransform.of(
        check_logit_transform("teacher_softcap", teacher_softcap),
        check_logit_transform("teacher_logit_scale", teacher_logit_scale),
    )
    if teacher.transform is not None and teacher.kind != "head":
        raise ValueError(
            "teacher_softcap / teacher_logit_scale apply to a teacher head (teacher_hidden, "
            "teacher_weight); teacher logits are taken as they are"
        )
    chosen = resolve_backend(backend, device, dtype)
    options = kd_op_options(
        temperature, kind, soft_weight, hard_weight, beta, scale_t2, ignore_index
    )
    if chosen == "torch" and teacher.bucket:
        k = teacher.indices.shape[-1]
        return reference.fused_linear_kd_loss(
            student_hidden,
            student_weight,
            student_bias=student_bias,
            transform=transform,
            teacher_topk=(
                teacher.indices.reshape(*row_shape, k),
                teacher.logprobs.reshape(*row_shape, k),
            ),
            topk_remainder="bucket",
            reduction=reduction,
            mask=mask,
            labels=labels,
            **options,
        )
    if chosen == "torch":
        num_rows = math.prod(row_shape)
        dense = teacher.chunk(slice(0, num_rows), 0, vocab_size)
        dense = dense.reshape(*dense.shape[:1], *row_shape, vocab_size)
        return reference.fused_linear_kd_loss(
            student_hidden,
            student_weight,
            dense[0] if teacher.single else dense,
            student_bias=student_bias,
            transform=transform,
            reduction=reduction,
            mask=mask,
            labels=labels,
            **options,
        )

    hidden = student_hidden.reshape(-1, hidden_size)
    flat_mask = None if mask is None else mask.reshape(-1).contiguous()
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    problem = ChunkedKD(
        teacher=teacher,
        backend=chosen,
        options=options,
        mask=flat_mask,
        labels=flat_labels,
        counted=counted_rows(hidden.shape[0], flat_mask, flat_labels, int(ignore_index), device),
        chunks=_chunk_sizes(chunk_size, hidden.shape[0], vocab_size, device),
        reduction=reduction,
        row_shape=row_shape,
        transform=transform,
        # Decided here: inside Function.forward grad mode is off.
        needs=tuple(
            torch.is_grad_enabled() and x is not None and x.requires_grad
            for x in (student_hidden, student_weight, student_bias)
        ),
    )
    return _FusedLinearKD.apply(student_hidden, student_weight, student_bias, problem)


def _check_head(
    who: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    same_dtype: bool,
) -> None:
    """(..., H) hidden states, a (V, H) weight and a (V,) bias on one device."""
    names = {"hidden": f"{who}_hidden", "weight": f"{who}_weight", "bias": f"{who}_bias"}
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"{names['weight']} must be (V, H) with V >= 1 and H = {names['hidden']}.shape[-1] "
            f"= {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    tensors = {names["hidden"]: hidden, names["weight"]: weight}
    if bias is not None:
        check_float_tensor(names["bias"], bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(
                f"{names['bias']} must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
        tensors[names["bias"]] = bias
    check_same_device(**tensors)
    if same_dtype and any(t.dtype != hidden.dtype for t in tensors.values()):
        seen = ", ".join(f"{name} {t.dtype}" for name, t in tensors.items())
        raise TypeError(f"the {who}'s hidden states and head must share a dtype, got {seen}")


def _teacher_source(
    row_shape: torch.Size,
    vocab_size: int,
    student_hidden: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None,
    topk_remainder: str,
    temperature: float = 1.0,
) -> TeacherSource:
    """Checks that exactly one teacher form is given and wraps it (``temperature``: what a
    "bucket" top-k teacher is built for)."""
    forms = {
        "teacher_logits": teacher_logits is not None,
        "teacher_hidden/teacher_weight": teacher_hidden is not None or teacher_weight is not None,
        "teacher_topk": teacher_topk is not None,
    }
    given = [name for name, present in forms.items() if present]
    if len(given) != 1:
        raise ValueError(
            "fused_linear_kd_loss needs exactly one teacher: teacher_logits, "
            f"teacher_hidden with teacher_weight, or teacher_topk; got {given or 'none'}"
        )
    dtype, device = student_hidden.dtype, student_hidden.device
    if teacher_logits is not None:
        num_teachers = check_teacher_logits(
            teacher_logits, torch.Size((*row_shape, vocab_size)), dtype, device
        )
        logits = teacher_logits.detach().reshape(num_teachers, -1, vocab_size)
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        single = teacher_logits.dim() == len(row_shape) + 1
        return TeacherSource("logits", dtype, single=single, logits=logits)
    if teacher_topk is not None:
        check_choice("topk_remainder", topk_remainder, reference.TOPK_REMAINDERS)
        indices, logprobs = check_teacher_topk(
            teacher_topk, row_shape, vocab_size, device, topk_remainder
        )
        k = indices.shape[-1]
        logprobs = logprobs.detach().reshape(-1, k)
        if topk_remainder == "bucket":
            log_r = reference.topk_missing_logmass(logprobs, vocab_size)
            return TeacherSource(
                "topk",
                dtype,
                indices=indices.reshape(-1, k),
                logprobs=logprobs,
                num_classes=vocab_size,
                bucket=True,
                temperature=float(temperature),
                num_rest=vocab_size - k,
                log_r=log_r.to(reference._compute_dtype(student_hidden)),
            )
        return TeacherSource(
            "topk",
            dtype,
            indices=indices.reshape(-1, k),
            logprobs=logprobs,
            num_classes=vocab_size,
            rest=reference.topk_remainder_logprob(logprobs, vocab_size, topk_remainder),
        )
    if teacher_hidden is None or teacher_weight is None:
        raise ValueError("a teacher head needs both teacher_hidden and teacher_weight")
    check_float_tensor("teacher_hidden", teacher_hidden)
    check_float_tensor("teacher_weight", teacher_weight)
    if teacher_hidden.shape[:-1] != row_shape:
        raise ValueError(
            f"teacher_hidden must be (..., H_T) over the student's rows {tuple(row_shape)}, got "
            f"{tuple(teacher_hidden.shape)}"
        )
    _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, same_dtype=False)
    if teacher_weight.shape[0] != vocab_size:
        raise ValueError(
            f"teacher_weight has {teacher_weight.shape[0]} classes, student_weight {vocab_size}"
        )
    if teacher_hidden.device != device:
        raise ValueError(f"teacher_hidden is on {teacher_hidden.device}, the student on {device}")
    if teacher_hidden.dtype != teacher_weight.dtype or (
        teacher_bias is not None and teacher_bias.dtype != teacher_weight.dtype
    ):
        raise TypeError("teacher_hidden, teacher_weight and teacher_bias must share a dtype")
    return TeacherSource(
        "head",
        dtype,
        hidden=teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
        weight=teacher_weight.detach(),
        bias=None if teacher_bias is None else teacher_bias.detach(),
    )


def _chunk_sizes(
    chunk_size: object, num_rows: int, vocab_size: int, device: torch.device
) -> tuple[int, int]:
    """(rows, vocab) per chunk from the ``chunk_size`` argument (see fused_linear_kd_loss)."""
    if chunk_size is None:
        budget = CHUNK_BUDGET["cuda" if device.type == "cuda" else "cpu"]
        rows = max(1, min(num_rows, max(MIN_CHUNK_ROWS, budget // vocab_size)))
        vocab = vocab_size if rows * vocab_size <= budget else max(1, budget // rows)
        return rows, vocab
    if _is_count(chunk_size):
        rows, vocab = chunk_size, None
    elif (
        isinstance(chunk_size, (tuple, list))
        and len(chunk_size) == 2
        and _is_count(chunk_size[0])
        and (chunk_size[1] is None or _is_count(chunk_size[1]))
    ):
        rows, vocab = chunk_size
    else:
        raise TypeError(
            f"chunk_size must be None, rows or (rows, vocab) of positive ints, got {chunk_size!r}"
        )
    return min(rows, max(num_rows, 1)), vocab_size if vocab is None else min(vocab, vocab_size)


def _is_count(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    if value < 1:
        raise ValueError(f"chunk sizes must be >= 1, got {value}")
    return True


class _FusedLinearKD(torch.autograd.Function):
    """Scalar reductions: forward computes the loss and the unscaled gradients at once,
    backward scales them in place by grad_output / divisor and hands them over, so the weight
    gradient exists once (a copy would double the V x H memory); a second backward
    (retain_graph) recomputes them. ``"none"``: backward re-runs the chunks with the per-row
    grad_output as row weights."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, problem: ChunkedKD):
        flat = hidden.reshape(-1, hidden.shape[-1])
        ctx.problem, ctx.hidden_shape = problem, hidden.shape
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(hidden, weight, bias)
        if problem.reduction == "none":
            row_loss = problem.run(flat, weight, bias, (False, False, False))[0]
            return row_loss.reshape(problem.row_shape)
        row_loss, *grads = problem.run(flat, weight, bias, problem.needs)
        divisor = row_divisor(
            problem.reduction, row_loss.shape[0], weight.shape[0], problem.counted
        )
        # Kept on ctx, not saved: backward scales and returns these very buffers.
        ctx.gradients, ctx.divisor = grads, divisor
        return row_loss.sum() / divisor

    @staticmethod
    def backward(ctx, grad_output):
        problem = ctx.problem
        hidden, weight, bias = ctx.saved_tensors
        flat = hidden.reshape(-1, hidden.shape[-1])
        needs = tuple(ctx.needs_input_grad[:3])
        if problem.reduction == "none":
            row_weights = grad_output.reshape(-1).to(reference._compute_dtype(hidden))
            grads = problem.run(flat, weight, bias, needs, row_weights)[1:]
        else:
            grads, ctx.gradients = ctx.gradients, None
            if grads is None:  # a second backward: the first one handed the buffers over
                grads = problem.run(flat, weight, bias, needs)[1:]
            scale = grad_output / ctx.divisor
            grads = [None if g is None else g.mul_(scale) for g in grads]
        grad_hidden, grad_weight, grad_bias = (
            None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)
        )
        if grad_hidden is not None:
            grad_hidden = grad_hidden.reshape(ctx.hidden_shape)
        return grad_hidden, grad_weight, grad_bias, None
