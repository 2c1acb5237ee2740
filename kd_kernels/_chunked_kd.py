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

    A top-k teacher with ``bucket=True`` (``topk_remainder="bucket"``) depends on the student:
    its chunk needs the block's student logits and the rows' lse_rest (see
    ``reference.topk_bucket_teacher_logits``) and comes in float32 (float64), whatever the
    student's dtype, because rounding it would break its constant ratio to the student.
    """

    bucket = False

    def __init__(self, kind: str, dtype: torch.dtype, single: bool = True, **tensors: Any):
        self.kind, self.dtype, self.single = kind, dtype, single
        self.transform = None
        self.__dict__.update(tensors)

    def outside(self, rows: slice, start: int, stop: int) -> torch.Tensor:
        """(len(rows), stop - start) bool: the block's columns outside each row's top k."""
        width = stop - start
        local = self.indices[rows] - start
        local = torch.where((local >= 0) & (local < width), local, width)  # spare column
        block = torch.ones(local.shape[0], width + 1, dtype=torch.bool, device=local.device)
        return block.scatter_(1, local, False)[:, :width]

    def rest_logsumexp(self, rows: slice, start: int, stop: int, student: torch.Tensor):
        """(len(rows),) lse of student / t over the block's columns outside the top k, float32
        (float64); student (len(rows), stop - start) logits of those columns."""
        a = student.to(self.log_r.dtype) / self.temperature
        return torch.where(self.outside(rows, start, stop), a, -math.inf).logsumexp(dim=-1)

    @torch.no_grad()
    def chunk(
        self,
        rows: slice,
        start: int,
        stop: int,
        student: torch.Tensor | None = None,
        lse_rest: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.kind == "logits":
            block = self.logits[:, rows, start:stop]
            return block if block.shape[0] == 1 or block.is_contiguous() else block.contiguous()
        if self.kind == "head":
            bias = None if self.bias is None else self.bias[start:stop]
            logits = F.linear(self.hidden[rows], self.weight[start:stop], bias)
            if self.transform is not None:  # the teacher's own soft-cap / logit scale
                logits = self.transform.apply(logits.float())
            return logits.to(self.dtype)[None]
        return self._topk_chunk(rows, start, stop, student, lse_rest)

    def _topk_chunk(self, rows, start, stop, student, lse_rest) -> torch.Tensor:
        if self.bucket:
            return self._bucket_chunk(rows, start, stop, student, lse_rest)
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

    def _bucket_chunk(self, rows, start, stop, student, lse_rest) -> torch.Tensor:
        """The bucket teacher's block: log r + s_c - t lse_rest outside the top k, the
        logprobs on it (float32, float64 for float64 input)."""
        log_r = self.log_r[rows]
        dense = reference.topk_bucket_rest_logits(
            student, log_r, lse_rest[:, None], self.temperature, self.num_rest
        )
        logprobs = self.logprobs[rows].to(dense.dtype)
        width = stop - start
        if start == 0 and stop == self.num_classes:
            return dense.scatter_(1, self.indices[rows], logprobs)[None]
        local = self.indices[rows] - start
        local = torch.where((local >= 0) & (local < width), local, width)
        dense = torch.cat([dense, dense[:, :1]], dim=1)  # the spare column
        return dense.scatter_(1, local, logprobs)[None, :, :width].contiguous()


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

    def _kernel_kind(self) -> str:
        """The kind the chunk math runs: a bucket teacher's soft_ce runs as kl (the same
        gradient) plus the teacher's entropy per row (``_bucket_entropy``)."""
        kind = self.options["kind"]
        return "kl" if self.teacher.bucket and kind == "soft_ce" else kind

    def _bucket_entropy(self, rows: slice) -> torch.Tensor | None:
        """What bucket soft_ce adds to the kl rows: soft_weight (t^2) H(p) over the k + 1
        classes (``reference.topk_bucket_teacher_entropy``), 0 in uncounted rows; None when
        nothing is added."""
        o = self.options
        if not (self.teacher.bucket and o["kind"] == "soft_ce"):
            return None
        t = o["temperature"]
        entropy = reference.topk_bucket_teacher_entropy(
            self.teacher.logprobs[rows], self.teacher.num_classes, t
        )
        entropy = o["soft_weight"] * (t * t if o["scale_t2"] else 1.0) * entropy
        if self.counted is not None:  # where, not a product: an uncounted row may hold NaN
            entropy = torch.where(self.counted[rows], entropy, 0)
        return entropy

    def _kd_args(self, rows: slice) -> tuple:
        labels = None if self.labels is None else self.labels[rows]
        mask = None if self.mask is None else self.mask[rows]
        o = self.options
        return (
            labels,
            mask,
            o["temperature"],
            self._kernel_kind(),
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
        vocab = weight.shape[0]
        if self.teacher.bucket:
            # The teacher depends on these logits, and the kernel runs in float32 (see
            # TeacherSource): one float32 copy of a half-precision chunk.
            lse_rest = self.teacher.rest_logsumexp(rows, 0, vocab, logits)
            teacher = self.teacher.chunk(rows, 0, vocab, logits, lse_rest)
            logits = logits.to(teacher.dtype)
        else:
            teacher = self.teacher.chunk(rows, 0, vocab)
        forward_op, forward_out_op = _kd_ops(self.backend)
        entropy = self._bucket_entropy(rows)
        if not grads.any:
            row_loss, _ = forward_op(logits, teacher, *self._kd_args(rows), False)
            return row_loss if entropy is None else row_loss + entropy
        # The kernel writes d row_loss / d logits over the logits themselves.
        row_loss = forward_out_op(logits, teacher, *self._kd_args(rows), logits)
        if chain is not None:  # through tanh and the scale to the raw logits
            logits.mul_(chain)
        if row_weights is not None:
            logits.mul_(row_weights[:, None].to(logits.dtype))
        grads.add(rows, slice(0, vocab), logits.to(chunk_hidden.dtype), chunk_hidden, weight)
        return row_loss if entropy is None else row_loss + entropy

    def _vocab_chunked(self, rows, chunk_hidden, weight, bias, grads, row_weights):
        """One row chunk in vocabulary slices with an online log-sum-exp (float32 math)."""
        o = self.options
        t, kind = o["temperature"], self._kernel_kind()
        soft_scale = o["soft_weight"] * (t * t if o["scale_t2"] else 1.0)
        hard = o["hard_weight"] != 0.0
        vocab_size, step = weight.shape[0], self.chunks[1]
        slices = [slice(v, min(vocab_size, v + step)) for v in range(0, vocab_size, step)]
        acc_dtype = reference._compute_dtype(chunk_hidden)

        def student_of(columns, with_chain=False):
            """The slice's student logits (transformed as the head does) and, when asked,
            d transformed / d raw student logits (None: no transform)."""
            b = None if bias is None else bias[columns]
            student = F.linear(chunk_hidden, weight[columns], b).to(acc_dtype)
            chain = None
            if self.transform is not None:
                chain = self.transform.derivative(student) if with_chain else None
                student = self.transform.apply(student)
            return student, chain

        # Pass 0, bucket teachers only: lse_rest, the student's log-sum-exp outside the top k,
        # which every slice of the teacher needs (one more matmul per slice).
        lse_rest = None
        if self.teacher.bucket:
            lse_rest = chunk_hidden.new_full((chunk_hidden.shape[0],), -math.inf, dtype=acc_dtype)
            for columns in slices:
                student, _ = student_of(columns)
                lse_rest = torch.logaddexp(
                    lse_rest,
                    self.teacher.rest_logsumexp(rows, columns.start, columns.stop, student),
                )

        def logits_of(columns, with_chain=False):
            """The slice's student logits, teacher logits and chain (see student_of)."""
            student, chain = student_of(columns, with_chain)
            if self.teacher.bucket:
                teacher = self.teacher.chunk(rows, columns.start, columns.stop, student, lse_rest)
            else:
                teacher = self.teacher.chunk(rows, columns.start, columns.stop)
            return student, teacher.to(acc_dtype), chain

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
                # gap was kept relative to the old shift, which is 0 while the student has
                # had only -inf: exp(student_lse - shift) would drop the teacher's mass there.
                old_shift = torch.where(student_lse == -math.inf, 0, student_lse)
                gap = gap * torch.exp(old_shift - shift) + chunk_gap
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
        entropy = self._bucket_entropy(rows)
        if entropy is not None:
            row_loss = row_loss + entropy
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
