"""Triton kernel of the fused layer MSE (TinyBERT attention-map and hidden-state MSE).

All matched layers run in one launch: the kernel reads each layer's student, teacher and
gradient base addresses from one small int64 table (program axis 1 = layer; one upload per
launch), so a list of 4 layers costs one launch, not 4. Layers of different shapes or
strides (rare: HF models give every layer the same shape) form groups, one launch each.

A program owns BLOCK_R rows (b, h, r) of one layer and walks their columns in BLOCK_C chunks:
attention rows (Lk = 128-512) get many rows per program, hidden rows (D = 768-1024) fewer.
Forward reads each element once and writes one sum per row; backward (the same kernel with
BACKWARD set) reads them again and writes the gradient once, so only one gradient-sized
buffer ever exists. Semantics in csrc/layer_mse.h.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kd_kernels._backend import triton_interpreting
from kd_kernels._ops import register_layer_mse_ops

# Elements per program tile: the register budget of 4 warps on Hopper at fp32.
TILE_ELEMENTS = 4096
MAX_BLOCK_COLUMNS = 1024


@triton.jit
def _layer_mse_kernel(
    table,
    student_witness,
    mask_ptr,
    row_sq_sum_ptr,
    grad_rows_ptr,
    num_rows,
    heads,
    rows_per_head,
    columns,
    s_stride_b,
    s_stride_h,
    s_stride_r,
    t_stride_b,
    t_stride_h,
    t_stride_r,
    threshold,
    USE_THRESHOLD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_COLUMNS: tl.constexpr,
    BACKWARD: tl.constexpr,
    ALIGNED: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    layer = tl.program_id(1)
    num_layers = tl.num_programs(1)
    # table (4, layers) int64: student, teacher, gradient addresses and first rows (one upload);
    # the witness (the group's first student) gives the addresses their type.
    student_base = tl.load(table + layer).to(student_witness.dtype)
    teacher_base = tl.load(table + num_layers + layer).to(student_witness.dtype)
    if ALIGNED:  # every base is 16-byte aligned: lets the GPU use 128-bit loads
        student_base = tl.multiple_of(student_base, 16)
        teacher_base = tl.multiple_of(teacher_base, 16)

    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in_range = rows < num_rows
    rows64 = rows.to(tl.int64)
    r = rows64 % rows_per_head
    h = (rows64 // rows_per_head) % heads
    b = rows64 // (rows_per_head * heads)
    student_offset = b * s_stride_b + h * s_stride_h + r * s_stride_r
    teacher_offset = b * t_stride_b + h * t_stride_h + r * t_stride_r
    grad_offset = rows64 * columns
    if ROW_ALIGN > 1:  # every row starts on a 16-byte boundary (the launcher checked strides)
        # and C is a multiple of the vector: the column mask is uniform over each vector. Triton
        # knows an integer argument's divisibility only by 16 (C = 312 bf16: 624-byte rows, yet
        # 8-byte loads), and tl.multiple_of on an argument itself is lost; C // ROW_ALIGN *
        # ROW_ALIGN (the same value: the host checked C % ROW_ALIGN == 0) is a product that the
        # compiler's alignment analysis reads as a multiple of ROW_ALIGN.
        columns = columns // ROW_ALIGN * ROW_ALIGN
        student_offset = tl.multiple_of(student_offset, ROW_ALIGN)
        teacher_offset = tl.multiple_of(teacher_offset, ROW_ALIGN)
        grad_offset = tl.multiple_of(grad_offset, ROW_ALIGN)
    student_rows = student_base + student_offset
    teacher_rows = teacher_base + teacher_offset
    counted_row = row_in_range
    if HAS_MASK:
        real = tl.load(mask_ptr + b * rows_per_head + r, mask=row_in_range, other=0)
        counted_row = counted_row & (real != 0)
    first_row = tl.load(table + 3 * num_layers + layer)
    if BACKWARD:
        grad_base = tl.load(table + 2 * num_layers + layer).to(student_witness.dtype)
        grad_base = tl.multiple_of(grad_base, 16)  # fresh torch allocations
        grad_rows = grad_base + grad_offset
        # d out / d s = 2 g_row (s' - t'), g_row = d out / d row_sq_sum
        grad_scale = 2 * tl.load(grad_rows_ptr + first_row + rows64, mask=row_in_range, other=0.0)

    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, columns, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        in_tile = row_in_range[:, None] & (cols < columns)[None, :]
        counted = counted_row[:, None] & in_tile
        if MASK_COLUMNS:
            key_real = tl.load(mask_ptr + b[:, None] * rows_per_head + cols[None, :], mask=in_tile)
            counted = counted & (key_real != 0)
        # Uncounted entries are never read: they load as 0 on both sides, so they add 0 to the
        # sum and get a 0 gradient, whatever (NaN, padding) they hold.
        s = tl.load(student_rows[:, None] + cols[None, :], mask=counted, other=0.0)
        t = tl.load(teacher_rows[:, None] + cols[None, :], mask=counted, other=0.0)
        s = s.to(tl.float32)
        t = t.to(tl.float32)
        if USE_THRESHOLD:
            replaced = s <= threshold  # False for NaN, which then propagates
            diff = tl.where(replaced, 0.0, s) - tl.where(t <= threshold, 0.0, t)
            grad = tl.where(replaced, 0.0, diff)
        else:
            diff = s - t
            grad = diff
        if BACKWARD:
            grad_ptrs = grad_rows[:, None] + cols[None, :]
            grad = grad * grad_scale[:, None]
            tl.store(grad_ptrs, grad.to(grad_ptrs.dtype.element_ty), mask=in_tile)
        else:
            total += tl.sum(diff * diff, axis=1)
    if not BACKWARD:
        tl.store(row_sq_sum_ptr + first_row + rows64, total, mask=row_in_range)


def _upload_table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """The launch's (4, layers) int64 table of addresses and first rows, in one copy."""
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":  # pinned + non_blocking: no host sync for the copy
        return table.pin_memory().to(device, non_blocking=True)
    return table


def _launch_group(
    layer_ids,
    student,
    teacher,
    grad,
    first_rows,
    mask,
    threshold,
    mask_columns,
    row_sq_sum,
    grad_rows,
):
    s0, t0 = student[layer_ids[0]], teacher[layer_ids[0]]
    batch, heads, rows_per_head, columns = s0.shape
    num_rows = batch * heads * rows_per_head
    device = s0.device
    student_addresses = [student[i].data_ptr() for i in layer_ids]
    teacher_addresses = [teacher[i].data_ptr() for i in layer_ids]
    grad_addresses = [grad[i].data_ptr() for i in layer_ids] if grad else [0] * len(layer_ids)
    aligned = all(a % 16 == 0 for a in student_addresses + teacher_addresses + grad_addresses)
    # Elements per 16 bytes: when every row start is a multiple of it, rows load as 128-bit
    # vectors; otherwise accesses are scalar, each with its own 64-bit address, so the tile is
    # halved to stay within the register file (L = 50 spilled at 4096 elements).
    vector = 16 // s0.element_size()
    strides = (*s0.stride()[:3], *t0.stride()[:3], columns)
    row_align = vector if aligned and all(x % vector == 0 for x in strides) else 1
    tile = TILE_ELEMENTS if row_align > 1 else TILE_ELEMENTS // 2
    block_c = min(triton.next_power_of_2(max(columns, 1)), MAX_BLOCK_COLUMNS)
    block_r = min(max(1, tile // block_c), triton.next_power_of_2(num_rows))
    if triton_interpreting():  # the interpreter pays per program: use fewer, larger tiles
        block_r = min(block_r * 8, triton.next_power_of_2(num_rows))
    grid = (triton.cdiv(num_rows, block_r), len(layer_ids))
    table = [
        student_addresses,
        teacher_addresses,
        grad_addresses,
        [first_rows[i] for i in layer_ids],
    ]
    _layer_mse_kernel[grid](
        _upload_table(table, device),
        s0,
        mask,
        row_sq_sum,
        grad_rows,
        num_rows,
        heads,
        rows_per_head,
        columns,
        *s0.stride()[:3],
        *t0.stride()[:3],
        0.0 if threshold is None else float(threshold),
        USE_THRESHOLD=threshold is not None,
        HAS_MASK=mask is not None,
        MASK_COLUMNS=mask is not None and mask_columns,
        BACKWARD=grad_rows is not None,
        ALIGNED=aligned,
        ROW_ALIGN=row_align,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=4,
    )


def _launch(student, teacher, mask, threshold, mask_columns, row_sq_sum, grad_rows, grad):
    """Forward (grad_rows None: fills row_sq_sum) or backward (fills grad), every layer in one
    launch per group of layers sharing shape and strides (one group for HF outputs)."""
    if student[0].dtype == torch.float64:
        raise TypeError("layer MSE on triton supports float32, float16 and bfloat16")
    rows = [s.shape[0] * s.shape[1] * s.shape[2] for s in student]
    first_rows = [sum(rows[:i]) for i in range(len(rows))]
    groups: dict[tuple, list[int]] = {}
    for index, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if rows[index] > 0:
            groups.setdefault((s.shape, s.stride(), t.stride()), []).append(index)
    for layer_ids in groups.values():
        _launch_group(
            layer_ids,
            student,
            teacher,
            grad,
            first_rows,
            mask,
            threshold,
            mask_columns,
            row_sq_sum,
            grad_rows,
        )


@torch.library.custom_op("kd_kernels::layer_mse_forward_triton", mutates_args=())
def layer_mse_forward_triton(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    mask: torch.Tensor | None,
    threshold: float | None,
    mask_columns: bool,
) -> torch.Tensor:
    """Triton twin of ``kd_kernels::layer_mse_forward`` (schema in csrc/ops.cpp)."""
    total_rows = sum(s.shape[0] * s.shape[1] * s.shape[2] for s in student)
    row_sq_sum = student[0].new_empty(total_rows, dtype=torch.float32)
    _launch(student, teacher, mask, threshold, mask_columns, row_sq_sum, None, [])
    return row_sq_sum


@torch.library.custom_op("kd_kernels::layer_mse_backward_triton", mutates_args=())
def layer_mse_backward_triton(
    grad_rows: torch.Tensor,
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    mask: torch.Tensor | None,
    threshold: float | None,
    mask_columns: bool,
) -> list[torch.Tensor]:
    """Triton twin of ``kd_kernels::layer_mse_backward``."""
    grad = [torch.empty(s.shape, dtype=s.dtype, device=s.device) for s in student]
    grad_rows = grad_rows.to(torch.float32).contiguous()
    _launch(student, teacher, mask, threshold, mask_columns, None, grad_rows, grad)
    return grad


register_layer_mse_ops(
    "kd_kernels::layer_mse_forward_triton",
    "kd_kernels::layer_mse_backward_triton",
    layer_mse_backward_triton,
)
