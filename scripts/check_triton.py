#!/usr/bin/env python
"""Compiles every Triton kernel natively, exactly as the launchers configure it, without a GPU.

The project's own launch code runs on stand-in (``meta``) tensors under a stand-in Triton
driver whose target is sm_90 (H100/H200) or sm_80 (A100): ``kernel[grid](...)`` only compiles
(Triton's warm-up path) and is recorded with its grid. Inputs of any size cost no memory: the
launchers read only shapes, strides, dtypes and the pointers' alignment (a meta tensor's
``data_ptr`` is its byte offset, so views can be misaligned on purpose).

For each compiled kernel it reads Triton's bundled ``cuobjdump`` (registers, stack, shared
memory), the SASS (spill stores = ``STL``: ptxas puts spills in the stack frame) and the PTX
(widest global load and store, tensor-core instructions), and per case the grid against
CUDA's limits with a static occupancy estimate: programs, programs per SM (registers, shared
memory, warps), waves on the chip. It exits non-zero on a compile error, a launcher error
or an exceeded limit (``--max-spills N`` also fails on spill stores above N).

    python scripts/check_triton.py                 # the CI table, sm_90 and sm_80
    python scripts/check_triton.py --full          # the whole table (a few minutes)
    python scripts/check_triton.py --only kd_loss --arch 90 --json out.json

Run it with TRITON_INTERPRET unset. A second Triton version: ``pip install --no-deps
--target DIR triton==3.6.0`` and ``PYTHONPATH=DIR python scripts/check_triton.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("check_triton: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver
from triton.runtime.driver import driver as triton_driver
from triton.runtime.jit import JITFunction

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kd_kernels.triton import info_nce as info_nce_triton  # noqa: E402
from kd_kernels.triton import kd_loss as kd_loss_triton  # noqa: E402
from kd_kernels.triton import layer_mse as layer_mse_triton  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclasses.dataclass(frozen=True)
class Arch:
    """What one GPU generation allows a program (CUDA occupancy calculator numbers)."""

    name: str
    capability: int
    sms: int
    shared_per_block: int  # opt-in maximum
    shared_per_sm: int
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32


ARCHS = {
    90: Arch("sm_90 (H100/H200)", 90, 132, 227 * 1024, 228 * 1024),
    80: Arch("sm_80 (A100)", 80, 108, 163 * 1024, 164 * 1024),
}
MAX_GRID = (2**31 - 1, 65535, 65535)


class StandInDriver:
    """A Triton driver with no device: it names a target and nothing else, so kernels compile
    for it through Triton's own pipeline (TTIR, TTGIR, LLVM, PTX, ptxas)."""

    def __init__(self, arch: Arch):
        self.target = GPUTarget("cuda", arch.capability, 32)

    def get_current_device(self) -> int:
        return self.target.arch  # one JIT cache per architecture

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")

    def map_python_to_cpp_type(self, ty: str) -> str:
        return CudaDriver.map_python_to_cpp_type(self, ty)

    def get_benchmarker(self):
        raise RuntimeError("check_triton: nothing runs under the stand-in driver")


@dataclasses.dataclass
class Launch:
    kernel: str
    grid: tuple[int, ...]
    num_warps: int
    constexprs: dict
    compiled: object


class CompileOnly:
    """Within the block, ``kernel[grid](...)`` compiles for ``arch`` and records the launch."""

    def __init__(self, arch: Arch):
        self.arch = arch
        self.launches: list[Launch] = []

    def __enter__(self) -> CompileOnly:
        self._run = JITFunction.run
        launches = self.launches

        def run(fn, *args, grid, warmup, **kwargs):
            compiled = self._run(fn, *args, grid=grid, warmup=True, **kwargs)
            if callable(grid):
                raise RuntimeError("check_triton: callable grids are not recorded")
            shown = {k: v for k, v in kwargs.items() if k.isupper() or k == "num_stages"}
            launches.append(
                Launch(fn.fn.__name__, tuple(grid), kwargs.get("num_warps", 4), shown, compiled)
            )
            return compiled

        JITFunction.run = run
        self._previous = triton_driver._active  # None: no driver (what a CPU machine has)
        triton_driver.set_active(StandInDriver(self.arch))
        return self

    def __exit__(self, *exc) -> None:
        JITFunction.run = self._run
        triton_driver._active = self._previous


# --- reading the compiled kernel ----------------------------------------------------------

_LOAD = re.compile(r"\bld\.global(?:\.[a-z0-9:_]+)*?(?:\.v(\d))?\.(?:b|f|u|s)(\d+)\b")
_STORE = re.compile(r"\bst\.global(?:\.[a-z0-9:_]+)*?(?:\.v(\d))?\.(?:b|f|u|s)(\d+)\b")


def _widest(pattern: re.Pattern, ptx: str) -> int:
    """Widest global access in bits (vector lanes x element bits), 0 when there is none."""
    widths = [int(v or 1) * int(bits) for v, bits in pattern.findall(ptx)]
    return max(widths, default=0)


@dataclasses.dataclass
class Resources:
    registers: int
    stack: int
    shared: int
    spill_stores: int
    widest_load: int
    widest_store: int
    tensor_cores: str


_resource_cache: dict[int, Resources] = {}


def resources(compiled) -> Resources:
    key = id(compiled)
    if key in _resource_cache:
        return _resource_cache[key]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [BIN / "cuobjdump", "--dump-resource-usage", cubin],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [BIN / "cuobjdump", "--dump-sass", cubin], capture_output=True, text=True, check=True
        ).stdout

    def field(name: str) -> int:
        found = re.search(rf"\b{name}:(\d+)", usage)
        return int(found.group(1)) if found else 0

    ptx = compiled.asm["ptx"]
    cores = "wgmma" if "wgmma.mma_async" in ptx else ("mma" if "mma.sync" in ptx else "-")
    found = Resources(
        registers=field("REG"),
        stack=field("STACK"),
        # cuobjdump shows static shared memory; Triton's dynamic share is in the metadata.
        shared=max(field("SHARED"), int(compiled.metadata.shared)),
        spill_stores=len(re.findall(r"\bSTL(?:\.\w+)*\b", sass)),
        widest_load=_widest(_LOAD, ptx),
        widest_store=_widest(_STORE, ptx),
        tensor_cores=cores,
    )
    _resource_cache[key] = found
    return found


def occupancy(arch: Arch, res: Resources, num_warps: int) -> int:
    """Programs that fit on one SM at once (0: the kernel does not fit)."""
    regs_per_warp = -(-max(res.registers, 1) * 32 // 256) * 256  # allocated per warp, by 256
    by_registers = arch.registers_per_sm // (regs_per_warp * num_warps)
    by_shared = arch.shared_per_sm // (res.shared + 1024) if res.shared else 10**9
    by_warps = arch.max_warps_per_sm // num_warps
    return min(by_registers, by_shared, by_warps, arch.max_blocks_per_sm)


# --- the table ------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    family: str
    name: str
    launch: Callable[[], None]
    # Bytes an ideal implementation moves (one read of each input, one write of each output).
    ideal_bytes: int = 0
    # The bytes the recorded launches move, modeled from each launch's grid and block sizes
    # (the family's *_modeled_bytes below); None for a kernel the model does not know.
    modeled: Callable[[Launch], int | None] | None = None


# --- modeled bytes per launch -----------------------------------------------------------------
# Global-memory bytes that the programs of one launch load and store, as its tiling sets them:
# every program's own tile loads counted (what one program re-reads of what another read is not
# credited to the L2), a tile's padding past the tensor's edge not. A ratio to the ideal above 1
# is the price of the tiling (InfoNCE's key re-reads, kd_loss's second and third sweeps). Rows
# a row mask leaves unread are counted (the mask's content is not known statically).


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kd_loss_modeled_bytes(
    launch: Launch, rows: int, classes: int, teachers: int, size: int
) -> int | None:
    """_kd_loss_kernel: each pass over a row reads the student and the K teachers (pass A:
    statistics; B: reverse KL / JSD sums; C: loss and gradient, with the gradient write).
    PHASE 0 runs them all in one program; split rows (grid[1] > 1) run one pass per launch
    (PHASE 1, 2, 3) and exchange per-(row, split) partial states through memory."""
    if launch.kernel != "_kd_loss_kernel":
        return None
    c = launch.constexprs
    phase, kind, write_grad = c["PHASE"], c["KIND"], c["WRITE_GRAD"]
    splits = launch.grid[1]
    passes = {
        0: 1 + (kind >= 2) + (kind < 2 or write_grad),
        1: 1,
        2: 1,
        3: 1,
    }[phase]
    total = passes * rows * classes * size * (1 + teachers)
    if write_grad and phase in (0, 3):
        total += rows * classes * size
    # Every (row, split) program reads the row's label and mask; the phase that forms the
    # loss writes it, with the label's student logit for the hard CE.
    writes_loss = phase == 0 or (phase == 2 and kind >= 2) or (phase == 3 and kind < 2)
    per_program = 8 * c["HAS_LABELS"] + c["HAS_MASK"]
    per_program += (4 + size * c["HARD"]) if writes_loss else 0
    per_row = splits * per_program
    fields = 5 + 3 * c["TEACHER_COLS"]  # the partial statistics of a (row, split)
    if phase == 1:
        per_row += splits * fields * 4
    elif phase in (2, 3):
        per_row += splits * splits * fields * 4  # every split merges every split's
        per_row += splits * 2 * 4 if phase == 2 else splits * splits * 4 * (kind >= 2)
    return total + rows * per_row


def layer_mse_modeled_bytes(
    launch: Launch, rows_per_layer: int, columns: int, size: int
) -> int | None:
    """_layer_mse_kernel: one read of each student and teacher element and (backward) one
    write of its gradient; per row its mask byte, its sum (forward: written; backward: the
    incoming gradient read, 4 bytes) and, when columns are masked too (attention maps), the
    key mask's `columns` bytes again for every row; per program its layer's table entries."""
    if launch.kernel != "_layer_mse_kernel":
        return None
    c = launch.constexprs
    layers = launch.grid[1]
    backward = c["BACKWARD"]
    per_element = size * (3 if backward else 2)
    per_row = 4 + c["HAS_MASK"] + (columns if c["MASK_COLUMNS"] else 0)
    table = 8 * (4 if backward else 3)
    programs = launch.grid[0] * layers
    return layers * rows_per_layer * (columns * per_element + per_row) + programs * table


def info_nce_modeled_bytes(launch: Launch, rows: int, keys: int, dim: int, size: int) -> int | None:
    """The forward and the two backward kernels: every (BLOCK_N, BLOCK_M) similarity tile
    reads its query and key rows whole (all of D), so a program re-reads the keys (query
    kernels) or the queries (key kernel) once per tile, and the backward does so once per
    D / BLOCK_DO slice of its output; the tile product's operand slice is read once more.
    Gradients are written as fp32 u = W k and v = W^T q (the torch epilogue that makes them
    d query and d key is not a kernel of this table)."""
    known = ("_info_nce_forward_kernel", "_info_nce_grad_query_kernel", "_info_nce_grad_key_kernel")
    if launch.kernel not in known:
        return None
    c = launch.constexprs
    row_tiles, key_tiles = _cdiv(rows, c["BLOCK_N"]), _cdiv(keys, c["BLOCK_M"])
    similarity = size * dim * (rows * key_tiles + keys * row_tiles)
    if launch.kernel == "_info_nce_forward_kernel":
        # + the key scales per tile, the row scales and labels, lse and loss written
        return similarity + 4 * keys * row_tiles + rows * (4 + 8 + 8)
    slices = launch.grid[1]
    if launch.kernel == "_info_nce_grad_query_kernel":
        # per tile: row scale, label, lse (16 B / row), two key-scale loads (8 B / key)
        per_slice = similarity + 16 * rows * key_tiles + 8 * keys * row_tiles
        return slices * (per_slice + 4 * rows) + size * keys * dim * row_tiles + 4 * rows * dim
    # _info_nce_grad_key_kernel
    # per tile: row scale, label, lse, row factor (20 B / row), the key scales (4 B / key)
    per_slice = similarity + 20 * rows * key_tiles + 4 * keys * row_tiles
    return slices * (per_slice + 4 * keys) + size * rows * dim * key_tiles + 4 * keys * dim


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def kd_loss_case(
    rows: int,
    classes: int,
    teachers: int = 1,
    kind: str = "kl",
    dtype: str = "bf16",
    labels: bool = False,
    mask: bool = False,
    hard: bool = False,
    grad: str = "buffer",
    family: str = "kd_loss",
) -> Case:
    """kd_loss as the op launches it: teacher (K, N, C), grad a fresh buffer or the student."""
    torch_dtype = DTYPES[dtype]

    def launch() -> None:
        student = meta(rows, classes, dtype=torch_dtype)
        teacher = meta(teachers, rows, classes, dtype=torch_dtype)
        label_ids = meta(rows, dtype=torch.int64) if (labels or hard) else None
        row_mask = meta(rows, dtype=torch.bool) if mask else None
        gradient = {"buffer": torch.empty_like(student), "student": student, "none": None}[grad]
        kd_loss_triton._launch_kd_loss(
            student,
            teacher,
            label_ids,
            row_mask,
            2.0,
            kind,
            1.0,
            0.5 if hard else 0.0,
            0.5,
            True,
            -100,
            gradient,
        )

    size = torch.tensor([], dtype=torch_dtype).element_size()
    ideal = rows * classes * size * (1 + teachers + (grad != "none"))
    name = (
        f"N={rows} C={classes} K={teachers} {kind} {dtype}"
        + (" labels" if labels else "")
        + (" mask" if mask else "")
        + (" hard" if hard else "")
        + ("" if grad == "buffer" else f" grad={grad}")
    )
    model = partial(kd_loss_modeled_bytes, rows=rows, classes=classes, teachers=teachers, size=size)
    return Case(family, name, launch, ideal, model)


def kd_loss_cases(full: bool) -> Iterator[Case]:
    vocabularies = (2, 3, 32000, 50257, 128256, 262144)
    row_counts = (1, 8, 1024, 16384) if full else (8, 1024)
    for classes in vocabularies:
        for rows in row_counts:
            yield kd_loss_case(rows, classes)
    # N * C past 2^31 (int64 offsets), without allocating.
    yield kd_loss_case(16384, 262144, teachers=1)
    for teachers in (1, 2, 3, 4, 5, 6, 7, 8, 16) if full else (2, 3, 5):
        for rows, classes in ((1024, 2), (4096, 32000)) if full else ((1024, 2), (64, 32000)):
            yield kd_loss_case(rows, classes, teachers=teachers)
    yield kd_loss_case(4096, 262144, teachers=4)  # teacher 2 starts past 2^31 elements
    kinds = ("kl", "soft_ce", "reverse_kl", "jsd")
    for kind in kinds:
        for dtype in DTYPES if full else ("bf16", "fp32"):
            for rows, classes in ((1024, 3), (64, 128256)):
                yield kd_loss_case(rows, classes, kind=kind, dtype=dtype)
    for labels, mask, hard in ((True, False, False), (False, True, False), (True, True, True)):
        yield kd_loss_case(512, 32000, labels=labels, mask=mask, hard=hard, dtype="fp16")
        if full:
            yield kd_loss_case(1024, 2, labels=labels, mask=mask, hard=hard, kind="jsd")
    yield kd_loss_case(2048, 32000, grad="student")  # inplace_grad
    yield kd_loss_case(2048, 32000, grad="none", kind="reverse_kl")  # no gradient wanted


def fused_linear_cases(full: bool) -> Iterator[Case]:
    """fused_linear_kd_loss's row chunks: the kd_loss kernel over a chunk of fresh logits,
    gradient written over them (chunk rows as fused_linear._chunk_sizes picks on a GPU)."""
    from kd_kernels.fused_linear import _chunk_sizes

    for vocab in (32000, 128256, 262144) if full else (128256,):
        rows, _ = _chunk_sizes(None, 16384, vocab, torch.device("cuda"))
        for dtype in ("bf16", "fp32") if full else ("bf16",):
            yield kd_loss_case(
                rows, vocab, dtype=dtype, labels=True, hard=True, grad="student",
                family="fused_linear_kd",
            )  # fmt: skip


def layer_mse_case(
    layers: int,
    batch: int,
    heads: int,
    length: int,
    columns: int,
    dtype: str = "bf16",
    mask: bool = False,
    threshold: bool = False,
    backward: bool = False,
    misaligned: bool = False,
) -> Case:
    """One launch over ``layers`` maps (B, H, L, columns): attention (columns = L) or hidden
    states (H = 1, columns = D)."""
    torch_dtype = DTYPES[dtype]

    def launch() -> None:
        shape = (batch, heads, length, columns)
        if misaligned:  # a view one element past a 16-byte boundary
            student = [meta(batch * heads * length * columns + 1, dtype=torch_dtype)[1:]]
            student = [s.view(shape) for s in student * layers]
        else:
            student = [meta(*shape, dtype=torch_dtype) for _ in range(layers)]
        teacher = [meta(*shape, dtype=torch_dtype) for _ in range(layers)]
        key_mask = meta(batch, length, dtype=torch.bool) if mask else None
        rows = layers * batch * heads * length
        cut = -1e2 if threshold else None
        mask_columns = columns == length
        if backward:
            grad = [torch.empty_like(s) for s in student]
            layer_mse_triton._launch(
                student, teacher, key_mask, cut, mask_columns, None, meta(rows), grad
            )
        else:
            layer_mse_triton._launch(
                student, teacher, key_mask, cut, mask_columns, meta(rows), None, []
            )

    size = torch.tensor([], dtype=torch_dtype).element_size()
    elements = layers * batch * heads * length * columns
    ideal = elements * size * (3 if backward else 2)
    kind = "attention" if columns == length else "hidden"
    name = (
        f"{kind} layers={layers} B={batch} H={heads} L={length} cols={columns} {dtype}"
        + (" mask" if mask else "")
        + (" threshold" if threshold else "")
        + (" misaligned" if misaligned else "")
        + (" bwd" if backward else " fwd")
    )
    rows = batch * heads * length
    model = partial(layer_mse_modeled_bytes, rows_per_layer=rows, columns=columns, size=size)
    return Case("layer_mse", name, launch, ideal, model)


def layer_mse_cases(full: bool) -> Iterator[Case]:
    lengths = (50, 128, 512) if full else (50, 128)
    for backward in (False, True):
        for layers in (1, 4, 12) if full else (4,):
            for length in lengths:
                yield layer_mse_case(layers, 8, 12, length, length, threshold=True, mask=True,
                                     backward=backward)  # fmt: skip
            for dim in (312, 768, 1024) if full else (312, 768):
                yield layer_mse_case(layers, 8, 1, 128, dim, mask=True, backward=backward)
        for dtype in DTYPES if full else ("fp32",):
            yield layer_mse_case(4, 8, 12, 128, 128, dtype=dtype, backward=backward)
        yield layer_mse_case(4, 8, 1, 128, 768, misaligned=True, backward=backward)


def info_nce_case(
    rows: int, dim: int, dtype: str = "bf16", cosine: bool = True, keys: int | None = None
) -> Case:
    """Forward and the two backward kernels (symmetric = both directions of the same pair)."""
    torch_dtype = DTYPES[dtype]
    keys = keys or rows

    def launch() -> None:
        query, key = meta(rows, dim, dtype=torch_dtype), meta(keys, dim, dtype=torch_dtype)
        labels = meta(rows, dtype=torch.int64)
        temperature = meta(dtype=torch.float32)
        loss, lse = info_nce_triton.launch_forward(query, key, labels, temperature, cosine)
        info_nce_triton.launch_backward(loss, query, key, labels, temperature, lse, cosine)

    size = torch.tensor([], dtype=torch_dtype).element_size()
    ideal = (rows + keys) * dim * size * 2  # read q, k; write their gradients
    similarity = "cosine" if cosine else "dot"
    name = f"N={rows} M={keys} D={dim} {similarity} {dtype}"
    model = partial(info_nce_modeled_bytes, rows=rows, keys=keys, dim=dim, size=size)
    return Case("info_nce", name, launch, ideal, model)


def info_nce_fused_case(
    rows: int,
    dim: int,
    dtype: str = "bf16",
    cosine: bool = True,
    keys: int | None = None,
    symmetric: bool = False,
) -> Case:
    """The loss-and-gradient launch of mean / sum (launch_fused): one-way the online query
    walk and the key walk; symmetric the row and column statistics and one walk per side."""
    torch_dtype = DTYPES[dtype]
    keys = keys or rows

    def launch() -> None:
        query, key = meta(rows, dim, dtype=torch_dtype), meta(keys, dim, dtype=torch_dtype)
        labels, row_weight = meta(rows, dtype=torch.int64), meta(rows)
        temperature = meta(dtype=torch.float32)
        info_nce_triton.launch_fused(query, key, labels, temperature, cosine, row_weight, symmetric)

    size = torch.tensor([], dtype=torch_dtype).element_size()
    ideal = (rows + keys) * dim * size * 2  # read q, k; write their gradients
    similarity = "cosine" if cosine else "dot"
    mode = "fused symmetric" if symmetric else "fused"
    return Case("info_nce", f"N={rows} M={keys} D={dim} {similarity} {dtype} {mode}", launch, ideal)


def info_nce_cases(full: bool) -> Iterator[Case]:
    """Each shape three ways: reduction="none" (forward + recomputing backward), and the
    fused loss-and-gradient launch of mean / sum, one-way and symmetric."""
    shapes: list[tuple] = []
    sizes = (1024, 65536, 1048576) if full else (4096, 1048576)
    for rows in sizes:
        for dim in (64, 256, 768, 1024) if full else (768,):
            shapes.append((rows, dim, "bf16", True, None))
    for dtype in DTYPES:
        for cosine in (True, False) if full else (True,):
            shapes.append((4096, 256, dtype, cosine, None))
    shapes.append((4096, 768, "bf16", True, 3 * 4096))  # hard negatives
    shapes.append((33, 40, "fp16", True, 70))  # odd, tiny
    for rows, dim, dtype, cosine, keys in shapes:
        yield info_nce_case(rows, dim, dtype=dtype, cosine=cosine, keys=keys)
        for symmetric in (False, True):
            yield info_nce_fused_case(rows, dim, dtype, cosine, keys, symmetric)


FAMILIES = {
    "kd_loss": kd_loss_cases,
    "layer_mse": layer_mse_cases,
    "info_nce": info_nce_cases,
    "fused_linear_kd": fused_linear_cases,
}


# --- running --------------------------------------------------------------------------------


def check_case(case: Case, arch: Arch, max_spills: int | None) -> dict:
    started = time.perf_counter()
    result: dict = {"family": case.family, "case": case.name, "arch": arch.capability}
    with CompileOnly(arch) as recorder:
        try:
            case.launch()
        except Exception as error:  # a compile error surfaces here too
            result["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:400]
            result["traceback"] = traceback.format_exc(limit=-3)
    kernels = []
    problems = []
    for launch in recorder.launches:
        modeled = case.modeled(launch) if case.modeled else None
        res = resources(launch.compiled)
        programs = 1
        for extent in launch.grid:
            programs *= extent
        per_sm = occupancy(arch, res, launch.num_warps)
        kernels.append(
            {
                "kernel": launch.kernel,
                "hash": launch.compiled.hash,
                "grid": list(launch.grid),
                "num_warps": launch.num_warps,
                "constexprs": {k: str(v) for k, v in launch.constexprs.items()},
                **dataclasses.asdict(res),
                "programs": programs,
                "programs_per_sm": per_sm,
                "waves": round(programs / max(per_sm * arch.sms, 1), 2),
                "modeled_bytes": modeled,
            }
        )
        if any(e > limit for e, limit in zip(launch.grid, MAX_GRID, strict=False)):
            problems.append(f"{launch.kernel}: grid {launch.grid} exceeds CUDA's {MAX_GRID}")
        if res.shared > arch.shared_per_block:
            problems.append(
                f"{launch.kernel}: {res.shared} B shared > {arch.shared_per_block} B limit"
            )
        if per_sm == 0:
            problems.append(f"{launch.kernel}: does not fit on one SM")
        if max_spills is not None and res.spill_stores > max_spills:
            problems.append(f"{launch.kernel}: {res.spill_stores} spill stores > {max_spills}")
    if not kernels and "error" not in result:
        problems.append("the launcher compiled no kernel")
    result["kernels"] = kernels
    result["ideal_bytes"] = case.ideal_bytes
    modeled = [k["modeled_bytes"] for k in kernels]
    known = bool(modeled) and None not in modeled and "error" not in result
    result["modeled_bytes"] = sum(modeled) if known else None
    result["modeled_ratio"] = (
        round(sum(modeled) / case.ideal_bytes, 3) if known and case.ideal_bytes else None
    )
    result["problems"] = problems
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def _megabytes(count: int | None) -> str:
    return "n/a" if count is None else f"{count / 1e6:.3g}MB"


def _row(result: dict, kernel: dict | None) -> str:
    head = f"sm_{result['arch']} {result['family']:<15} {result['case']:<58}"
    if kernel is None:
        return f"{head} ERROR {result.get('error', '')}"
    k = kernel
    # Bytes: this launch's modeled bytes; the case's (all its launches) against the ideal.
    ratio = result.get("modeled_ratio")
    return (
        f"{head} {k['kernel'][:28]:<28} grid={'x'.join(map(str, k['grid'])):<12} "
        f"w={k['num_warps']} reg={k['registers']:<3} spill={k['spill_stores']:<4} "
        f"smem={k['shared'] // 1024}K ld={k['widest_load']}b st={k['widest_store']}b "
        f"tc={k['tensor_cores']:<5} prog/SM={k['programs_per_sm']} waves={k['waves']} "
        f"modeled={_megabytes(k.get('modeled_bytes'))} "
        f"case modeled/ideal={'n/a' if ratio is None else f'{ratio:.2f}'}"
        f" (ideal {_megabytes(result.get('ideal_bytes'))})"
    )


# The table of this run, (case, arch) pairs, and --max-spills: set before the pool forks, so
# a worker gets an index and finds its case here.
_WORK: list[tuple[Case, Arch]] = []
_MAX_SPILLS: int | None = None


def _check_one(index: int) -> dict:
    case, arch = _WORK[index]
    return check_case(case, arch, _MAX_SPILLS)


class _InProcess:
    """The Pool interface, in this process (--jobs 1)."""

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def imap(self, fn, items):
        return map(fn, items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the whole table")
    parser.add_argument("--only", nargs="+", choices=sorted(FAMILIES), help="kernel families")
    parser.add_argument("--arch", nargs="+", type=int, choices=sorted(ARCHS), default=[90, 80])
    parser.add_argument("--max-spills", type=int, default=None, help="fail above this many")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--quiet", action="store_true", help="print only problems and totals")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    args = parser.parse_args(argv)
    print(f"check_triton: triton {triton.__version__} ({Path(triton.__file__).parent}), "
          f"torch {torch.__version__}")  # fmt: skip
    started = time.perf_counter()
    global _WORK, _MAX_SPILLS
    _WORK = [
        (case, ARCHS[capability])
        for capability in args.arch
        for family in args.only or FAMILIES
        for case in FAMILIES[family](args.full)
    ]
    _MAX_SPILLS = args.max_spills
    results = []
    # Compiles are single-threaded (Triton's passes, ptxas): a forked pool runs them in
    # parallel; the stand-in driver and every tensor are per process.
    context = multiprocessing.get_context("fork")
    with context.Pool(args.jobs) if args.jobs > 1 else _InProcess() as pool:
        for result in pool.imap(_check_one, range(len(_WORK))):
            results.append(result)
            bad = "error" in result or result["problems"]
            if not args.quiet or bad:
                for kernel in result["kernels"] or [None]:
                    print(_row(result, kernel), flush=True)
                for problem in result["problems"]:
                    print(f"    PROBLEM {problem}", flush=True)
    errors = sum("error" in r for r in results)
    problems = sum(len(r["problems"]) for r in results)
    compiled = len({k["hash"] for r in results for k in r["kernels"]})
    worst = {}
    for r in results:
        for k in r["kernels"]:
            key = (r["arch"], r["family"], k["kernel"])
            best = worst.get(key, (0, 0, 1e9))
            worst[key] = (
                max(best[0], k["registers"]),
                max(best[1], k["spill_stores"]),
                min(best[2], k["widest_load"]),
            )
    print("\nper kernel family (max registers, max spill stores, narrowest widest-load):")
    for (capability, family, kernel), (regs, spills, load) in sorted(worst.items()):
        print(f"  sm_{capability} {family:<15} {kernel:<32} reg<={regs} spills<={spills} "
              f"ld>={load}b")  # fmt: skip
    print(
        f"\ncheck_triton: {len(results)} cases, {compiled} kernels compiled, "
        f"{errors} compile/launcher errors, {problems} limit problems, "
        f"{time.perf_counter() - started:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "results": results}))
    return 1 if errors or problems else 0


if __name__ == "__main__":
    sys.exit(main())
