"""Vocabulary-parallel KD: every rank of a process group holds one slice of the classes.

Rank r of a P-rank group holds the contiguous, equal slice [r V/P, (r+1) V/P) of the student's
logits (or of its LM head's weight and bias) and of the teacher's (logits, or head); rows,
labels (global class ids), masks and hidden states are the same on every rank. Every quantity
a row's loss needs is a maximum or a sum over classes, so each is formed on the local slice and
all-reduced: a few floats per row, never the logits. Per chunk of rows, in order:

1. MAX: the row maxima of a = s / t, of each teacher's b = z_T / t (and of s, for the hard
   term at t = 1).
2. SUM: the sum-exps relative to those maxima, giving lse_a, lse_b (lse_s); the label's logit
   (held by one rank).
3. SUM: per teacher, S = sum_c p_S,c expm1(d_c) with d = (teacher - student) / t (the logits
   subtracted first), so that δ = lse_b - lse_a = log1p(S) stays exact when student and
   teacher agree (``reference.gap_terms``, ``reference.delta_from_gaps``).
4. SUM: the row losses (and, for reverse_kl and jsd, the row sum of the gradient weights):
   the loss every rank returns, and what those two gradients need.

With u = d - δ = log(p_T / p_S) (``reference.log_ratio_from_delta``), the per-class terms and
gradient weights are the single-process ones, ``reference.kd_class_terms`` and
``reference.kd_class_gradient_weights``: log-ratio forms where |u| <= 1 (exact for small u),
the usual forms elsewhere. A row's loss is soft_weight (t^2) times the sum of the terms, plus
hard_weight (lse_s - s_label); d/ds of the soft part is (soft_weight (t^2) / t)
(w_c - p_S,c sum_j w_j), of the hard part hard_weight (softmax(s) - onehot(label)).

The math is float32 PyTorch (float64 for float64 input) on every backend: the matmuls of the
fused head and the collectives are the cost. Every rank returns the global loss; the local
logits (or weight and bias slices) get their columns (rows) of the full gradient; the hidden
states, replicated, get the sum over ranks of their per-slice gradients, through
``distributed.sum_gradient_over_ranks``. Every rank must run backward with the same
grad_output (as it does when every rank calls ``loss.backward()``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kd_kernels import reference
from kd_kernels._checks import check_choice, check_float_tensor, check_teacher_topk
from kd_kernels._chunked_kd import TeacherSource, _Gradients
from kd_kernels.distributed import reject_dtensor, sum_gradient_over_ranks
from kd_kernels.functional import (
    check_kd_options,
    check_teacher_logits,
    counted_rows,
    kd_op_options,
    row_divisor,
)

__all__ = ["fused_linear_kd_loss", "kd_loss"]

# Elements of one chunk of local logits: the float32 math holds up to ~10 temporaries of this
# size (the single-process path: one chunk's logits, its kernel is fused).
CHUNK_BUDGET = {"cpu": 2**21, "cuda": 2**24}
MIN_CHUNK_ROWS = 32
TOPK_REMAINDERS = ("renormalize", "spread")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    process_group: Any,
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
) -> torch.Tensor:
    """:func:`kd_kernels.kd_loss` over a vocabulary split across ``process_group``.

    Args:
        student_logits: (..., C / P) this rank's slice [r C/P, (r+1) C/P) of the logits.
        teacher_logits: (..., C / P) or (K, ..., C / P), the same slice of the teacher's. Or:
        teacher_topk: ``(indices, logprobs)`` of shape (..., k), the whole sparse teacher
            (global class ids, the same on every rank); ``topk_remainder`` "renormalize" or
            "spread".
        labels: (...) global class ids (or ignore_index), the same on every rank.
        The other options are kd_loss's, over the C classes of all ranks.

    Returns:
        The loss of the whole vocabulary, on every rank: float32 (float64 for float64 input),
        a scalar, or (...) for "none".
    """
    check_float_tensor("student_logits", student_logits)
    if student_logits.dim() == 0 or student_logits.shape[-1] == 0:
        raise ValueError("student_logits must be (..., C / P) with C / P >= 1")
    group = _check_group(process_group)
    local_vocab = student_logits.shape[-1]
    world = dist.get_world_size(group)
    _check_equal_slices(local_vocab, group, student_logits.device)
    row_shape = student_logits.shape[:-1]
    vocab_size = world * local_vocab
    check_kd_options(
        temperature,
        kind,
        reduction,
        beta,
        row_shape,
        vocab_size,
        student_logits.device,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
        hard_weight=hard_weight,
    )
    if teacher_topk is not None:
        if teacher_logits is not None:
            raise ValueError("pass the teacher once: teacher_logits or teacher_topk, not both")
        teacher = _topk_source(teacher_topk, topk_remainder, row_shape, vocab_size, student_logits)
    elif teacher_logits is None:
        raise ValueError("kd_loss needs a teacher: teacher_logits or teacher_topk")
    else:
        num_teachers = check_teacher_logits(
            teacher_logits, student_logits.shape, student_logits.dtype, student_logits.device
        )
        logits = teacher_logits.detach().reshape(num_teachers, -1, local_vocab)
        teacher = TeacherSource("logits", student_logits.dtype, logits=logits)
    student = student_logits.reshape(-1, local_vocab)
    problem = _problem(
        group,
        teacher,
        student.shape[0],
        local_vocab,
        student.device,
        kd_op_options(temperature, kind, soft_weight, hard_weight, beta, scale_t2, ignore_index),
        mask,
        labels,
        reduction,
        row_shape,
        rows_per_chunk=None,
    )
    # Decided here: inside Function.forward grad mode is off.
    problem.needs = (torch.is_grad_enabled() and student.requires_grad, False, False)
    return _VocabParallelKD.apply(student, problem)


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    process_group: Any,
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
) -> torch.Tensor:
    """:func:`kd_kernels.fused_linear_kd_loss` with the LM heads split by vocabulary rows.

    Args:
        student_hidden: (..., H), the same on every rank (gets the full gradient: the sum over
            ranks of each slice's share, all-reduced in backward).
        student_weight: (V / P, H) this rank's rows [r V/P, (r+1) V/P) of the head;
            student_bias (V / P,) or None. They get their rows of the full gradient.
        teacher_logits: (..., V / P) or (K, ..., V / P), this rank's slice. Or
        teacher_hidden (..., H_T), the same on every rank, with teacher_weight (V / P, H_T)
            and teacher_bias (V / P,), this rank's rows. Or teacher_topk (global ids).
        chunk_size: rows per chunk (of a ``(rows, vocab)`` pair only the rows count: a rank's
            slice is one vocabulary chunk). None: about 2M local logits per chunk (16M on a
            GPU), at least 32 rows.
        The other options are as in :func:`kd_loss` of this module.

    Returns:
        The loss of the whole vocabulary, on every rank (float32; float64 for float64 input).
    """
    from kd_kernels.fused_linear import _check_head, _teacher_source

    check_float_tensor("student_hidden", student_hidden)
    check_float_tensor("student_weight", student_weight)
    reject_dtensor(student_weight=student_weight, teacher_weight=teacher_weight)
    if student_hidden.dim() == 0:
        raise ValueError("student_hidden must be (..., H), got a 0-d tensor")
    _check_head("student", student_hidden, student_weight, student_bias, same_dtype=True)
    group = _check_group(process_group)
    local_vocab = student_weight.shape[0]
    device = student_hidden.device
    _check_equal_slices(local_vocab, group, device)
    row_shape = student_hidden.shape[:-1]
    vocab_size = dist.get_world_size(group) * local_vocab
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
    if teacher_topk is not None:
        if teacher_logits is not None or teacher_hidden is not None or teacher_weight is not None:
            raise ValueError("fused_linear_kd_loss needs exactly one teacher form")
        teacher = _topk_source(teacher_topk, topk_remainder, row_shape, vocab_size, student_hidden)
    else:
        teacher = _teacher_source(
            row_shape,
            local_vocab,
            student_hidden,
            teacher_logits,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            None,
            topk_remainder,
        )
    rows = chunk_size[0] if isinstance(chunk_size, (tuple, list)) else chunk_size
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise TypeError(f"chunk_size must be None, rows or (rows, vocab), got {chunk_size!r}")
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    problem = _problem(
        group,
        teacher,
        hidden.shape[0],
        local_vocab,
        device,
        kd_op_options(temperature, kind, soft_weight, hard_weight, beta, scale_t2, ignore_index),
        mask,
        labels,
        reduction,
        row_shape,
        rows_per_chunk=rows,
    )
    problem.needs = tuple(
        torch.is_grad_enabled() and x is not None and x.requires_grad
        for x in (student_hidden, student_weight, student_bias)
    )
    if problem.needs[0]:
        # Identity forward; backward sums the hidden-state gradient of every slice.
        hidden = sum_gradient_over_ranks(hidden, group)
    return _VocabParallelFusedLinearKD.apply(hidden, student_weight, student_bias, problem)


def _check_group(process_group: Any) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group needs an initialised torch.distributed")
    if process_group is dist.group.WORLD:
        return None
    return process_group


def _check_equal_slices(local_vocab: int, group: Any, device: torch.device) -> None:
    """Every rank must hold the same number of classes (one small all-reduce, one sync)."""
    if torch.compiler.is_compiling():
        return
    sizes = torch.tensor([local_vocab, -local_vocab], device=device, dtype=torch.int64)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
    largest, smallest = int(sizes[0]), -int(sizes[1])
    if largest != smallest:
        raise ValueError(
            "vocabulary-parallel KD needs equal slices on every rank: rank "
            f"{dist.get_rank(group)} holds {local_vocab} classes, others between {smallest} and "
            f"{largest}; pad the vocabulary to a multiple of the group size"
        )


def _topk_source(
    teacher_topk: Any,
    remainder: str,
    row_shape: torch.Size,
    vocab_size: int,
    student: torch.Tensor,
) -> TeacherSource:
    """A sparse teacher over the global classes, densified one local slice at a time."""
    if remainder == "bucket":
        # Its dense form depends on the student's log-sum-exp outside the top k over all
        # ranks: one more all-reduce per row, not written yet.
        raise NotImplementedError(
            "topk_remainder='bucket' is not implemented for vocabulary-parallel KD "
            "(process_group); use 'renormalize' or 'spread', or one process"
        )
    check_choice("topk_remainder", remainder, TOPK_REMAINDERS)
    indices, logprobs = check_teacher_topk(
        teacher_topk, row_shape, vocab_size, student.device, remainder
    )
    k = indices.shape[-1]
    logprobs = logprobs.detach().reshape(-1, k)
    return TeacherSource(
        "topk",
        student.dtype,
        indices=indices.reshape(-1, k),
        logprobs=logprobs,
        num_classes=vocab_size,
        rest=reference.topk_remainder_logprob(logprobs, vocab_size, remainder),
    )


def _problem(
    group: Any,
    teacher: TeacherSource,
    num_rows: int,
    local_vocab: int,
    device: torch.device,
    options: dict,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    reduction: str,
    row_shape: torch.Size,
    rows_per_chunk: int | None,
) -> VocabParallelKD:
    flat_mask = None if mask is None else mask.reshape(-1)
    if flat_mask is not None and flat_mask.dtype != torch.bool:
        flat_mask = flat_mask != 0
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64)
    if rows_per_chunk is None:
        budget = CHUNK_BUDGET["cuda" if device.type == "cuda" else "cpu"]
        rows_per_chunk = max(MIN_CHUNK_ROWS, budget // local_vocab)
    return VocabParallelKD(
        group=group,
        teacher=teacher,
        options=options,
        labels=flat_labels,
        counted=counted_rows(num_rows, flat_mask, flat_labels, options["ignore_index"], device),
        reduction=reduction,
        local_vocab=local_vocab,
        rows_per_chunk=max(1, min(rows_per_chunk, num_rows)),
        row_shape=row_shape,
        needs=(False, False, False),
    )


class VocabParallelKD:
    """The options, teacher, counted rows and process group of one call, and the chunk loops
    (over logits, or over an LM head) that compute the loss and its gradients from them."""

    def __init__(self, **fields: Any):
        self.__dict__.update(fields)
        self.offset = dist.get_rank(self.group) * self.local_vocab
        self.vocab_size = dist.get_world_size(self.group) * self.local_vocab

    def divisor(self, num_rows: int) -> torch.Tensor | float | int:
        """What the summed row losses are divided by (no host sync). A ``normalizer`` is
        applied by the public functions around this (reduction "sum", then divided)."""
        return row_divisor(self.reduction, num_rows, self.vocab_size, self.counted)

    def _all_reduce(self, x: torch.Tensor, op: Any) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, op=op, group=self.group)
        return x

    def _teacher_block(self, rows: slice) -> torch.Tensor:
        if self.teacher.kind == "topk":  # global ids: this rank's columns of the dense teacher
            return self.teacher.chunk(rows, self.offset, self.offset + self.local_vocab)
        return self.teacher.chunk(rows, 0, self.local_vocab)

    @torch.no_grad()
    def run_logits(
        self, student: torch.Tensor, want_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Row losses (N,) and d loss_i / d student (N, C / P) in the student's dtype."""
        num_rows = student.shape[0]
        row_loss = torch.zeros(num_rows, dtype=_acc_dtype(student), device=student.device)
        grad = torch.empty_like(student) if want_grad else None
        for start in range(0, num_rows, self.rows_per_chunk):
            rows = slice(start, min(num_rows, start + self.rows_per_chunk))
            row_loss[rows], chunk_grad = self.rows(rows, student[rows], want_grad)
            if want_grad:
                grad[rows] = chunk_grad
        return row_loss, grad

    @torch.no_grad()
    def run_head(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        needs: tuple[bool, bool, bool],
        row_weights: torch.Tensor | None = None,
    ) -> tuple:
        """Row losses (N,) and, for the inputs in ``needs``, the gradients of
        sum_i row_weights_i loss_i through this rank's slice (float32 accumulators; the
        hidden-state one is this slice's share)."""
        num_rows = hidden.shape[0]
        acc_dtype = _acc_dtype(hidden)
        row_loss = torch.zeros(num_rows, dtype=acc_dtype, device=hidden.device)
        grads = _Gradients(hidden, weight, needs, acc_dtype)
        columns = slice(0, self.local_vocab)
        for start in range(0, num_rows, self.rows_per_chunk):
            rows = slice(start, min(num_rows, start + self.rows_per_chunk))
            chunk_hidden = hidden[rows]
            if self.counted is not None:
                # A row that does not count must not reach G^T h either (0 * NaN = NaN).
                chunk_hidden = torch.where(self.counted[rows, None], chunk_hidden, 0)
            logits = F.linear(chunk_hidden, weight, bias)
            row_loss[rows], grad = self.rows(rows, logits, grads.any)
            if grads.any:
                if row_weights is not None:
                    grad = grad * row_weights[rows, None]
                grads.add(rows, columns, grad.to(hidden.dtype), chunk_hidden, weight)
        return (row_loss, *grads.result())

    def rows(
        self, rows: slice, student: torch.Tensor, want_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One chunk of rows: the global row losses (R,) and, when asked, d loss_i / d s over
        the local columns (R, C / P), both in float32 (float64). Four all-reduces of (≤ K+2, R)."""
        o = self.options
        t, kind, beta = o["temperature"], o["kind"], o["beta"]
        hard = o["hard_weight"] != 0.0
        acc_dtype = _acc_dtype(student)
        s = student.to(acc_dtype)
        a = s / t
        teacher = self._teacher_block(rows).to(acc_dtype)  # (K, R, C / P)
        b = teacher / t
        num_teachers = b.shape[0]
        separate_hard = hard and t != 1.0  # at t = 1 the hard term's lse is lse_a

        # 1. Row maxima.
        maxima = [a.amax(-1), *b.amax(-1)]
        if separate_hard:
            maxima.append(s.amax(-1))
        maxima = self._all_reduce(torch.stack(maxima), dist.ReduceOp.MAX)
        # A row that is -inf everywhere keeps shift 0 (as torch.logsumexp does).
        shift = torch.where(torch.isfinite(maxima), maxima, torch.zeros_like(maxima))

        # 2. Sum-exps, and the label's logit (on the rank that holds it).
        sums = [(a - shift[0, :, None]).exp().sum(-1)]
        sums += list((b - shift[1 : 1 + num_teachers, :, None]).exp().sum(-1))
        if separate_hard:
            sums.append((s - shift[-1, :, None]).exp().sum(-1))
        if hard:
            column, here = self._label_columns(rows)
            sums.append(torch.where(here, s.gather(1, column).squeeze(1), 0))
        sums = self._all_reduce(torch.stack(sums), dist.ReduceOp.SUM)
        count = 1 + num_teachers + int(separate_hard)
        lse = shift[:count] + sums[:count].log()
        lse_a, lse_b = lse[0], lse[1 : 1 + num_teachers]
        log_p_s = a - lse_a[:, None]
        teacher_log_probs = b - lse_b[..., None]
        log_p_t = reference.mix_teachers(teacher_log_probs)
        del a, b  # chunk-sized temporaries go as soon as they are used: they set the peak

        # 3. Per teacher, δ = lse_b - lse_a = log1p(sum p_S expm1(d)): exact when the rows
        #    agree. d = (teacher - student) / t, the logits subtracted first.
        d = (teacher - s) / t
        lse_gap = (lse_b - lse_a)[..., None]
        # b - lse_a is clamped as in reference.log_ratio: past 2 the sum is not used.
        gaps = reference.gap_terms(d, log_p_s, (teacher_log_probs + lse_gap).clamp(max=2.0))
        del teacher, teacher_log_probs
        gaps = self._all_reduce(gaps.sum(-1), dist.ReduceOp.SUM)
        delta = reference.delta_from_gaps(gaps, lse_gap[..., 0])[..., None]
        u, near = reference.log_ratio_from_delta(d, delta, self.vocab_size)
        del d

        # 4. Per-class terms and gradient weights w (d row / d a_c = w_c - p_S,c sum_j w_j),
        #    their row sums all-reduced (sum_j w_j = 0 for kl and soft_ce).
        log_ratio = dict(kind=kind, beta=beta, u=u, near=near)
        soft = reference.kd_class_terms(log_p_s, log_p_t, **log_ratio)
        weights = None
        if want_grad:
            weights = reference.kd_class_gradient_weights(log_p_s, log_p_t, **log_ratio)
        del u, near, log_p_t
        weight_sum = kind not in ("kl", "soft_ce") and want_grad
        row_sums = [soft.sum(-1), *([weights.sum(-1)] if weight_sum else [])]
        del soft
        row_sums = self._all_reduce(torch.stack(row_sums), dist.ReduceOp.SUM)
        soft_rows = row_sums[0]

        soft_scale = o["soft_weight"] * (t * t if o["scale_t2"] else 1.0)
        row_loss = soft_scale * soft_rows
        if hard:
            lse_s = lse[-1] if separate_hard else lse_a
            row_loss = row_loss + o["hard_weight"] * (lse_s - sums[-1])
        counted = None if self.counted is None else self.counted[rows]
        if counted is not None:
            row_loss = torch.where(counted, row_loss, 0)
        if not want_grad:
            return row_loss, None

        grad_a = weights - log_p_s.exp() * row_sums[1][:, None] if weight_sum else weights
        grad = (soft_scale / t) * grad_a
        if hard:
            p_s1 = (s - lse_s[:, None]).exp() if separate_hard else log_p_s.exp()
            p_s1 = p_s1.scatter_add(1, column, -here.to(acc_dtype)[:, None])
            grad = grad + o["hard_weight"] * p_s1
        if counted is not None:
            grad = torch.where(counted[:, None], grad, 0)
        return row_loss, grad

    def _label_columns(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's label as a local column (clamped into the slice, (R, 1)) and whether
        this rank holds it (R,)."""
        labels = self.labels[rows]
        local = labels - self.offset
        here = (local >= 0) & (local < self.local_vocab) & (labels != self.options["ignore_index"])
        return local.clamp(0, self.local_vocab - 1)[:, None], here


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return reference._compute_dtype(x)


class _VocabParallelKD(torch.autograd.Function):
    """Forward computes the loss and the unscaled gradient of the local logits; backward
    scales it (in place, handing the buffer over; a second backward recomputes it)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, problem: VocabParallelKD):
        row_loss, grad = problem.run_logits(student, problem.needs[0])
        ctx.problem, ctx.grad = problem, grad
        ctx.save_for_backward(student)
        if problem.reduction == "none":
            return row_loss.reshape(problem.row_shape)
        ctx.divisor = problem.divisor(row_loss.shape[0])
        return row_loss.sum() / ctx.divisor

    @staticmethod
    def backward(ctx, grad_output):
        problem, grad, ctx.grad = ctx.problem, ctx.grad, None
        if grad is None:  # a second backward: the first one handed the buffer over
            (student,) = ctx.saved_tensors
            grad = problem.run_logits(student, True)[1]
        if problem.reduction == "none":
            return grad.mul_(grad_output.reshape(-1, 1).to(grad.dtype)), None
        scale = (grad_output / ctx.divisor).to(grad.dtype)
        return grad.mul_(scale), None


class _VocabParallelFusedLinearKD(torch.autograd.Function):
    """As kd_kernels.fused_linear's _FusedLinearKD, on this rank's slice of the head: scalar
    reductions form the gradients in forward and scale them in backward; "none" re-runs the
    chunks (and their all-reduces) in backward with grad_output as row weights."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, problem: VocabParallelKD):
        ctx.problem = problem
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(hidden, weight, bias)
        if problem.reduction == "none":
            row_loss = problem.run_head(hidden, weight, bias, (False, False, False))[0]
            return row_loss.reshape(problem.row_shape)
        row_loss, *grads = problem.run_head(hidden, weight, bias, problem.needs)
        ctx.gradients, ctx.divisor = grads, problem.divisor(row_loss.shape[0])
        return row_loss.sum() / ctx.divisor

    @staticmethod
    def backward(ctx, grad_output):
        problem = ctx.problem
        hidden, weight, bias = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if problem.reduction == "none":
            row_weights = grad_output.reshape(-1).to(_acc_dtype(hidden))
            grads = problem.run_head(hidden, weight, bias, needs, row_weights)[1:]
        else:
            grads, ctx.gradients = ctx.gradients, None
            if grads is None:
                grads = problem.run_head(hidden, weight, bias, needs)[1:]
            scale = grad_output / ctx.divisor
            grads = [None if g is None else g.mul_(scale) for g in grads]
        return (
            *(
                None if g is None else g.to(dtype)
                for g, dtype in zip(grads, ctx.dtypes, strict=True)
            ),
            None,
        )
