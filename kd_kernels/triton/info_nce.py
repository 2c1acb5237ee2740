"""Triton kernels of in-batch InfoNCE, flash-attention style: O(N + M) memory.

Forward: a program owns BLOCK_N queries and sweeps the keys in BLOCK_M tiles, each tile's
similarities built from BLOCK_D slices of the embeddings with ``tl.dot`` (fp32 accumulation),
folding them into a per-row online log-sum-exp. It keeps lse (N,) and nothing of size N x M.
Backward recomputes the tiles: one kernel accumulates u = W k over the keys for a block of
queries, another v = W^T q over the queries for a block of keys, where
W_ij = g_i (softmax(z_i)_j - [j == label_i]) a_i b_j / temperature. Only the O(1) part of W
enters the low-precision tile product; its small row and column factors are applied in fp32.
The output columns are split in BLOCK_DO slices, so for D > BLOCK_DO the tiles are
recomputed once per slice.
The cosine normalisation enters as the row/column scales a_i, b_j and, in the gradient, as
a projection applied to u and v afterwards (see csrc/info_nce.h for the formulas).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kd_kernels._backend import triton_interpreting
from kd_kernels._ops import register_info_nce_fused_op, register_info_nce_ops

NORMALIZE_EPS = 1e-12  # F.normalize's default


@triton.jit
def _similarity_tile(
    q_ptr,
    k_ptr,
    rows,
    cols,
    row_ok,
    col_ok,
    dim,
    stride_qn,
    stride_qd,
    stride_kn,
    stride_kd,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(BLOCK_N, BLOCK_M) raw dot products q_i . k_j, fp32, summed over D in BLOCK_D slices."""
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        d_ok = d < dim
        q = tl.load(
            q_ptr + rows[:, None] * stride_qn + d[None, :] * stride_qd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        k = tl.load(
            k_ptr + cols[:, None] * stride_kn + d[None, :] * stride_kd,
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:  # the interpreter's bf16 dot is wrong: use fp32 tiles there
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _info_nce_forward_kernel(
    q_ptr,
    k_ptr,
    labels_ptr,
    row_scale_ptr,
    col_scale_ptr,
    lse_ptr,
    loss_ptr,
    num_rows,
    num_keys,
    dim,
    stride_qn,
    stride_qd,
    stride_kn,
    stride_kd,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < num_rows
    row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    running_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    positive = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, num_keys, BLOCK_M):
        cols = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
        col_ok = cols < num_keys
        col_scale = tl.load(col_scale_ptr + cols, mask=col_ok, other=0.0)
        dots = _similarity_tile(
            q_ptr,
            k_ptr,
            rows,
            cols,
            row_ok,
            col_ok,
            dim,
            stride_qn,
            stride_qd,
            stride_kn,
            stride_kd,
            BLOCK_N,
            BLOCK_M,
            BLOCK_D,
            UPCAST,
            PRECISION,
        )
        z = dots * row_scale[:, None] * col_scale[None, :]
        z = tl.where(col_ok[None, :], z, float("-inf"))
        positive += tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), axis=1)
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        # A row seen only as -inf so far keeps max -inf; shift by 0 so no -inf - -inf = NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(
            tl.exp(z - shift[:, None]), axis=1
        )
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, lse - positive, mask=row_ok)


@triton.jit
def _softmax_minus_target(dots, row_scale, col_scale, lse, label, cols, row_ok, col_ok):
    """P_ij = exp(z_ij - lse_i) - [j == label_i], z_ij = dots_ij a_i b_j / t (row_scale holds
    a_i / t); 0 outside the valid rows and keys. |P_ij| <= 1: safe to round to fp16 / bf16."""
    z = dots * row_scale[:, None] * col_scale[None, :]
    p = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == label[:, None], 1.0, 0.0)
    return tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)


@triton.jit
def _gradient_tile(
    q_ptr,
    k_ptr,
    labels_ptr,
    row_scale_ptr,
    col_scale_ptr,
    lse_ptr,
    rows,
    cols,
    num_rows,
    num_keys,
    dim,
    stride_qn,
    stride_qd,
    stride_kn,
    stride_kd,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The (BLOCK_N, BLOCK_M) tile of P = softmax - target for queries ``rows`` and keys
    ``cols``, recomputed from the embeddings and the forward's per-query statistics."""
    row_ok = rows < num_rows
    col_ok = cols < num_keys
    row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    col_scale = tl.load(col_scale_ptr + cols, mask=col_ok, other=0.0)
    dots = _similarity_tile(
        q_ptr,
        k_ptr,
        rows,
        cols,
        row_ok,
        col_ok,
        dim,
        stride_qn,
        stride_qd,
        stride_kn,
        stride_kd,
        BLOCK_N,
        BLOCK_M,
        BLOCK_D,
        UPCAST,
        PRECISION,
    )
    return _softmax_minus_target(dots, row_scale, col_scale, lse, label, cols, row_ok, col_ok)


@triton.jit
def _info_nce_grad_query_kernel(
    q_ptr,
    k_ptr,
    labels_ptr,
    row_scale_ptr,
    col_scale_ptr,
    lse_ptr,
    row_factor_ptr,
    col_scale_max_ptr,
    u_ptr,
    num_rows,
    num_keys,
    dim,
    stride_qn,
    stride_qd,
    stride_kn,
    stride_kd,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """u[rows, d-slice] = r_i B sum_j (P_ij b_j / B) k_j[d-slice], r_i = g_i a_i / t.

    The tile product sees only P_ij b_j / B (|.| <= 1, B = max_j b_j) and the raw keys: the
    small factors (g_i = 1/N, the inverse norms) are applied in fp32 after the sum, so
    rounding the tile to fp16 never pushes its entries below fp16's normal range."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    out_d = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_d_ok = out_d < dim
    inv_col_scale_max = 1.0 / tl.load(col_scale_max_ptr)
    u = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
    for start in range(0, num_keys, BLOCK_M):
        cols = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
        col_ok = cols < num_keys
        p = _gradient_tile(
            q_ptr,
            k_ptr,
            labels_ptr,
            row_scale_ptr,
            col_scale_ptr,
            lse_ptr,
            rows,
            cols,
            num_rows,
            num_keys,
            dim,
            stride_qn,
            stride_qd,
            stride_kn,
            stride_kd,
            BLOCK_N,
            BLOCK_M,
            BLOCK_D,
            UPCAST,
            PRECISION,
        )
        col_weight = tl.load(col_scale_ptr + cols, mask=col_ok, other=0.0) * inv_col_scale_max
        k = tl.load(
            k_ptr + cols[:, None] * stride_kn + out_d[None, :] * stride_kd,
            mask=col_ok[:, None] & out_d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        tile = (p * col_weight[None, :]).to(k.dtype)
        u = tl.dot(tile, k, u, input_precision=PRECISION)
    row_ok = rows < num_rows
    row_factor = tl.load(row_factor_ptr + rows, mask=row_ok, other=0.0)
    u = u * (row_factor * tl.load(col_scale_max_ptr))[:, None]
    tl.store(
        u_ptr + rows[:, None] * dim + out_d[None, :],
        u,
        mask=row_ok[:, None] & out_d_ok[None, :],
    )


@triton.jit
def _info_nce_grad_key_kernel(
    q_ptr,
    k_ptr,
    labels_ptr,
    row_scale_ptr,
    col_scale_ptr,
    lse_ptr,
    row_factor_ptr,
    row_factor_max_ptr,
    v_ptr,
    num_rows,
    num_keys,
    dim,
    stride_qn,
    stride_qd,
    stride_kn,
    stride_kd,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """v[cols, d-slice] = b_j R sum_i (P_ij r_i / R) q_i[d-slice], R = max_i |r_i|: as in the
    query kernel, the tile product holds only O(1) factors and the raw queries."""
    cols = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    out_d = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_d_ok = out_d < dim
    row_factor_max = tl.load(row_factor_max_ptr)
    inv_row_factor_max = 1.0 / row_factor_max
    v = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    for start in range(0, num_rows, BLOCK_N):
        rows = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < num_rows
        p = _gradient_tile(
            q_ptr,
            k_ptr,
            labels_ptr,
            row_scale_ptr,
            col_scale_ptr,
            lse_ptr,
            rows,
            cols,
            num_rows,
            num_keys,
            dim,
            stride_qn,
            stride_qd,
            stride_kn,
            stride_kd,
            BLOCK_N,
            BLOCK_M,
            BLOCK_D,
            UPCAST,
            PRECISION,
        )
        row_weight = tl.load(row_factor_ptr + rows, mask=row_ok, other=0.0) * inv_row_factor_max
        q = tl.load(
            q_ptr + rows[:, None] * stride_qn + out_d[None, :] * stride_qd,
            mask=row_ok[:, None] & out_d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        tile = (p * row_weight[:, None]).to(q.dtype)
        v = tl.dot(tl.trans(tile), q, v, input_precision=PRECISION)
    col_ok = cols < num_keys
    col_scale = tl.load(col_scale_ptr + cols, mask=col_ok, other=0.0)
    v = v * (col_scale * row_factor_max)[:, None]
    tl.store(
        v_ptr + cols[:, None] * dim + out_d[None, :],
        v,
        mask=col_ok[:, None] & out_d_ok[None, :],
    )


@triton.jit
def _info_nce_fused_query_kernel(
    q_ptr,
    k_ptr,
    labels_ptr,
    row_scale_ptr,
    col_scale_ptr,
    col_weight_ptr,
    row_factor_ptr,
    col_scale_max_ptr,
    lse_ptr,
    loss_ptr,
    u_ptr,
    num_rows,
    num_keys,
    dim,
    stride_qn,
    stride_qd,
    stride_kn,
    stride_kd,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One walk over the keys for a block of queries: lse_i, loss_i and
    u[rows, d-slice] = r_i sum_j (P_ij - [j == y_i]) b_j k_j, r_i = w_i a_i / t, P = softmax(z).

    Flash-attention style: the running max m_i rescales the (BLOCK_N, BLOCK_DO) accumulator
    of sum_{j != y_i} exp(z_ij - m_i) (b_j / B) k_j. The label's column stays out of the tile
    product (its entry would round to 1 in fp16 / bf16, and P_iy - 1 would cancel): it enters
    in fp32 at the end with the factor -(1 - P_iy) = -sum_{j != y_i} exp(z_ij - m_i) / l_i."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    out_d = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_d_ok = out_d < dim
    row_ok = rows < num_rows
    row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    running_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    others_sum = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum_{j != y_i} exp(z_ij - m_i)
    positive = tl.zeros([BLOCK_N], dtype=tl.float32)
    u = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
    for start in range(0, num_keys, BLOCK_M):
        cols = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
        col_ok = cols < num_keys
        col_scale = tl.load(col_scale_ptr + cols, mask=col_ok, other=0.0)
        dots = _similarity_tile(
            q_ptr,
            k_ptr,
            rows,
            cols,
            row_ok,
            col_ok,
            dim,
            stride_qn,
            stride_qd,
            stride_kn,
            stride_kd,
            BLOCK_N,
            BLOCK_M,
            BLOCK_D,
            UPCAST,
            PRECISION,
        )
        z = dots * row_scale[:, None] * col_scale[None, :]
        z = tl.where(col_ok[None, :], z, float("-inf"))
        is_label = cols[None, :] == label[:, None]
        positive += tl.sum(tl.where(is_label, z, 0.0), axis=1)
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(running_max - shift)
        others = tl.where(is_label, 0.0, tl.exp(z - shift[:, None]))
        others_sum = others_sum * rescale + tl.sum(others, axis=1)
        running_max = new_max
        col_weight = tl.load(col_weight_ptr + cols, mask=col_ok, other=0.0)
        k = tl.load(
            k_ptr + cols[:, None] * stride_kn + out_d[None, :] * stride_kd,
            mask=col_ok[:, None] & out_d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        # Entries in [0, 1] (exp(z - m) b_j / B): safe to round to fp16 / bf16.
        tile = (others * col_weight[None, :]).to(k.dtype)
        u = tl.dot(tile, k, u * rescale[:, None], input_precision=PRECISION)
    total = others_sum + tl.exp(positive - running_max)
    lse = running_max + tl.log(total)
    # The slices agree on lse: the first one writes it (a (BLOCK_N,) mask: the interpreter
    # rejects a scalar one here).
    first_slice = (rows * 0 + tl.program_id(1)) == 0
    tl.store(lse_ptr + rows, lse, mask=row_ok & first_slice)
    tl.store(loss_ptr + rows, lse - positive, mask=row_ok & first_slice)
    row_factor = tl.load(row_factor_ptr + rows, mask=row_ok, other=0.0)
    col_scale_max = tl.load(col_scale_max_ptr)
    label_ok = row_ok & (label >= 0)
    label_scale = tl.load(col_scale_ptr + label, mask=label_ok, other=0.0)
    label_key = tl.load(
        k_ptr + label[:, None] * stride_kn + out_d[None, :] * stride_kd,
        mask=label_ok[:, None] & out_d_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    inv_total = 1.0 / total
    u = (
        u * (row_factor * col_scale_max * inv_total)[:, None]
        - label_key * (row_factor * label_scale * others_sum * inv_total)[:, None]
    )
    tl.store(
        u_ptr + rows[:, None] * dim + out_d[None, :],
        u,
        mask=row_ok[:, None] & out_d_ok[None, :],
    )


@triton.jit
def _info_nce_column_stats_kernel(
    q_ptr,
    k_ptr,
    row_scale_ptr,
    col_scale_ptr,
    column_lse_ptr,
    reverse_ptr,
    num_rows,
    dim,
    stride_qn,
    stride_qd,
    stride_kn,
    stride_kd,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The symmetric loss's column direction over the first N keys: clse_j = logsumexp_i z_ij
    and rev_j = clse_j - z_jj, walking the queries per block of keys. z is formed exactly as
    the row kernels form it (same tile product, same scale order), so P and Pc of one entry
    come from one z: with N = M = 1 both are exactly 1 and the gradient exactly 0."""
    cols = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col_ok = cols < num_rows
    col_scale = tl.load(col_scale_ptr + cols, mask=col_ok, other=0.0)
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    diagonal = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, num_rows, BLOCK_N):
        rows = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < num_rows
        row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
        dots = _similarity_tile(
            q_ptr,
            k_ptr,
            rows,
            cols,
            row_ok,
            col_ok,
            dim,
            stride_qn,
            stride_qd,
            stride_kn,
            stride_kd,
            BLOCK_N,
            BLOCK_M,
            BLOCK_D,
            UPCAST,
            PRECISION,
        )
        z = dots * row_scale[:, None] * col_scale[None, :]
        z = tl.where(row_ok[:, None], z, float("-inf"))
        diagonal += tl.sum(tl.where(rows[:, None] == cols[None, :], z, 0.0), axis=0)
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(
            tl.exp(z - shift[None, :]), axis=0
        )
        running_max = new_max
    column_lse = running_max + tl.log(running_sum)
    tl.store(column_lse_ptr + cols, column_lse, mask=col_ok)
    tl.store(reverse_ptr + cols, column_lse - diagonal, mask=col_ok)


@triton.jit
def _symmetric_gradient_tile(
    q_ptr,
    k_ptr,
    labels_ptr,
    row_scale_ptr,
    col_scale_ptr,
    lse_ptr,
    column_lse_ptr,
    weight_ptr,
    rows,
    cols,
    num_rows,
    num_keys,
    dim,
    stride_qn,
    stride_qd,
    stride_kn,
    stride_kd,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dz_ij / W of the symmetric loss, recomputed: (w_i (P_ij - [j == y_i]) + w_j (Pc_ij -
    [i == j])) / 2 with P = exp(z - lse_i), Pc = exp(z - clse_j) for j < N (0 beyond), and
    w = row_weight / W (weight_ptr holds it, |w| <= 1): every entry is O(1)."""
    row_ok = rows < num_rows
    col_ok = cols < num_keys
    paired = cols < num_rows  # the column direction pairs key j < N with query j
    row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    row_weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
    col_scale = tl.load(col_scale_ptr + cols, mask=col_ok, other=0.0)
    column_lse = tl.load(column_lse_ptr + cols, mask=paired, other=0.0)
    col_weight = tl.load(weight_ptr + cols, mask=paired, other=0.0)
    dots = _similarity_tile(
        q_ptr,
        k_ptr,
        rows,
        cols,
        row_ok,
        col_ok,
        dim,
        stride_qn,
        stride_qd,
        stride_kn,
        stride_kd,
        BLOCK_N,
        BLOCK_M,
        BLOCK_D,
        UPCAST,
        PRECISION,
    )
    z = dots * row_scale[:, None] * col_scale[None, :]
    row_part = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == label[:, None], 1.0, 0.0)
    column_part = tl.exp(z - column_lse[None, :]) - tl.where(
        cols[None, :] == rows[:, None], 1.0, 0.0
    )
    column_part = tl.where(paired[None, :], column_part, 0.0)
    dz = 0.5 * (row_weight[:, None] * row_part + col_weight[None, :] * column_part)
    return tl.where(row_ok[:, None] & col_ok[None, :], dz, 0.0)


@triton.jit
def _info_nce_symmetric_grad_query_kernel(
    q_ptr,
    k_ptr,
    labels_ptr,
    row_scale_ptr,
    col_scale_ptr,
    lse_ptr,
    column_lse_ptr,
    weight_ptr,
    col_weight_ptr,
    out_scale_ptr,
    u_ptr,
    num_rows,
    num_keys,
    dim,
    stride_qn,
    stride_qd,
    stride_kn,
    stride_kd,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """u[rows, d-slice] = s_i sum_j dz_ij (b_j / B) k_j: the tile holds dz / W times
    col_weight = b_j / B (both O(1)); out_scale s_i = W B a_i / t is applied in fp32."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    out_d = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_d_ok = out_d < dim
    u = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
    for start in range(0, num_keys, BLOCK_M):
        cols = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
        col_ok = cols < num_keys
        dz = _symmetric_gradient_tile(
            q_ptr,
            k_ptr,
            labels_ptr,
            row_scale_ptr,
            col_scale_ptr,
            lse_ptr,
            column_lse_ptr,
            weight_ptr,
            rows,
            cols,
            num_rows,
            num_keys,
            dim,
            stride_qn,
            stride_qd,
            stride_kn,
            stride_kd,
            BLOCK_N,
            BLOCK_M,
            BLOCK_D,
            UPCAST,
            PRECISION,
        )
        col_weight = tl.load(col_weight_ptr + cols, mask=col_ok, other=0.0)
        k = tl.load(
            k_ptr + cols[:, None] * stride_kn + out_d[None, :] * stride_kd,
            mask=col_ok[:, None] & out_d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        tile = (dz * col_weight[None, :]).to(k.dtype)
        u = tl.dot(tile, k, u, input_precision=PRECISION)
    row_ok = rows < num_rows
    out_scale = tl.load(out_scale_ptr + rows, mask=row_ok, other=0.0)
    tl.store(
        u_ptr + rows[:, None] * dim + out_d[None, :],
        u * out_scale[:, None],
        mask=row_ok[:, None] & out_d_ok[None, :],
    )


@triton.jit
def _info_nce_symmetric_grad_key_kernel(
    q_ptr,
    k_ptr,
    labels_ptr,
    row_scale_ptr,
    col_scale_ptr,
    lse_ptr,
    column_lse_ptr,
    weight_ptr,
    row_weight_ptr,
    out_scale_ptr,
    v_ptr,
    num_rows,
    num_keys,
    dim,
    stride_qn,
    stride_qd,
    stride_kn,
    stride_kd,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """v[cols, d-slice] = s_j sum_i dz_ij (a_i / A) q_i: the tile holds dz / W times
    row_weight = a_i / A; out_scale s_j = W A b_j / t is applied in fp32."""
    cols = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    out_d = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_d_ok = out_d < dim
    v = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    for start in range(0, num_rows, BLOCK_N):
        rows = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < num_rows
        dz = _symmetric_gradient_tile(
            q_ptr,
            k_ptr,
            labels_ptr,
            row_scale_ptr,
            col_scale_ptr,
            lse_ptr,
            column_lse_ptr,
            weight_ptr,
            rows,
            cols,
            num_rows,
            num_keys,
            dim,
            stride_qn,
            stride_qd,
            stride_kn,
            stride_kd,
            BLOCK_N,
            BLOCK_M,
            BLOCK_D,
            UPCAST,
            PRECISION,
        )
        row_weight = tl.load(row_weight_ptr + rows, mask=row_ok, other=0.0)
        q = tl.load(
            q_ptr + rows[:, None] * stride_qn + out_d[None, :] * stride_qd,
            mask=row_ok[:, None] & out_d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        tile = (dz * row_weight[:, None]).to(q.dtype)
        v = tl.dot(tl.trans(tile), q, v, input_precision=PRECISION)
    col_ok = cols < num_keys
    out_scale = tl.load(out_scale_ptr + cols, mask=col_ok, other=0.0)
    tl.store(
        v_ptr + cols[:, None] * dim + out_d[None, :],
        v * out_scale[:, None],
        mask=col_ok[:, None] & out_d_ok[None, :],
    )


def _inverse_norms(x: torch.Tensor, cosine: bool) -> torch.Tensor:
    """a_i = 1 / max(|x_i|, eps) (cosine) or 1 (dot), fp32 (N,)."""
    if not cosine:
        return torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32)
    return norms.clamp_min(NORMALIZE_EPS).reciprocal()


def _matmul_precision(dtype: torch.dtype) -> str:
    """fp16 / bf16 feed the tensor cores as they are; fp32 stays exact ("ieee") unless the
    user allows TF32 for matmuls (torch.backends.cuda.matmul.allow_tf32), as torch does."""
    if dtype != torch.float32:
        return "tf32"  # ignored for half inputs: their dot is exact products, fp32 sums
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _launch_config(
    query: torch.Tensor, key: torch.Tensor, num_rows: int, num_keys: int, dim: int, backward: bool
) -> dict:
    """Tiles and warps per kernel, sized so that no kernel spills on sm_90 / sm_80
    (scripts/check_triton.py): the backward's (BLOCK, BLOCK_DO) fp32 accumulator takes 8 warps
    at BLOCK_DO = 256; exact fp32 ("ieee", no tensor cores) and rows that cannot load as
    16-byte vectors (a stride not a multiple of 16 bytes: one 64-bit address per element)
    take smaller tiles."""
    interpreting = triton_interpreting()
    precision = _matmul_precision(query.dtype)
    vector = 16 // query.element_size()
    # Triton proves a masked row vector-wide only when D is a multiple of 16 (its integer
    # specialisation) and the row starts are 16-byte aligned.
    aligned = dim % 16 == 0 and all(
        x.stride(1) == 1 and (x.stride(0) % vector == 0 or x.shape[0] == 1) for x in (query, key)
    )
    exact_fp32 = precision == "ieee"
    if interpreting:  # the interpreter pays per program: the largest tiles the shapes allow
        cap, cap_d, cap_do, warps = 128, 128, 256, 4
    elif exact_fp32:
        cap, cap_d, cap_do, warps = 32 if backward else 64, 32, 64, 4 if backward else 8
    elif not aligned:
        cap, cap_d, cap_do, warps = 64, 32, 128, 8
    else:
        cap, cap_d, cap_do, warps = 64, 64, 256, 8 if backward else 4
    config = dict(
        BLOCK_N=max(16, min(cap, triton.next_power_of_2(num_rows))),
        BLOCK_M=max(16, min(cap, triton.next_power_of_2(num_keys))),
        BLOCK_D=max(16, min(cap_d, triton.next_power_of_2(dim))),
        UPCAST=interpreting and query.dtype == torch.bfloat16,
        PRECISION=precision,
        num_warps=warps,
    )
    if backward:
        # Output columns per program: each D / BLOCK_DO slice recomputes the similarity tiles.
        config["BLOCK_DO"] = max(16, min(cap_do, triton.next_power_of_2(dim)))
    return config


def _check_dtype(query: torch.Tensor) -> None:
    if query.dtype == torch.float64:
        raise TypeError("info_nce_loss on triton supports float32, float16 and bfloat16")


def launch_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    cosine: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query losses and log-sum-exps (both fp32 (N,)); the kernel launch of the forward op
    (plain function: scripts/check_triton.py compiles it with stand-in tensors)."""
    _check_dtype(query)
    (num_rows, dim), num_keys = query.shape, key.shape[0]
    row_scale = _inverse_norms(query, cosine) / temperature
    col_scale = _inverse_norms(key, cosine)
    lse = torch.empty(num_rows, dtype=torch.float32, device=query.device)
    loss = torch.empty_like(lse)
    config = _launch_config(query, key, num_rows, num_keys, dim, backward=False)
    grid = (triton.cdiv(num_rows, config["BLOCK_N"]),)
    _info_nce_forward_kernel[grid](
        query,
        key,
        labels,
        row_scale,
        col_scale,
        lse,
        loss,
        num_rows,
        num_keys,
        dim,
        *query.stride(),
        *key.stride(),
        **config,
    )
    return loss, lse


def launch_backward(
    grad_loss: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    lse: torch.Tensor,
    cosine: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i g_i loss_i with respect to query, key and temperature."""
    _check_dtype(query)
    (num_rows, dim), num_keys = query.shape, key.shape[0]
    inv_q, inv_k = _inverse_norms(query, cosine), _inverse_norms(key, cosine)
    row_scale = inv_q / temperature
    # r_i = g_i a_i / t and the two maxima that bring the tile factors to O(1) (device
    # scalars: no host sync); a zero maximum (no gradient) is kept away from 0 / 0.
    row_factor = (grad_loss.to(torch.float32) * row_scale).contiguous()
    row_factor_max = row_factor.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    col_scale_max = inv_k.amax().clamp_min(torch.finfo(torch.float32).tiny)
    u = torch.empty(num_rows, dim, dtype=torch.float32, device=query.device)
    v = torch.empty(num_keys, dim, dtype=torch.float32, device=query.device)
    config = _launch_config(query, key, num_rows, num_keys, dim, backward=True)
    block_do = config["BLOCK_DO"]
    args = (query, key, labels, row_scale, inv_k, lse, row_factor)
    sizes = (num_rows, num_keys, dim, *query.stride(), *key.stride())
    grid_q = (triton.cdiv(num_rows, config["BLOCK_N"]), triton.cdiv(dim, block_do))
    _info_nce_grad_query_kernel[grid_q](*args, col_scale_max, u, *sizes, **config)
    grid_k = (triton.cdiv(num_keys, config["BLOCK_M"]), triton.cdiv(dim, block_do))
    _info_nce_grad_key_kernel[grid_k](*args, row_factor_max, v, *sizes, **config)
    return _input_gradients(u, v, query, key, inv_q, inv_k, temperature, cosine)


def _input_gradients(
    u: torch.Tensor,
    v: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    inv_q: torch.Tensor,
    inv_k: torch.Tensor,
    temperature: torch.Tensor,
    cosine: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From u = W k, v = W^T q (fp32) to d query, d key (their dtype) and d temperature =
    -sum_i q_i . u_i / t (sum_ij dz_ij z_ij = sum_i q_i . u_i t)."""
    q, k = query.to(torch.float32), key.to(torch.float32)
    q_dot_u, k_dot_v = (q * u).sum(1), (k * v).sum(1)
    grad_temperature = -q_dot_u.sum() / temperature
    if cosine:  # through x / max(|x|, eps): project out x where |x| > eps
        q_live = (inv_q < 1 / NORMALIZE_EPS).to(torch.float32)
        k_live = (inv_k < 1 / NORMALIZE_EPS).to(torch.float32)
        u = u - q * (inv_q.square() * q_dot_u * q_live)[:, None]
        v = v - k * (inv_k.square() * k_dot_v * k_live)[:, None]
    return u.to(query.dtype), v.to(key.dtype), grad_temperature


def _check_fused_arguments(
    query: torch.Tensor, key: torch.Tensor, row_weight: torch.Tensor, symmetric: bool
) -> None:
    rows, keys = query.shape[0], key.shape[0]
    if row_weight.dim() != 1 or row_weight.shape[0] != rows or row_weight.device != query.device:
        raise ValueError(
            f"info_nce_fused: row_weight must be (N,) on the inputs' device, got "
            f"{tuple(row_weight.shape)} on {row_weight.device} for N={rows}"
        )
    if symmetric and keys < rows:
        raise ValueError(f"info_nce_fused: symmetric needs M >= N, got N={rows} M={keys}")


def launch_fused(
    query: torch.Tensor,
    key: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    cosine: bool,
    row_weight: torch.Tensor,
    symmetric: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and gradient in forward, for sum_i row_weight_i loss_i (mean: 1/N, sum: 1).

    Returns (losses (N,) fp32, d query, d key (their dtypes), d temperature (0-dim, its
    dtype)): the contract of ``kd_kernels::info_nce_fused`` (csrc/info_nce.h).

    One-way: two launches, 2 + 2 tile matmuls (per D / BLOCK_DO slice of the outputs; the
    similarities are recomputed per slice): ``_info_nce_fused_query_kernel`` walks the keys
    once per query block with an online softmax, giving lse, the loss and d query;
    ``_info_nce_grad_key_kernel`` then walks the queries per key block with the known lse.
    Symmetric: the row and column log-sum-exps first (the forward kernel both ways, one tile
    matmul each), then one walk per side forms d query and d key from the combined
    dz_ij = (w_i (P_ij - [j = y_i]) + w_j (Pc_ij - [i = j])) / 2: 1 + 1 + 2 + 2 tile matmuls,
    where two one-way losses with a recomputing backward take 2 x (1 + 2 + 2).
    Deterministic: no atomics."""
    _check_dtype(query)
    _check_fused_arguments(query, key, row_weight, symmetric)
    (num_rows, dim), num_keys = query.shape, key.shape[0]
    tiny = torch.finfo(torch.float32).tiny
    inv_q, inv_k = _inverse_norms(query, cosine), _inverse_norms(key, cosine)
    row_scale = inv_q / temperature
    # Device scalars (no host sync) that bring the tile factors to O(1); the small factors
    # (w_i = 1/N, inverse norms, 1/t) are applied in fp32 after the tile products.
    col_scale_max = inv_k.amax().clamp_min(tiny)
    col_weight = inv_k / col_scale_max
    weight = row_weight.to(torch.float32)
    u = torch.empty(num_rows, dim, dtype=torch.float32, device=query.device)
    v = torch.empty(num_keys, dim, dtype=torch.float32, device=query.device)
    config = _launch_config(query, key, num_rows, num_keys, dim, backward=True)
    block_do = config["BLOCK_DO"]
    sizes = (num_rows, num_keys, dim, *query.stride(), *key.stride())
    grid_q = (triton.cdiv(num_rows, config["BLOCK_N"]), triton.cdiv(dim, block_do))
    grid_k = (triton.cdiv(num_keys, config["BLOCK_M"]), triton.cdiv(dim, block_do))
    exact_fp32 = config["PRECISION"] == "ieee" and not triton_interpreting()
    # Exact fp32 (no tensor cores): the walks carry more per-row state than the recomputing
    # backward (online softmax; the column statistics) and spilled 1-6 stores on 4 warps
    # (sm_90 / sm_80, Triton 3.9 and 3.6); on 8 warps they do not (D a multiple of 16).
    walk_config = dict(config, num_warps=8) if exact_fp32 else config
    if not symmetric:
        row_factor = (weight * row_scale).contiguous()
        row_factor_max = row_factor.abs().amax().clamp_min(tiny)
        lse = torch.empty(num_rows, dtype=torch.float32, device=query.device)
        losses = torch.empty_like(lse)
        _info_nce_fused_query_kernel[grid_q](
            query,
            key,
            labels,
            row_scale,
            inv_k,
            col_weight,
            row_factor,
            col_scale_max,
            lse,
            losses,
            u,
            *sizes,
            **walk_config,
        )
        args = (query, key, labels, row_scale, inv_k, lse, row_factor)
        _info_nce_grad_key_kernel[grid_k](*args, row_factor_max, v, *sizes, **walk_config)
    else:
        loss, lse = launch_forward(query, key, labels, temperature, cosine)
        column_lse = torch.empty_like(lse)
        reverse = torch.empty_like(lse)
        stats = _launch_config(query, key, num_rows, num_keys, dim, backward=False)
        if exact_fp32:
            # Exact fp32: the 64 x 64 tile reduced over its rows spilled 3 stores (8 warps on
            # sm_90, 4 on sm_80); the backward's 32 x 32 tiles on 8 warps do not.
            stats.update(BLOCK_N=config["BLOCK_N"], BLOCK_M=config["BLOCK_M"], num_warps=8)
        _info_nce_column_stats_kernel[(triton.cdiv(num_rows, stats["BLOCK_M"]),)](
            query,
            key,
            row_scale,
            inv_k,
            column_lse,
            reverse,
            num_rows,
            dim,
            *query.stride(),
            *key.stride(),
            **stats,
        )
        losses = (loss + reverse) / 2
        weight_max = weight.abs().amax().clamp_min(tiny)
        row_scale_max = inv_q.amax().clamp_min(tiny)
        args = (query, key, labels, row_scale, inv_k, lse, column_lse, weight / weight_max)
        u_scale = row_scale * (weight_max * col_scale_max)
        _info_nce_symmetric_grad_query_kernel[grid_q](
            *args, col_weight, u_scale, u, *sizes, **walk_config
        )
        v_scale = inv_k * (weight_max * row_scale_max / temperature)
        _info_nce_symmetric_grad_key_kernel[grid_k](
            *args, inv_q / row_scale_max, v_scale, v, *sizes, **walk_config
        )
    grad_query, grad_key, grad_temperature = _input_gradients(
        u, v, query, key, inv_q, inv_k, temperature, cosine
    )
    return losses, grad_query, grad_key, grad_temperature.to(temperature.dtype)


@torch.library.custom_op("kd_kernels::info_nce_forward_triton", mutates_args=())
def info_nce_forward_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    cosine: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``kd_kernels::info_nce_forward`` (schema in csrc/ops.cpp)."""
    return launch_forward(query, key, labels, temperature, cosine)


@torch.library.custom_op("kd_kernels::info_nce_backward_triton", mutates_args=())
def info_nce_backward_triton(
    grad_loss: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    lse: torch.Tensor,
    cosine: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``kd_kernels::info_nce_backward``."""
    return launch_backward(grad_loss, query, key, labels, temperature, lse, cosine)


@torch.library.custom_op("kd_kernels::info_nce_fused_triton", mutates_args=())
def info_nce_fused_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    cosine: bool,
    row_weight: torch.Tensor,
    symmetric: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``kd_kernels::info_nce_fused`` (loss and gradients in one op)."""
    return launch_fused(query, key, labels, temperature, cosine, row_weight, symmetric)


register_info_nce_fused_op("kd_kernels::info_nce_fused_triton")
register_info_nce_ops(
    "kd_kernels::info_nce_forward_triton",
    "kd_kernels::info_nce_backward_triton",
    info_nce_backward_triton,
)
