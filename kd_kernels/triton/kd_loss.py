"""Triton kernel of the fused KD loss: one read of each input, one write of the gradient.

A program owns BLOCK_N rows and walks their columns in BLOCK_C chunks (online max / sum-exp,
so a 262k-class row never sits whole in registers). Short rows (GLUE heads, C = 2-3) get
many rows per program; long rows (LLM vocabularies) get one row and wide chunks.

Passes over a row: (A) softmax statistics of student and teachers, the bad-value flag and the
t = 1 statistics for the hard CE; (B) reverse KL / JSD only: the row sum their gradient
needs; (C) the loss (KL / soft CE) and the gradient write. The semantics are those of
``kd_kernels.reference.kd_loss``; see csrc/kd_loss.h for the per-row formulas.

Few long rows (fewer than two programs per SM: N = 8 at C = 262144) are split over up to
MAX_SPLITS programs per row, each at least MIN_SPLIT_COLUMNS wide: phase 1 writes each split's
partial pass-A state (max, sum-exp and gap sum per distribution) to a small fp32 workspace,
phases 2 and 3 merge the row's states exactly as the online softmax merges chunks, then run
passes B and C over their own columns; the splits' losses are summed on the device. No host
sync, three launches at most. Rows whose start is not 16-byte aligned (odd C) are read from
their first 16-byte boundary on, so that the bulk of the loads is 128-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kd_kernels._backend import triton_interpreting
from kd_kernels._ops import register_kd_loss_ops

KIND_IDS = {"kl": 0, "soft_ce": 1, "reverse_kl": 2, "jsd": 3}
# Largest column chunk; tests lower it to exercise the online (multi-chunk) path.
MAX_BLOCK_COLUMNS = 4096
# Elements per program tile: the register budget of 4-8 warps on Hopper at fp32.
TILE_ELEMENTS = 4096
# Rows per program (short rows): two per thread of 4 warps.
MAX_BLOCK_ROWS = 256
# Split rows: at most this many pieces per row, each of at least this many columns.
MAX_SPLITS = 64
MIN_SPLIT_COLUMNS = 4096
SPLIT_BLOCK_COLUMNS = 2048
# Tests force a split count (None: chosen from the rows, the columns and the SM count).
SPLITS_OVERRIDE: int | None = None
# |log p_T - log p_S| up to which a class takes the log-ratio forms (reference.LOG_RATIO_LIMIT).
LOG_RATIO_LIMIT: tl.constexpr = tl.constexpr(0.5)


@triton.jit
def _any_bad(x):
    """Per row: does the chunk hold a NaN or +inf (a row with no distribution)?"""
    bad = (x != x) | (x == float("inf"))
    return tl.max(bad.to(tl.int32), axis=1) > 0


@triton.jit
def _online_softmax_update(running_max, running_sum, z):
    """Folds a (BLOCK_N, BLOCK_C) chunk of logits z into per-row (max, sum exp(z - max))."""
    new_max = tl.maximum(running_max, tl.max(z, axis=1))
    # A row seen only as -inf so far keeps max -inf; shift by 0 so no -inf - -inf = NaN.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(
        tl.exp(z - shift[:, None]), axis=1
    )
    return new_max, running_sum


@triton.jit
def _expm1(x):
    """exp(x) - 1 to ~1e-8 relative: nested Taylor series below |x| = 0.5 (Triton has no
    expm1 that both the compiler and the interpreter take), exp(x) - 1 beyond."""
    small = tl.abs(x) < 0.5
    s = tl.where(small, x, 0.0)
    series = 1.0 + s * 0.125  # x (1 + x/2 (1 + x/3 (... (1 + x/8)))): degree 8, nested
    for inverse in tl.static_range(7, 1, -1):
        series = 1.0 + s * (1.0 / inverse) * series
    series = s * series
    return tl.where(small, series, tl.exp(x) - 1.0)


@triton.jit
def _log1p(x):
    """log(1 + x) to ~1e-9 relative: 2 atanh(x / (2 + x)) as a series below |x| = 0.25."""
    small = tl.abs(x) < 0.25
    z = tl.where(small, x, 0.0)
    z = z / (2.0 + z)
    z2 = z * z
    series = 2.0 * z * (1.0 + z2 * (1.0 / 3 + z2 * (0.2 + z2 * (1.0 / 7 + z2 * (1.0 / 9)))))
    return tl.where(small, series, tl.log(1.0 + x))


@triton.jit
def _phi(x, em):
    """x e^x - expm1(x) (>= 0) given em = expm1(x): its Taylor series below |x| = 0.1, where
    the closed form cancels (see kd_kernels.reference.phi)."""
    series = x * x * (0.5 + x * (1.0 / 3 + x * (0.125 + x * (1.0 / 30 + x * (
        1.0 / 144 + x * (1.0 / 840))))))  # fmt: skip
    return tl.where(tl.abs(x) < 0.1, series, x * em + x - em)


@triton.jit
def _psi(x, em):
    """expm1(x) - x (>= 0) given em = expm1(x), by its series below |x| = 0.1."""
    series = x * x * (0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (
        1.0 / 720 + x * (1.0 / 5040))))))  # fmt: skip
    return tl.where(tl.abs(x) < 0.1, series, em - x)


@triton.jit
def _p_log_ratio(p, log_p, log_q):
    """p * (log p - log q) with 0 where p == 0 (0 log 0 = 0)."""
    return tl.where(p > 0, p * (log_p - log_q), 0.0)


@triton.jit
def _chunk_probs(
    student_rows,
    teacher_rows,
    stride_tk,
    cols,
    tile_mask,
    inv_t,
    student_lse,
    teacher_lse,
    teacher_delta,
    inv_teachers,
    teacher_col,
    one_class,
    NUM_TEACHERS: tl.constexpr,
):
    """One (BLOCK_N, BLOCK_C) chunk: x, log p_S, p_S, p_T, log p_T, u, E = expm1(u), near.

    p_T is a single teacher's softmax, or the mean of K teachers' softmaxes (MT-DNN-KD).
    u = log p_T - log p_S in log-ratio form, d_k = (y_k - x) / t (the logits subtracted first)
    minus delta_k = lse_k - lse_S; K teachers: u = log1p(mean_k expm1(u_k)). ``near``: every
    |u_k| <= LOG_RATIO_LIMIT, where the log-ratio forms are used (u and E are 0 elsewhere).
    """
    offsets = cols[None, :]
    x = tl.load(student_rows + offsets, mask=tile_mask, other=float("-inf")).to(tl.float32)
    log_p_s = x * inv_t - student_lse[:, None]
    p_s = tl.exp(log_p_s)
    near = tile_mask
    if NUM_TEACHERS == 1:
        y = tl.load(teacher_rows + offsets, mask=tile_mask, other=float("-inf")).to(tl.float32)
        lse = tl.sum(tl.where(teacher_col == 0, teacher_lse, 0.0), axis=1)
        delta = tl.sum(tl.where(teacher_col == 0, teacher_delta, 0.0), axis=1)
        log_p_t = y * inv_t - lse[:, None]
        p_t = tl.exp(log_p_t)
        u = (y - x) * inv_t - delta[:, None]
        near = near & (tl.abs(u) <= LOG_RATIO_LIMIT)
        u = tl.where(near & (one_class == 0), u, 0.0)
        em = _expm1(u)
    else:
        p_t = tl.zeros(x.shape, dtype=tl.float32)
        mixed = tl.zeros(x.shape, dtype=tl.float32)
        for k in tl.static_range(NUM_TEACHERS):
            y = tl.load(
                teacher_rows + k * stride_tk + offsets, mask=tile_mask, other=float("-inf")
            ).to(tl.float32)
            lse = tl.sum(tl.where(teacher_col == k, teacher_lse, 0.0), axis=1)
            delta = tl.sum(tl.where(teacher_col == k, teacher_delta, 0.0), axis=1)
            p_t += tl.exp(y * inv_t - lse[:, None])
            u_k = (y - x) * inv_t - delta[:, None]
            near = near & (tl.abs(u_k) <= LOG_RATIO_LIMIT)
            mixed += _expm1(tl.where(tl.abs(u_k) <= LOG_RATIO_LIMIT, u_k, 0.0))
        p_t = p_t * inv_teachers
        log_p_t = tl.log(p_t)
        em = tl.where(near & (one_class == 0), mixed * inv_teachers, 0.0)
        u = _log1p(em)
    return x, log_p_s, p_s, p_t, log_p_t, u, em, near


@triton.jit
def _edge_tile(start, cols0, head, body_end, edge_len):
    """Columns (relative to the row's aligned start, row start + head) of one edge tile, and
    which of them exist: the head's columns first (negative), then the tail past the body."""
    j = start + cols0
    rel = j - head + tl.where(j < head, 0, body_end)
    return rel, (j < edge_len)[None, :]


@triton.jit
def _stats_tile(
    bad, s_max, s_sum, h_max, h_sum, t_max, t_sum, gap_sum,
    s_rows, t_rows, stride_tk, rel, tile_mask, inv_t, teacher_col,
    NUM_TEACHERS: tl.constexpr, HARD: tl.constexpr,
):  # fmt: skip
    """Pass A over one tile: folds it into the online softmax statistics of student and
    teachers, the bad-value flag, the t = 1 statistics of the hard CE, and per teacher
    gap_sum = sum_c e^(a_c - max) expm1(d_c) with d = b - a, rescaled with the student's sum,
    so that delta = lse_T - lse_S = log1p(gap_sum / sum) keeps its digits when the two are
    close."""
    neg_inf = float("-inf")
    x = tl.load(s_rows + rel[None, :], mask=tile_mask, other=neg_inf).to(tl.float32)
    bad = bad | _any_bad(x)
    z = x * inv_t
    new_max = tl.maximum(s_max, tl.max(z, axis=1))
    shift = tl.where(new_max == neg_inf, 0.0, new_max)
    rescale = tl.exp(s_max - shift)
    e_s = tl.exp(z - shift[:, None])
    s_sum = s_sum * rescale + tl.sum(e_s, axis=1)
    # gap_sum was accumulated relative to the old shift, which is 0 while the student has
    # only -inf so far: tiles where the teacher has mass and the student none add e^b to it,
    # and rescaling by e^(-inf) would drop that mass when a later tile sets the maximum.
    old_shift = tl.where(s_max == neg_inf, 0.0, s_max)
    gap_sum = gap_sum * tl.exp(old_shift - shift)[:, None]
    s_max = new_max
    if HARD:
        h_max, h_sum = _online_softmax_update(h_max, h_sum, x)
    for k in tl.static_range(NUM_TEACHERS):
        y = tl.load(t_rows + k * stride_tk + rel[None, :], mask=tile_mask, other=neg_inf).to(
            tl.float32
        )
        bad = bad | _any_bad(y)
        k_max = tl.max(tl.where(teacher_col == k, t_max, neg_inf), axis=1)
        k_sum = tl.sum(tl.where(teacher_col == k, t_sum, 0.0), axis=1)
        k_max, k_sum = _online_softmax_update(k_max, k_sum, y * inv_t)
        t_max = tl.where(teacher_col == k, k_max[:, None], t_max)
        t_sum = tl.where(teacher_col == k, k_sum[:, None], t_sum)
        # e^a expm1(d) = e^b - e^a: a series in d where the difference would cancel.
        d = (y - x) * inv_t
        close = tl.abs(d) < 0.5
        gap = tl.where(close, e_s * _expm1(tl.where(close, d, 0.0)), tl.exp(
            y * inv_t - shift[:, None]) - e_s)  # fmt: skip
        gap_sum += tl.where(teacher_col == k, tl.sum(gap, axis=1)[:, None], 0.0)
    return bad, s_max, s_sum, h_max, h_sum, t_max, t_sum, gap_sum


@triton.jit
def _merge_stats(
    stats_ptr, rows64, row_in_range, num_splits, teacher_col,
    NUM_TEACHERS: tl.constexpr, TEACHER_COLS: tl.constexpr, SPLITS: tl.constexpr,
    FIELDS: tl.constexpr,
):  # fmt: skip
    """The row's pass-A statistics from its splits' partial ones, merged exactly as the online
    softmax merges chunks: sums rescaled to the largest maximum. A split's gap_sum is relative
    to its own student maximum (0 where that is -inf), and is rescaled from there."""
    neg_inf = float("-inf")
    split = tl.arange(0, SPLITS)[None, :]
    present = row_in_range[:, None] & (split < num_splits)
    base = stats_ptr + (rows64[:, None] * num_splits + split) * FIELDS
    s_max_j = tl.load(base, mask=present, other=neg_inf)
    s_sum_j = tl.load(base + 1, mask=present, other=0.0)
    h_max_j = tl.load(base + 2, mask=present, other=neg_inf)
    h_sum_j = tl.load(base + 3, mask=present, other=0.0)
    bad = tl.max(tl.load(base + 4, mask=present, other=0.0), axis=1) > 0
    s_label = tl.sum(tl.load(base + 5, mask=present & (split == 0), other=0.0), axis=1)
    s_max = tl.max(s_max_j, axis=1)
    shift = tl.where(s_max == neg_inf, 0.0, s_max)
    s_sum = tl.sum(s_sum_j * tl.exp(s_max_j - shift[:, None]), axis=1)
    gap_scale = tl.exp(tl.where(s_max_j == neg_inf, 0.0, s_max_j) - shift[:, None])
    h_max = tl.max(h_max_j, axis=1)
    h_shift = tl.where(h_max == neg_inf, 0.0, h_max)
    h_sum = tl.sum(h_sum_j * tl.exp(h_max_j - h_shift[:, None]), axis=1)
    t_max = tl.full([rows64.shape[0], TEACHER_COLS], neg_inf, tl.float32)
    t_sum = tl.zeros([rows64.shape[0], TEACHER_COLS], dtype=tl.float32)
    gap_sum = tl.zeros([rows64.shape[0], TEACHER_COLS], dtype=tl.float32)
    for k in tl.static_range(NUM_TEACHERS):
        k_max_j = tl.load(base + 6 + k, mask=present, other=neg_inf)
        k_sum_j = tl.load(base + 6 + TEACHER_COLS + k, mask=present, other=0.0)
        k_gap_j = tl.load(base + 6 + 2 * TEACHER_COLS + k, mask=present, other=0.0)
        k_max = tl.max(k_max_j, axis=1)
        k_shift = tl.where(k_max == neg_inf, 0.0, k_max)
        k_sum = tl.sum(k_sum_j * tl.exp(k_max_j - k_shift[:, None]), axis=1)
        # 0 * inf would be NaN where a split's scale overflows and it has no gap at all.
        k_gap = tl.sum(tl.where(k_gap_j != 0, k_gap_j * gap_scale, 0.0), axis=1)
        t_max = tl.where(teacher_col == k, k_max[:, None], t_max)
        t_sum = tl.where(teacher_col == k, k_sum[:, None], t_sum)
        gap_sum = tl.where(teacher_col == k, k_gap[:, None], gap_sum)
    return bad, s_max, s_sum, h_max, h_sum, t_max, t_sum, gap_sum, s_label


@triton.jit
def _store_stats(
    stats_ptr, rows64, row_in_range, split, num_splits, teacher_col,
    bad, s_max, s_sum, h_max, h_sum, t_max, t_sum, gap_sum, s_label,
    TEACHER_COLS: tl.constexpr, FIELDS: tl.constexpr,
):  # fmt: skip
    """One split's partial pass-A statistics, FIELDS fp32 values at (row, split): student
    (max, sum), raw (max, sum), bad, the student's label logit, then per teacher max, sum and
    gap_sum."""
    base = stats_ptr + (rows64 * num_splits + split) * FIELDS
    tl.store(base, s_max, mask=row_in_range)
    tl.store(base + 1, s_sum, mask=row_in_range)
    tl.store(base + 2, h_max, mask=row_in_range)
    tl.store(base + 3, h_sum, mask=row_in_range)
    tl.store(base + 4, bad.to(tl.float32), mask=row_in_range)
    tl.store(base + 5, s_label, mask=row_in_range)
    teachers = base[:, None] + 6 + teacher_col
    in_range = row_in_range[:, None] & (teacher_col < TEACHER_COLS)
    tl.store(teachers, t_max, mask=in_range)
    tl.store(teachers + TEACHER_COLS, t_sum, mask=in_range)
    tl.store(teachers + 2 * TEACHER_COLS, gap_sum, mask=in_range)


@triton.jit
def _soft_sums_tile(
    soft, row_sum, s_rows, t_rows, stride_tk, rel, tile_mask, inv_t, s_lse, t_lse, t_delta,
    inv_teachers, teacher_col, one_class, beta, KIND: tl.constexpr, NUM_TEACHERS: tl.constexpr,
):  # fmt: skip
    """Pass B over one tile (reverse KL, JSD): the loss and the row sum R = sum p_S h their
    gradient subtracts, per class h = -u (reverse KL) or -(1 - beta) log(m / p_S) (JSD)."""
    _, log_p_s, p_s, p_t, log_p_t, u, em, near = _chunk_probs(
        s_rows, t_rows, stride_tk, rel, tile_mask, inv_t, s_lse, t_lse, t_delta,
        inv_teachers, teacher_col, one_class, NUM_TEACHERS,
    )  # fmt: skip
    if KIND == 2:
        far = _p_log_ratio(p_s, log_p_s, log_p_t) + p_t - p_s
        soft += tl.sum(tl.where(near, p_s * _psi(u, em), far), axis=1)
    else:
        term, h = _jsd_terms(p_s, log_p_s, p_t, log_p_t, u, em, near, beta)
        soft += tl.sum(term, axis=1)
        row_sum += tl.sum(tl.where(p_s > 0, p_s * h, 0.0), axis=1)
    return soft, row_sum


@triton.jit
def _loss_grad_tile(
    soft, s_rows, t_rows, g_rows, stride_tk, rel, cols, tile_mask, store_mask, inv_t, s_lse,
    t_lse, t_delta, h_lse, row_sum, bad, counted, label, inv_teachers, teacher_col, one_class,
    beta, soft_grad_coef, hard_weight, KIND: tl.constexpr, NUM_TEACHERS: tl.constexpr,
    HARD: tl.constexpr, WRITE_GRAD: tl.constexpr,
):  # fmt: skip
    """Pass C over one tile: the KL / soft-CE loss and the gradient (cols: the absolute
    column indices, for the label)."""
    x, log_p_s, p_s, p_t, log_p_t, u, em, near = _chunk_probs(
        s_rows, t_rows, stride_tk, rel, tile_mask, inv_t, s_lse, t_lse, t_delta,
        inv_teachers, teacher_col, one_class, NUM_TEACHERS,
    )  # fmt: skip
    if KIND < 2:
        far = _p_log_ratio(p_t, log_p_t, log_p_s) - p_t + p_s
        term = tl.where(near, p_s * _phi(u, em), far)
        if KIND == 1:  # soft CE = KL + H(p_T)
            term -= tl.where(p_t > 0, p_t * log_p_t, 0.0)
        soft += tl.sum(term, axis=1)
    if WRITE_GRAD:
        if KIND < 2:
            # p_S - p_T, as -p_S expm1(u) where that keeps its digits.
            g = tl.where(near, -p_s * em, p_s - p_t)
        else:
            if KIND == 2:
                h = tl.where(near, -u, log_p_s - log_p_t)
            else:
                _, h = _jsd_terms(p_s, log_p_s, p_t, log_p_t, u, em, near, beta)
            g = tl.where(p_s > 0, p_s * (h - row_sum[:, None]), 0.0)
        g = g * soft_grad_coef
        if HARD:
            g += hard_weight * tl.exp(x - h_lse[:, None])
            g -= tl.where(cols[None, :] == label[:, None], hard_weight, 0.0)
        g = tl.where(bad[:, None], float("nan"), g)
        g = tl.where(counted[:, None], g, 0.0)
        tl.store(g_rows + rel[None, :], g.to(g_rows.dtype.element_ty), mask=store_mask)
    return soft


@triton.jit
def _kd_loss_kernel(
    student_ptr,
    teacher_ptr,
    labels_ptr,
    mask_ptr,
    loss_ptr,
    grad_ptr,
    stats_ptr,
    sums_ptr,
    num_rows,
    num_classes,
    stride_s,
    stride_tk,
    stride_tn,
    stride_g,
    num_splits,
    tiles_per_split,
    inv_t,
    inv_teachers,
    soft_loss_coef,
    soft_grad_coef,
    hard_weight,
    beta,
    ignore_index,
    KIND: tl.constexpr,
    NUM_TEACHERS: tl.constexpr,
    TEACHER_COLS: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HARD: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PHASE: tl.constexpr,
    SPLITS: tl.constexpr,
    HEAD: tl.constexpr,
    VEC: tl.constexpr,
):
    """Program (row block, split). PHASE 0: the whole rows, every pass (split 0 of 1).
    Split rows (BLOCK_N = 1): PHASE 1 writes the split's pass-A statistics to stats; PHASE 2
    merges the row's and runs pass B (reverse KL, JSD) over the split, to sums; PHASE 3
    merges them and runs pass C. A split's loss goes to loss[row, split] (the host sums them).

    A row's columns are a body walked in BLOCK_C tiles, shared out among the splits in whole
    tiles. With HEAD (BLOCK_N = 1, the row start not 16-byte aligned: odd C) the body starts
    at the first 16-byte boundary and ends on a multiple of VEC, so that its loads are
    128-bit, and an edge tile (the columns before that boundary and the last < VEC ones,
    element by element) goes to the last split. Tiles past the body's end are masked; body
    tiles without a column mask would be cheaper to address but cost ~45 more registers.
    """
    FIELDS: tl.constexpr = 6 + 3 * TEACHER_COLS
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    row_in_range = rows < num_rows
    rows64 = rows.to(tl.int64)
    # Triton types an integer argument as i32 when its value fits, so k * stride_tk would wrap
    # for K teachers of N * C >= 2^31 / K elements: widen before any product.
    stride_tk = tl.cast(stride_tk, tl.int64)
    counted = row_in_range
    label = tl.zeros([BLOCK_N], dtype=tl.int64)
    if HAS_MASK:
        counted = counted & (tl.load(mask_ptr + rows64, mask=row_in_range, other=0) != 0)
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows64, mask=row_in_range, other=ignore_index)
        counted = counted & (label != ignore_index)
    bad = tl.zeros([BLOCK_N], dtype=tl.int1)
    if HARD:
        bad = bad | (label < 0) | (label >= num_classes)
    cols0 = tl.arange(0, BLOCK_C)
    teacher_col = tl.arange(0, TEACHER_COLS)[None, :]
    neg_inf = float("-inf")
    one_class = (num_classes == 1).to(tl.int32)

    # Rows are addressed from their first 16-byte boundary (head columns past the start; the
    # host checks that student, teachers and grad share it and that their bases are aligned).
    s_off = rows64 * stride_s
    t_off = rows64 * stride_tn
    g_off = rows64 * stride_g
    if HEAD:
        head = tl.sum(((VEC - s_off % VEC) % VEC).to(tl.int32))  # BLOCK_N = 1
        head = tl.minimum(head, num_classes)
        s_off = tl.multiple_of(s_off + head, VEC)
        t_off = tl.multiple_of(t_off + head, VEC)
        g_off = tl.multiple_of(g_off + head, VEC)
        stride_tk = tl.multiple_of(stride_tk, VEC)
        body_end = tl.multiple_of((num_classes - head) // VEC * VEC, VEC)
    else:
        head = 0
        body_end = num_classes
    s_rows = student_ptr + s_off[:, None]
    t_rows = teacher_ptr + t_off[:, None]
    if PHASE == 0:
        # Constant loop bounds: runtime ones cost ~25 registers (80 -> 108 at C = 262144).
        body_begin = 0
        body_stop = body_end
    else:
        body_begin = split * tiles_per_split * BLOCK_C
        body_stop = tl.minimum(body_begin + tiles_per_split * BLOCK_C, body_end)
        body_stop = tl.where(split == num_splits - 1, body_end, body_stop)  # the last part tile
    if HEAD:
        body_stop = tl.multiple_of(body_stop, VEC)
        edge_len = tl.where(split == num_splits - 1, num_classes - body_end, 0)

    if PHASE <= 1:
        s_max = tl.full([BLOCK_N], neg_inf, tl.float32)
        s_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        h_max = tl.full([BLOCK_N], neg_inf, tl.float32)
        h_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        t_max = tl.full([BLOCK_N, TEACHER_COLS], neg_inf, tl.float32)
        t_sum = tl.zeros([BLOCK_N, TEACHER_COLS], dtype=tl.float32)
        gap_sum = tl.zeros([BLOCK_N, TEACHER_COLS], dtype=tl.float32)
        for start in range(body_begin, body_stop, BLOCK_C):
            rel = tl.multiple_of(start, BLOCK_C) + cols0
            in_cols = (rel < body_stop)[None, :]
            bad, s_max, s_sum, h_max, h_sum, t_max, t_sum, gap_sum = _stats_tile(
                bad, s_max, s_sum, h_max, h_sum, t_max, t_sum, gap_sum, s_rows, t_rows,
                stride_tk, rel, counted[:, None] & in_cols, inv_t, teacher_col, NUM_TEACHERS,
                HARD,
            )  # fmt: skip
        if HEAD:
            for start in range(0, edge_len, BLOCK_C):
                rel, in_cols = _edge_tile(start, cols0, head, body_end, edge_len)
                bad, s_max, s_sum, h_max, h_sum, t_max, t_sum, gap_sum = _stats_tile(
                    bad, s_max, s_sum, h_max, h_sum, t_max, t_sum, gap_sum, s_rows, t_rows,
                    stride_tk, rel, counted[:, None] & in_cols, inv_t, teacher_col,
                    NUM_TEACHERS, HARD,
                )  # fmt: skip
        # The label's logit, read before any gradient is written (grad may alias student).
        s_label = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HARD:
            s_label = tl.load(
                student_ptr + rows64 * stride_s + label,
                mask=counted & (label >= 0) & (label < num_classes),
                other=0.0,
            ).to(tl.float32)
        if PHASE == 1:
            _store_stats(
                stats_ptr, rows64, row_in_range, split, num_splits, teacher_col, bad, s_max,
                s_sum, h_max, h_sum, t_max, t_sum, gap_sum, s_label, TEACHER_COLS, FIELDS,
            )  # fmt: skip
            return
    else:
        merged_bad, s_max, s_sum, h_max, h_sum, t_max, t_sum, gap_sum, s_label = _merge_stats(
            stats_ptr, rows64, row_in_range, num_splits, teacher_col, NUM_TEACHERS,
            TEACHER_COLS, SPLITS, FIELDS,
        )  # fmt: skip
        bad = bad | merged_bad
    # All -inf (no finite maximum) is no distribution either.
    bad = bad | (s_max == neg_inf)
    bad = bad | (
        tl.max(((t_max == neg_inf) & (teacher_col < NUM_TEACHERS)).to(tl.int32), axis=1) > 0
    )
    s_lse = s_max + tl.log(s_sum)
    t_lse = t_max + tl.log(t_sum)
    h_lse = h_max + tl.log(h_sum)
    # delta_k = lse_k - lse_S; the plain difference where it is large (or gap_sum overflowed).
    lse_gap = t_lse - s_lse[:, None]
    ratio = gap_sum / s_sum[:, None]
    use_ratio = (tl.abs(lse_gap) <= 1.0) & (ratio > -1.0) & (tl.abs(ratio) < float("inf"))
    t_delta = tl.where(use_ratio, _log1p(tl.where(use_ratio, ratio, 0.0)), lse_gap)

    # Pass B (reverse KL, JSD): the loss and the row sum R their gradient subtracts.
    soft = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    if KIND >= 2 and PHASE != 3:
        for start in range(body_begin, body_stop, BLOCK_C):
            rel = tl.multiple_of(start, BLOCK_C) + cols0
            in_cols = (rel < body_stop)[None, :]
            soft, row_sum = _soft_sums_tile(
                soft, row_sum, s_rows, t_rows, stride_tk, rel, counted[:, None] & in_cols,
                inv_t, s_lse, t_lse, t_delta, inv_teachers, teacher_col, one_class, beta, KIND,
                NUM_TEACHERS,
            )  # fmt: skip
        if HEAD:
            for start in range(0, edge_len, BLOCK_C):
                rel, in_cols = _edge_tile(start, cols0, head, body_end, edge_len)
                soft, row_sum = _soft_sums_tile(
                    soft, row_sum, s_rows, t_rows, stride_tk, rel, counted[:, None] & in_cols,
                    inv_t, s_lse, t_lse, t_delta, inv_teachers, teacher_col, one_class, beta,
                    KIND, NUM_TEACHERS,
                )  # fmt: skip
        if KIND == 2:
            row_sum = soft
        if PHASE == 2:
            sums = sums_ptr + (rows64 * num_splits + split) * 2
            tl.store(sums, soft, mask=row_in_range)
            tl.store(sums + 1, row_sum, mask=row_in_range)
    if KIND >= 2 and PHASE == 3:
        split_ids = tl.arange(0, SPLITS)[None, :]
        present = row_in_range[:, None] & (split_ids < num_splits)
        sums = sums_ptr + (rows64[:, None] * num_splits + split_ids) * 2
        row_sum = tl.sum(tl.load(sums + 1, mask=present, other=0.0), axis=1)

    # Pass C: the KL / soft-CE loss and the gradient, written last (grad may alias student).
    if ((KIND < 2) or WRITE_GRAD) and PHASE != 2:
        g_rows = s_rows  # not written to without a gradient
        if WRITE_GRAD:
            g_rows = grad_ptr + g_off[:, None]
        for start in range(body_begin, body_stop, BLOCK_C):
            rel = tl.multiple_of(start, BLOCK_C) + cols0
            in_cols = (rel < body_stop)[None, :]
            soft = _loss_grad_tile(
                soft, s_rows, t_rows, g_rows, stride_tk, rel, rel + head,
                counted[:, None] & in_cols, row_in_range[:, None] & in_cols, inv_t, s_lse,
                t_lse, t_delta, h_lse, row_sum, bad, counted, label, inv_teachers, teacher_col,
                one_class, beta, soft_grad_coef, hard_weight, KIND, NUM_TEACHERS, HARD,
                WRITE_GRAD,
            )  # fmt: skip
        if HEAD:
            for start in range(0, edge_len, BLOCK_C):
                rel, in_cols = _edge_tile(start, cols0, head, body_end, edge_len)
                soft = _loss_grad_tile(
                    soft, s_rows, t_rows, g_rows, stride_tk, rel, rel + head,
                    counted[:, None] & in_cols, row_in_range[:, None] & in_cols, inv_t,
                    s_lse, t_lse, t_delta, h_lse, row_sum, bad, counted, label, inv_teachers,
                    teacher_col, one_class, beta, soft_grad_coef, hard_weight, KIND,
                    NUM_TEACHERS, HARD, WRITE_GRAD,
                )  # fmt: skip

    # The loss: PHASE 0; split rows: the phase that formed `soft` (2 for reverse KL / JSD,
    # 3 otherwise), the hard CE from split 0 only.
    if (PHASE == 0) or (PHASE == 2 and KIND >= 2) or (PHASE == 3 and KIND < 2):
        loss = soft_loss_coef * soft
        if HARD:
            loss += tl.where(split == 0, hard_weight * (h_lse - s_label), 0.0)
        loss = tl.where(bad, float("nan"), loss)
        loss = tl.where(counted, loss, 0.0)
        tl.store(loss_ptr + rows64 * num_splits + split, loss, mask=row_in_range)


@triton.jit
def _jsd_terms(p_s, log_p_s, p_t, log_p_t, u, em, near, beta):
    """JSD per class: the loss term and h = d term / d log p_S (before the row sum).

    Near (|u| <= 1/2): with E = expm1(u) and e^L = m / p_S = 1 + beta E, the term is
    p_S e^L (beta phi(u - L) + (1 - beta) phi(-L)), every part >= 0, and h = -(1 - beta) L;
    expm1(u - L) and expm1(-L) follow from E without another exponential. Far: the
    log-probability forms, guarded so that 0 log 0 = 0 (beta = 0 or 1 included).
    """
    one_minus_beta = 1.0 - beta
    mixed = 1.0 + beta * em
    log_mixed = _log1p(beta * em)
    near_term = (
        p_s
        * mixed
        * (
            beta * _phi(u - log_mixed, one_minus_beta * em / mixed)
            + one_minus_beta * _phi(-log_mixed, -beta * em / mixed)
        )
    )
    log_m = tl.log(beta * p_t + one_minus_beta * p_s)
    # Weights inside the guard: beta = 0 must not turn 0 * inf into NaN.
    far_term = _p_log_ratio(beta * p_t, log_p_t, log_m) + _p_log_ratio(
        one_minus_beta * p_s, log_p_s, log_m
    )
    far_h = tl.where(one_minus_beta * p_s > 0, one_minus_beta * (log_p_s - log_m), 0.0)
    term = tl.where(near, near_term, far_term)
    h = tl.where(near, -one_minus_beta * log_mixed, far_h)
    return term, h


def _previous_power_of_2(n: int) -> int:
    """The largest power of two <= n (n >= 1)."""
    return 1 << (n.bit_length() - 1)


def _launch_config(
    num_rows: int, num_classes: int, num_teachers: int, multiprocessors: int = 132
) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps): ~TILE_ELEMENTS per program, many rows when rows are
    short, but never fewer programs than two per SM when the rows allow it (N = 1024, C = 2
    ran as one program on a 132-SM chip); small tiles get fewer warps."""
    tile = TILE_ELEMENTS * (4 if triton_interpreting() else 1)  # fewer programs to interpret
    # K teachers share the tile; tl.arange needs powers of two, so round the share down.
    tile = max(_previous_power_of_2(tile // num_teachers), 256)
    if num_classes % 16 and num_classes <= MAX_BLOCK_COLUMNS and not triton_interpreting():
        # Rows not on 16-element boundaries load element by element, each with its own 64-bit
        # address: half the tile keeps them in registers (C = 50257 spilled with Triton 3.6).
        # Longer rows run one per program, from their first 16-byte boundary (HEAD) when the
        # inputs allow it, with 128-bit loads and no need to halve.
        tile = max(tile // 2, 256)
    block_c = min(triton.next_power_of_2(num_classes), MAX_BLOCK_COLUMNS, tile)
    block_n = max(1, min(triton.next_power_of_2(num_rows), tile // block_c, MAX_BLOCK_ROWS))
    if not triton_interpreting():
        # Each row keeps ~10 + 3K statistics live (max, sum-exp and delta per teacher, ...):
        # more than two rows per thread spill on sm_80 / sm_90.
        block_n = min(block_n, _previous_power_of_2(max(1, num_rows // (2 * multiprocessors))))
    # Warps follow the loads per step, the K teachers' included (K = 16 on 2 warps spilled).
    elements = block_n * block_c * (1 + num_teachers) // 2
    num_warps = 8 if elements >= 4096 else 4 if elements >= 1024 else 2 if elements >= 256 else 1
    return block_n, block_c, num_warps


def _split_plan(
    num_rows: int, num_classes: int, block_c: int, multiprocessors: int
) -> tuple[int, int]:
    """(splits per row, BLOCK_C tiles per split). Rows are split when one program per row
    leaves the chip under two programs per SM (N = 8 at C = 262144 ran 8 programs on 132
    SMs), into at most MAX_SPLITS pieces of at least MIN_SPLIT_COLUMNS columns each; the last
    split also takes the columns past the whole tiles (< BLOCK_C)."""
    tiles = max(num_classes // block_c, 1)
    if SPLITS_OVERRIDE is not None:
        wanted = SPLITS_OVERRIDE
    elif num_rows >= 2 * multiprocessors:
        wanted = 1
    else:
        wanted = min(
            -(-2 * multiprocessors // num_rows), num_classes // MIN_SPLIT_COLUMNS, MAX_SPLITS
        )
    wanted = max(1, min(wanted, tiles))
    per_split = -(-tiles // wanted)
    if wanted == 1:
        return 1, tiles + 1
    return -(-tiles // per_split), per_split


def _shared_head(
    student: torch.Tensor, teacher: torch.Tensor, grad: torch.Tensor | None, block_n: int
) -> tuple[bool, int]:
    """(HEAD, VEC): whether rows are read from their first 16-byte boundary on. Only for one
    row per program whose start is not 16-byte aligned (odd C: every other row), and only when
    student, every teacher and grad reach that boundary at the same column (aligned bases,
    strides equal modulo VEC, one element size); otherwise Triton's own alignment analysis
    decides the load width."""
    vec = 16 // student.element_size()
    tensors = [student, teacher] + ([grad] if grad is not None else [])
    strides = [student.stride(0), teacher.stride(1)] + (
        [grad.stride(0)] if grad is not None else []
    )
    usable = (
        block_n == 1
        and student.stride(0) % vec != 0
        and all(t.element_size() == student.element_size() for t in tensors)
        and all(t.data_ptr() % 16 == 0 for t in tensors)
        and all((s - student.stride(0)) % vec == 0 for s in strides)
        and (teacher.shape[0] == 1 or teacher.stride(0) % vec == 0)
    )
    return usable, vec


def _multiprocessors(device: torch.device) -> int:
    """SMs of the tensors' GPU (132 on H100/H200; the same figure off a GPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _launch_kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    temperature: float,
    kind: str,
    soft_weight: float,
    hard_weight: float,
    beta: float,
    scale_t2: bool,
    ignore_index: int,
    grad: torch.Tensor | None,
) -> torch.Tensor:
    num_rows, num_classes = student.shape
    num_teachers = teacher.shape[0]
    if temperature <= 0:
        raise ValueError(f"kd_loss: temperature must be > 0, got {temperature}")
    if student.dtype == torch.float64:
        raise TypeError("kd_loss triton backend: float64 runs on the cpu and torch backends")
    row_loss = torch.empty(num_rows, dtype=torch.float32, device=student.device)
    if num_rows == 0:
        return row_loss
    multiprocessors = _multiprocessors(student.device)
    block_n, block_c, num_warps = _launch_config(
        num_rows, num_classes, num_teachers, multiprocessors
    )
    splits, tiles_per_split = _split_plan(num_rows, num_classes, block_c, multiprocessors)
    if splits > 1:
        # One row per program, and half tiles on the same warps: the split kernels then need
        # <= 64 registers (4096-column tiles spilled one value at 64 registers on sm_80).
        block_n = 1
        block_c = min(block_c, SPLIT_BLOCK_COLUMNS)
        splits, tiles_per_split = _split_plan(num_rows, num_classes, block_c, multiprocessors)
    head, vec = _shared_head(student, teacher, grad, block_n)
    t2 = temperature * temperature if scale_t2 else 1.0
    mask_bytes = mask.view(torch.uint8) if mask is not None else None
    kind_id = KIND_IDS[kind]
    teacher_cols = triton.next_power_of_2(num_teachers)
    stats = sums = None
    loss = row_loss
    if splits > 1:
        # Partial states per (row, split): the statistics of pass A and the sums of pass B.
        stats = torch.empty(
            (num_rows, splits, 6 + 3 * teacher_cols), dtype=torch.float32, device=student.device
        )
        if kind_id >= 2:
            sums = torch.empty((num_rows, splits, 2), dtype=torch.float32, device=student.device)
        loss = torch.empty((num_rows, splits), dtype=torch.float32, device=student.device)
        phases = (
            [1] + ([2] if kind_id >= 2 else []) + ([3] if kind_id < 2 or grad is not None else [])
        )
    else:
        phases = [0]
    for phase in phases:
        _kd_loss_kernel[(triton.cdiv(num_rows, block_n), splits)](
            student,
            teacher,
            labels,
            mask_bytes,
            loss,
            grad,
            stats,
            sums,
            num_rows,
            num_classes,
            student.stride(0),
            teacher.stride(0),
            teacher.stride(1),
            grad.stride(0) if grad is not None else 0,
            splits,
            tiles_per_split,
            1.0 / temperature,
            1.0 / num_teachers,
            soft_weight * t2,
            soft_weight * t2 / temperature,
            hard_weight,
            beta,
            ignore_index,
            KIND=kind_id,
            NUM_TEACHERS=num_teachers,
            TEACHER_COLS=teacher_cols,
            HAS_LABELS=labels is not None,
            HAS_MASK=mask is not None,
            HARD=hard_weight != 0.0,
            WRITE_GRAD=grad is not None,
            BLOCK_N=block_n,
            BLOCK_C=block_c,
            PHASE=phase,
            SPLITS=triton.next_power_of_2(splits),
            HEAD=head,
            VEC=vec,
            # Pass B alone (JSD) spilled two values at 80 registers on 8 warps (sm_90).
            num_warps=4 if phase == 2 else num_warps,
        )
    if splits > 1:
        # The splits' losses, summed on the device in a fixed order (no host sync).
        torch.sum(loss, dim=1, out=row_loss)
    return row_loss


@torch.library.custom_op("kd_kernels::kd_loss_forward_triton", mutates_args=())
def kd_loss_forward_triton(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    temperature: float,
    kind: str,
    soft_weight: float,
    hard_weight: float,
    beta: float,
    scale_t2: bool,
    ignore_index: int,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``kd_kernels::kd_loss_forward`` (schema in csrc/ops.cpp)."""
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else None
    row_loss = _launch_kd_loss(
        student,
        teacher,
        labels,
        mask,
        temperature,
        kind,
        soft_weight,
        hard_weight,
        beta,
        scale_t2,
        ignore_index,
        grad,
    )
    return row_loss, grad if grad is not None else student.new_empty(0)


@torch.library.custom_op("kd_kernels::kd_loss_forward_out_triton", mutates_args=("grad",))
def kd_loss_forward_out_triton(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    temperature: float,
    kind: str,
    soft_weight: float,
    hard_weight: float,
    beta: float,
    scale_t2: bool,
    ignore_index: int,
    grad: torch.Tensor,
) -> torch.Tensor:
    """Triton twin of ``kd_kernels::kd_loss_forward_out``: grad may share student's storage."""
    return _launch_kd_loss(
        student,
        teacher,
        labels,
        mask,
        temperature,
        kind,
        soft_weight,
        hard_weight,
        beta,
        scale_t2,
        ignore_index,
        grad,
    )


register_kd_loss_ops("kd_kernels::kd_loss_forward_triton", "kd_kernels::kd_loss_forward_out_triton")
