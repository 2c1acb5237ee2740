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
from typing import Any

import torch
import torch.nn.functional as F

from kd_kernels import reference
from kd_kernels._backend import resolve_backend
from kd_kernels._checks import (
    check_choice,
    check_float_tensor,
    check_same_device,
    check_teacher_topk,
)
from kd_kernels.functional import (
    _kd_ops,
    check_kd_options,
    check_teacher_logits,
    counted_rows,
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
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    beta: float = 0.5,
    scale_t2: bool = True,
    chunk_size: int | tuple[int, int | None] | None = None,
    backend: str = "auto",
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
            as in :func:`kd_kernels.kd_loss`, densified one chunk at a time.
        student_bias: (V,) or None.
        temperature, kind, reduction, mask, labels, ignore_index, hard_weight, soft_weight,
        beta, scale_t2: as in :func:`kd_kernels.kd_loss`, over the rows (...).
        chunk_size: rows per chunk, or ``(rows, vocab)`` to also cut the vocabulary (online
            log-sum-exp). None: rows such that a chunk holds about 16M logits (64M on a GPU),
            at least 32 rows, cutting the vocabulary only past that.
        backend: the kd_loss kernel run on each full-vocabulary chunk: ``"auto"``, ``"cpu"``,
            ``"triton"`` or ``"cuda"``; ``"torch"`` is the unfused reference (materialises
            the logits).

    Returns:
        float32 loss (float64 for float64 input), scalar or (...) for "none". Gradients reach
        student_hidden, student_weight and student_bias (those that require one), in their
        dtypes; the weight gradient is accumulated over chunks in float32.

    The hidden states of rows that do not count (mask False, label == ignore_index) reach
    neither the loss nor any gradient: unlike the unfused composition, NaN there does not
    turn the weight gradient into NaN.
    """
    check_float_tensor("student_hidden", student_hidden)
    check_float_tensor("student_weight", student_weight)
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
    )
    chosen = resolve_backend(backend, device, dtype)
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
        num_rows = math.prod(row_shape)
        dense = teacher.chunk(slice(0, num_rows), 0, vocab_size)
        dense = dense.reshape(*dense.shape[:1], *row_shape, vocab_size)
        return reference.fused_linear_kd_loss(
            student_hidden,
            student_weight,
            dense[0] if teacher.single else dense,
            student_bias=student_bias,
            reduction=reduction,
            mask=mask,
            labels=labels,
            **options,
        )

    hidden = student_hidden.reshape(-1, hidden_size)
    flat_mask = None if mask is None else mask.reshape(-1).contiguous()
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    problem = _Problem(
        teacher=teacher,
        backend=chosen,
        options=options,
        mask=flat_mask,
        labels=flat_labels,
        counted=counted_rows(hidden.shape[0], flat_mask, flat_labels, int(ignore_index), device),
        chunks=_chunk_sizes(chunk_size, hidden.shape[0], vocab_size, device),
        reduction=reduction,
        row_shape=row_shape,
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


class _TeacherSource:
    """Teacher logits for a block of rows and vocabulary columns, made on demand.

    ``chunk(rows, start, stop)`` -> (K, len(rows), stop - start) in the student's dtype, no
    gradient, last dim contiguous, the K teachers stacked (what the kd_loss ops take).
    """

    def __init__(self, kind: str, dtype: torch.dtype, single: bool = True, **tensors: Any):
        self.kind, self.dtype, self.single = kind, dtype, single
        self.__dict__.update(tensors)

    @torch.no_grad()
    def chunk(self, rows: slice, start: int, stop: int) -> torch.Tensor:
        if self.kind == "logits":
            block = self.logits[:, rows, start:stop]
            return block if block.shape[0] == 1 or block.is_contiguous() else block.contiguous()
        if self.kind == "head":
            bias = None if self.bias is None else self.bias[start:stop]
            return F.linear(self.hidden[rows], self.weight[start:stop], bias).to(self.dtype)[None]
        return self._topk_chunk(rows, start, stop)

    def _topk_chunk(self, rows: slice, start: int, stop: int) -> torch.Tensor:
        indices, logprobs = self.indices[rows], self.logprobs[rows].to(self.dtype)
        width = stop - start
        if start == 0 and stop == self.num_classes:
            dense = self.rest[rows].to(self.dtype).expand(-1, width).contiguous()
            return dense.scatter_(1, indices, logprobs)[None]
        # Entries outside [start, stop) are sent to a spare last column, then dropped.
        local = indices - start
        local = torch.where((local >= 0) & (local < width), local, width)
        dense = self.rest[rows].to(self.dtype).expand(-1, width + 1).contiguous()
        return dense.scatter_(1, local, logprobs)[None, :, :width]


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
) -> _TeacherSource:
    """Checks that exactly one teacher form is given and wraps it."""
    given = [
        name
        for name, value in (
            ("teacher_logits", teacher_logits),
            (
                "teacher_hidden/teacher_weight",
                teacher_hidden if teacher_weight is None else teacher_weight,
            ),
            ("teacher_topk", teacher_topk),
        )
        if value is not None
    ]
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
        return _TeacherSource("logits", dtype, single=single, logits=logits)
    if teacher_topk is not None:
        check_choice("topk_remainder", topk_remainder, reference.TOPK_REMAINDERS)
        indices, logprobs = check_teacher_topk(
            teacher_topk, row_shape, vocab_size, device, topk_remainder
        )
        k = indices.shape[-1]
        logprobs = logprobs.detach().reshape(-1, k)
        return _TeacherSource(
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
    return _TeacherSource(
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


class _Problem:
    """Everything but the differentiable tensors: the teacher, options, rows and chunking."""

    def __init__(self, **fields: Any):
        self.__dict__.update(fields)

    @torch.no_grad()
    def run(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        needs: tuple[bool, bool, bool],
        row_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Row losses (N,) and, for the inputs in ``needs``, the gradients of
        sum_i row_weights_i * loss_i (all ones when None) as float32 accumulators
        (float64 for float64 input)."""
        num_rows, vocab_size = hidden.shape[0], weight.shape[0]
        acc_dtype = reference._compute_dtype(hidden)
        row_loss = torch.zeros(num_rows, dtype=acc_dtype, device=hidden.device)
        grads = _Gradients(hidden, weight, needs, acc_dtype)
        rows_per_chunk, vocab_per_chunk = self.chunks
        for start in range(0, num_rows, rows_per_chunk):
            rows = slice(start, min(num_rows, start + rows_per_chunk))
            chunk_hidden = hidden[rows]
            if self.counted is not None:
                # A row that does not count must not reach G^T h either (0 * NaN = NaN).
                chunk_hidden = torch.where(self.counted[rows, None], chunk_hidden, 0)
            weights = None if row_weights is None else row_weights[rows]
            if vocab_per_chunk >= vocab_size:
                row_loss[rows] = self._full_rows(rows, chunk_hidden, weight, bias, grads, weights)
            else:
                row_loss[rows] = self._vocab_chunked(
                    rows, chunk_hidden, weight, bias, grads, weights
                )
        return (row_loss, *grads.result())

    def _kd_args(self, rows: slice) -> tuple:
        labels = None if self.labels is None else self.labels[rows]
        mask = None if self.mask is None else self.mask[rows]
        o = self.options
        return (
            labels,
            mask,
            o["temperature"],
            o["kind"],
            o["soft_weight"],
            o["hard_weight"],
            o["beta"],
            o["scale_t2"],
            o["ignore_index"],
        )

    def _full_rows(self, rows, chunk_hidden, weight, bias, grads, row_weights):
        """One row chunk over the whole vocabulary, through the backend's kd_loss kernel."""
        logits = F.linear(chunk_hidden, weight, bias)
        teacher = self.teacher.chunk(rows, 0, weight.shape[0])
        forward_op, forward_out_op = _kd_ops(self.backend)
        if not grads.any:
            row_loss, _ = forward_op(logits, teacher, *self._kd_args(rows), False)
            return row_loss
        # The kernel writes d row_loss / d logits over the logits themselves.
        row_loss = forward_out_op(logits, teacher, *self._kd_args(rows), logits)
        if row_weights is not None:
            logits.mul_(row_weights[:, None].to(logits.dtype))
        grads.add(rows, slice(0, weight.shape[0]), logits, chunk_hidden, weight)
        return row_loss

    def _vocab_chunked(self, rows, chunk_hidden, weight, bias, grads, row_weights):
        """One row chunk in vocabulary slices with an online log-sum-exp (float32 math)."""
        o = self.options
        t, kind = o["temperature"], o["kind"]
        soft_scale = o["soft_weight"] * (t * t if o["scale_t2"] else 1.0)
        hard = o["hard_weight"] != 0.0
        vocab_size, step = weight.shape[0], self.chunks[1]
        slices = [slice(v, min(vocab_size, v + step)) for v in range(0, vocab_size, step)]
        acc_dtype = reference._compute_dtype(chunk_hidden)

        def logits_of(columns):
            b = None if bias is None else bias[columns]
            student = F.linear(chunk_hidden, weight[columns], b).to(acc_dtype)
            teacher = self.teacher.chunk(rows, columns.start, columns.stop).to(acc_dtype)
            return student, teacher

        # Pass 1: the normalisers log sum exp(z / t) of the student and of every teacher.
        size = chunk_hidden.shape[0]
        student_lse = chunk_hidden.new_full((size,), -math.inf, dtype=acc_dtype)
        teacher_lse = None
        student_lse_t1 = student_lse.clone()  # at t = 1, for the hard cross-entropy
        for columns in slices:
            student, teacher = logits_of(columns)
            student_lse = torch.logaddexp(student_lse, torch.logsumexp(student / t, dim=-1))
            chunk_teacher_lse = torch.logsumexp(teacher / t, dim=-1)
            teacher_lse = (
                chunk_teacher_lse
                if teacher_lse is None
                else torch.logaddexp(teacher_lse, chunk_teacher_lse)
            )
            if hard:
                student_lse_t1 = torch.logaddexp(student_lse_t1, torch.logsumexp(student, dim=-1))

        def slice_terms(columns):
            """Soft terms of the slice and their partials g = d terms / d log p_S."""
            student, teacher = logits_of(columns)
            log_p_s = (student / t - student_lse[:, None]).requires_grad_()
            log_p_t = reference.mix_teachers(teacher / t - teacher_lse[..., None])
            with torch.enable_grad():
                terms = reference.kd_class_terms(log_p_s, log_p_t, kind=kind, beta=o["beta"])
                (partial,) = torch.autograd.grad(terms.sum(), log_p_s)
            return student, log_p_s.detach(), terms.detach(), partial

        # Pass 2: the loss. d loss / d s_c = (w / t) (g_c - p_S,c sum_j g_j): for kl and
        # soft_ce, g = -p_T sums to -1 and the gradient is ready; otherwise pass 3 takes it.
        soft_rows = torch.zeros(size, dtype=acc_dtype, device=chunk_hidden.device)
        hard_rows = student_lse_t1.clone() if hard else None
        partial_sum = torch.zeros_like(soft_rows)
        gradient_now = kind in ("kl", "soft_ce")
        for columns in slices:
            student, log_p_s, terms, partial = slice_terms(columns)
            soft_rows += terms.sum(dim=-1)
            if hard:
                hard_rows -= self._label_logits(rows, columns, student)
            if gradient_now and grads.any:
                grad = (soft_scale / t) * (partial + log_p_s.exp())
                self._add_slice_grad(
                    rows,
                    columns,
                    grad,
                    student,
                    student_lse_t1,
                    grads,
                    chunk_hidden,
                    weight,
                    row_weights,
                )
            elif grads.any:
                partial_sum += partial.sum(dim=-1)
        if grads.any and not gradient_now:
            for columns in slices:  # pass 3
                student, log_p_s, _, partial = slice_terms(columns)
                grad = (soft_scale / t) * (partial - log_p_s.exp() * partial_sum[:, None])
                self._add_slice_grad(
                    rows,
                    columns,
                    grad,
                    student,
                    student_lse_t1,
                    grads,
                    chunk_hidden,
                    weight,
                    row_weights,
                )
        row_loss = soft_scale * soft_rows
        if hard:
            row_loss = row_loss + o["hard_weight"] * hard_rows
        if self.counted is not None:
            row_loss = torch.where(self.counted[rows], row_loss, 0)
        return row_loss

    def _label_logits(self, rows: slice, columns: slice, student: torch.Tensor) -> torch.Tensor:
        """Each row's logit at its label where the label falls in ``columns``, else 0."""
        local = self.labels[rows] - columns.start
        inside = (local >= 0) & (local < student.shape[1])
        picked = student.gather(1, local.clamp(0, student.shape[1] - 1)[:, None]).squeeze(1)
        return torch.where(inside, picked, 0)

    def _add_slice_grad(
        self, rows, columns, grad, student, student_lse_t1, grads, chunk_hidden, weight, weights
    ):
        """Adds the hard term's gradient, zeroes rows that do not count, applies the row
        weights and hands the slice's gradient (in the input dtype) to ``grads``."""
        if self.options["hard_weight"] != 0.0:
            p_s1 = (student - student_lse_t1[:, None]).exp()
            local = self.labels[rows] - columns.start
            inside = (local >= 0) & (local < student.shape[1])
            column = local.clamp(0, student.shape[1] - 1)[:, None]
            p_s1.scatter_add_(1, column, -inside.to(p_s1.dtype)[:, None])
            grad = grad + self.options["hard_weight"] * p_s1
        if self.counted is not None:
            grad = torch.where(self.counted[rows, None], grad, 0)
        if weights is not None:
            grad = grad * weights[:, None]
        grads.add(rows, columns, grad.to(chunk_hidden.dtype), chunk_hidden, weight)


class _Gradients:
    """Float32 (float64) accumulators of the hidden, weight and bias gradients."""

    def __init__(self, hidden, weight, needs, acc_dtype):
        need_hidden, need_weight, need_bias = needs
        self.any = any(needs)
        zeros = dict(dtype=acc_dtype, device=hidden.device)
        self.hidden = torch.zeros(hidden.shape, **zeros) if need_hidden else None
        self.weight = torch.zeros(weight.shape, **zeros) if need_weight else None
        self.bias = torch.zeros(weight.shape[0], **zeros) if need_bias else None

    def add(self, rows, columns, grad_logits, chunk_hidden, weight) -> None:
        """Adds a chunk's share: G W to the hidden rows, G^T h to the weight rows, sum G."""
        if self.hidden is not None:
            self.hidden[rows] += grad_logits @ weight[columns]
        if self.weight is not None:
            block = self.weight[columns]
            if block.dtype == grad_logits.dtype:
                block.addmm_(grad_logits.T, chunk_hidden)
            else:  # a half-precision product, summed in float32
                block += grad_logits.T @ chunk_hidden
        if self.bias is not None:
            self.bias[columns] += grad_logits.sum(dim=0, dtype=self.bias.dtype)

    def result(self) -> tuple:
        return self.hidden, self.weight, self.bias


class _FusedLinearKD(torch.autograd.Function):
    """Scalar reductions: forward computes the loss and the unscaled gradients at once,
    backward scales them by grad_output / divisor. ``"none"``: forward keeps the inputs and
    backward re-runs the chunks with the per-row grad_output as row weights."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, problem: _Problem):
        flat = hidden.reshape(-1, hidden.shape[-1])
        ctx.problem, ctx.hidden_shape = problem, hidden.shape
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if problem.reduction == "none":
            row_loss = problem.run(flat, weight, bias, (False, False, False))[0]
            ctx.save_for_backward(hidden, weight, bias)
            return row_loss.reshape(problem.row_shape)
        row_loss, *grads = problem.run(flat, weight, bias, problem.needs)
        divisor = row_divisor(
            problem.reduction, row_loss.shape[0], weight.shape[0], problem.counted
        )
        ctx.save_for_backward(*grads)
        ctx.divisor = divisor
        return row_loss.sum() / divisor

    @staticmethod
    def backward(ctx, grad_output):
        problem = ctx.problem
        if problem.reduction == "none":
            hidden, weight, bias = ctx.saved_tensors
            flat = hidden.reshape(-1, hidden.shape[-1])
            row_weights = grad_output.reshape(-1).to(reference._compute_dtype(hidden))
            needs = tuple(ctx.needs_input_grad[:3])
            grads = problem.run(flat, weight, bias, needs, row_weights)[1:]
        else:
            scale = grad_output / ctx.divisor
            grads = [None if g is None else g * scale for g in ctx.saved_tensors]
        grad_hidden, grad_weight, grad_bias = (
            None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)
        )
        if grad_hidden is not None:
            grad_hidden = grad_hidden.reshape(ctx.hidden_shape)
        return grad_hidden, grad_weight, grad_bias, None
