"""The chunk loop of fused_linear_kd_loss: row chunks through the backend's kd_loss kernel,
or rows x vocabulary slices with an online log-sum-exp (see kd_kernels.fused_linear)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from kd_kernels import reference
from kd_kernels.functional import _kd_ops


class TeacherSource:
    """Teacher logits for a block of rows and vocabulary columns, made on demand.

    ``chunk(rows, start, stop)`` -> (K, len(rows), stop - start) in the student's dtype, no
    gradient, last dim contiguous, the K teachers stacked (what the kd_loss ops take).
    """

    def __init__(self, kind: str, dtype: torch.dtype, single: bool = True, **tensors: Any):
        self.kind, self.dtype, self.single = kind, dtype, single
        self.transform = None
        self.__dict__.update(tensors)

    @torch.no_grad()
    def chunk(self, rows: slice, start: int, stop: int) -> torch.Tensor:
        if self.kind == "logits":
            block = self.logits[:, rows, start:stop]
            return block if block.shape[0] == 1 or block.is_contiguous() else block.contiguous()
        if self.kind == "head":
            bias = None if self.bias is None else self.bias[start:stop]
            logits = F.linear(self.hidden[rows], self.weight[start:stop], bias)
            if self.transform is not None:  # the teacher's own soft-cap / logit scale
                logits = self.transform.apply(logits.float())
            return logits.to(self.dtype)[None]
        return self._topk_chunk(rows, start, stop)

    def _topk_chunk(self, rows: slice, start: int, stop: int) -> torch.Tensor:
        indices, logprobs = self.indices[rows], self.logprobs[rows].to(self.dtype)
        width = stop - start
        if start == 0 and stop == self.num_classes:
            # Whole rows go to the kd_loss kernels: keep them contiguous (aligned row starts
            # for the CUDA kernel's 16-byte packs), without the spare column below.
            dense = self.rest[rows].to(self.dtype).expand(-1, width).contiguous()
            return dense.scatter_(1, indices, logprobs)[None]
        # Entries outside [start, stop) are sent to a spare last column, then dropped.
        local = indices - start
        local = torch.where((local >= 0) & (local < width), local, width)
        dense = self.rest[rows].to(self.dtype).expand(-1, width + 1).contiguous()
        return dense.scatter_(1, local, logprobs)[None, :, :width]


class ChunkedKD:
    """Everything but the differentiable tensors (the teacher, options, counted rows, chunk
    sizes) and the chunk loop that computes the loss and the gradients from them."""

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
        chain = None
        if self.transform is not None:  # soft-cap / logit scale: the head's own logits
            chain = self.transform.derivative(logits) if grads.any else None
            self.transform.apply_(logits)
        teacher = self.teacher.chunk(rows, 0, weight.shape[0])
        forward_op, forward_out_op = _kd_ops(self.backend)
        if not grads.any:
            row_loss, _ = forward_op(logits, teacher, *self._kd_args(rows), False)
            return row_loss
        # The kernel writes d row_loss / d logits over the logits themselves.
        row_loss = forward_out_op(logits, teacher, *self._kd_args(rows), logits)
        if chain is not None:  # through tanh and the scale to the raw logits
            logits.mul_(chain)
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

        def logits_of(columns, with_chain=False):
            """The slice's student logits (transformed as the head does), teacher logits and,
            when asked, d transformed / d raw student logits (None: no transform)."""
            b = None if bias is None else bias[columns]
            student = F.linear(chunk_hidden, weight[columns], b).to(acc_dtype)
            chain = None
            if self.transform is not None:
                chain = self.transform.derivative(student) if with_chain else None
                student = self.transform.apply(student)
            teacher = self.teacher.chunk(rows, columns.start, columns.stop).to(acc_dtype)
            return student, teacher, chain

        # Pass 1: the normalisers log sum exp(z / t) of the student and of every teacher, and
        # per teacher gap = sum_c p_S expm1(d_c), d = (teacher - student) / t, rescaled with the
        # student's running normaliser, for delta = lse_T - lse_S in log-ratio form.
        size = chunk_hidden.shape[0]
        student_lse = chunk_hidden.new_full((size,), -math.inf, dtype=acc_dtype)
        teacher_lse = gap = None
        student_lse_t1 = student_lse.clone()  # at t = 1, for the hard cross-entropy
        for columns in slices:
            student, teacher, _ = logits_of(columns)
            new_lse = torch.logaddexp(student_lse, torch.logsumexp(student / t, dim=-1))
            shift = torch.where(new_lse == -math.inf, 0, new_lse)
            chunk_gap = reference.gap_terms(
                (teacher - student) / t, student / t - shift[:, None], teacher / t - shift[:, None]
            ).sum(dim=-1)
            chunk_teacher_lse = torch.logsumexp(teacher / t, dim=-1)
            if teacher_lse is None:
                teacher_lse, gap = chunk_teacher_lse, chunk_gap
            else:
                teacher_lse = torch.logaddexp(teacher_lse, chunk_teacher_lse)
                gap = gap * torch.exp(student_lse - shift) + chunk_gap
            student_lse = new_lse
            if hard:
                student_lse_t1 = torch.logaddexp(student_lse_t1, torch.logsumexp(student, dim=-1))
        delta = reference.delta_from_gaps(gap, teacher_lse - student_lse)[..., None]

        def slice_terms(columns):
            """Soft terms of the slice and their gradient weights w (see
            reference.kd_class_gradient_weights)."""
            student, teacher, chain = logits_of(columns, with_chain=grads.any)
            log_p_s = student / t - student_lse[:, None]
            log_p_t = reference.mix_teachers(teacher / t - teacher_lse[..., None])
            u, near = reference.log_ratio_from_delta((teacher - student) / t, delta, vocab_size)
            log_ratio = dict(kind=kind, beta=o["beta"], u=u, near=near)
            terms = reference.kd_class_terms(log_p_s, log_p_t, **log_ratio)
            weights = reference.kd_class_gradient_weights(log_p_s, log_p_t, **log_ratio)
            return student, log_p_s, terms, (weights, chain)

        def add_gradient(columns, student, log_p_s, weights_and_chain, weight_sum):
            weights, chain = weights_and_chain
            grad = (soft_scale / t) * (weights - log_p_s.exp() * weight_sum)
            self._add_slice_grad(
                chain,
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

        # Pass 2: the loss. d loss / d s_c = (w / t) (w_c - p_S,c sum_j w_j): for kl and
        # soft_ce sum_j w_j = 0 and the gradient is ready; otherwise pass 3 takes it.
        soft_rows = torch.zeros(size, dtype=acc_dtype, device=chunk_hidden.device)
        hard_rows = student_lse_t1.clone() if hard else None
        weight_sum = torch.zeros_like(soft_rows)
        gradient_now = kind in ("kl", "soft_ce")
        for columns in slices:
            student, log_p_s, terms, weights = slice_terms(columns)
            soft_rows += terms.sum(dim=-1)
            if hard:
                hard_rows -= self._label_logits(rows, columns, student)
            if gradient_now and grads.any:
                add_gradient(columns, student, log_p_s, weights, 0.0)
            elif grads.any:
                weight_sum += weights[0].sum(dim=-1)
        if grads.any and not gradient_now:
            for columns in slices:  # pass 3
                student, log_p_s, _, weights = slice_terms(columns)
                add_gradient(columns, student, log_p_s, weights, weight_sum[:, None])
        row_loss = soft_scale * soft_rows
        if hard:
            row_loss = row_loss + o["hard_weight"] * hard_rows
        if self.counted is not None:
            row_loss = torch.where(self.counted[rows], row_loss, 0)
        return row_loss

    def _label_columns(self, rows: slice, columns: slice, width: int):
        """Each row's label as a column of the slice (clamped into it, (R, 1)) and whether
        the label really falls in ``columns`` (R,)."""
        local = self.labels[rows] - columns.start
        inside = (local >= 0) & (local < width)
        return local.clamp(0, width - 1)[:, None], inside

    def _label_logits(self, rows: slice, columns: slice, student: torch.Tensor) -> torch.Tensor:
        """Each row's logit at its label where the label falls in ``columns``, else 0."""
        column, inside = self._label_columns(rows, columns, student.shape[1])
        return torch.where(inside, student.gather(1, column).squeeze(1), 0)

    def _add_slice_grad(
        self,
        chain,
        rows,
        columns,
        grad,
        student,
        student_lse_t1,
        grads,
        chunk_hidden,
        weight,
        weights,
    ):
        """Adds the hard term's gradient, applies the head transform's derivative ``chain``
        (None: none), zeroes rows that do not count, applies the row weights and hands the
        slice's gradient (in the input dtype) to ``grads``."""
        if self.options["hard_weight"] != 0.0:
            p_s1 = (student - student_lse_t1[:, None]).exp()
            column, inside = self._label_columns(rows, columns, student.shape[1])
            p_s1.scatter_add_(1, column, -inside.to(p_s1.dtype)[:, None])
            grad = grad + self.options["hard_weight"] * p_s1
        if chain is not None:
            grad = grad * chain
        if self.counted is not None:
            grad = torch.where(self.counted[rows, None], grad, 0)
        if weights is not None:
            grad = grad * weights[:, None]
        grads.add(rows, columns, grad.to(chunk_hidden.dtype), chunk_hidden, weight)


# torch's mixed-precision GEMM (half inputs, float32 output; CUDA only): addmm.dtype_out.
_HAS_FLOAT32_OUTPUT_GEMM = hasattr(torch.ops.aten.addmm, "dtype_out")


def _add_product(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """accumulator += a @ b, accumulator float32 (float64), a and b in the inputs' dtype.

    Half-precision a and b never make a rounded half-precision product: on CUDA one GEMM reads
    them as they are and accumulates into the float32 output in place (no temporary); where
    torch has no such GEMM (CPU) they are multiplied in float32 (a float32 copy of a and b,
    the chunk's size: a documented fallback, exact, slower)."""
    if a.dtype == accumulator.dtype:
        accumulator.addmm_(a, b)
    elif accumulator.is_cuda and _HAS_FLOAT32_OUTPUT_GEMM:
        torch.addmm(accumulator, a, b, out_dtype=accumulator.dtype, out=accumulator)
    else:
        accumulator.addmm_(a.to(accumulator.dtype), b.to(accumulator.dtype))


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
            _add_product(self.hidden[rows], grad_logits, weight[columns])
        if self.weight is not None:
            _add_product(self.weight[columns], grad_logits.T, chunk_hidden)
        if self.bias is not None:
            self.bias[columns] += grad_logits.sum(dim=0, dtype=self.bias.dtype)

    def result(self) -> tuple:
        return self.hidden, self.weight, self.bias
