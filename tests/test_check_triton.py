"""scripts/check_triton.py's modeled bytes per launch, against hand-computed values.

The models read a recorded launch (kernel, grid, constexprs) and the case's shape; here the
launches are written by hand, so no compile is needed, except in the last test, which runs one
case through check_case natively in a subprocess (the interpreter is on in this process).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ct():
    """scripts/check_triton.py as a module (it refuses to import under TRITON_INTERPRET=1,
    which only guards its compiles; the models compile nothing)."""
    # The kernel modules are imported first, under this process's interpreter: importing them
    # with TRITON_INTERPRET=0 below would leave natively jitted kernels in sys.modules, and
    # every later interpreter test of them would fail with "0 active drivers".
    import kd_kernels.triton.info_nce
    import kd_kernels.triton.kd_loss
    import kd_kernels.triton.layer_mse  # noqa: F401

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        spec = importlib.util.spec_from_file_location(
            "check_triton_models", REPO / "scripts" / "check_triton.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


def launch(ct, kernel, grid, **constexprs):
    return ct.Launch(kernel, tuple(grid), 4, constexprs, None)


def test_layer_mse_forward_model(ct):
    # 2 layers of (B=2, H=1, L=10) rows x 312 columns, bf16, row mask: per row 312 x 2 x 2
    # bytes read + 4 (its sum) + 1 (its mask byte); per program 3 table entries of 8 bytes.
    run = launch(ct, "_layer_mse_kernel", (3, 2), BACKWARD=False, HAS_MASK=True, MASK_COLUMNS=False)
    assert ct.layer_mse_modeled_bytes(run, 20, 312, 2) == 2 * 20 * 1253 + 6 * 24


def test_layer_mse_backward_model_counts_column_mask_per_row(ct):
    # attention maps L = C = 50, fp32, one layer of 4 x 2 x 50 rows: 3 x 4 bytes per element
    # (student, teacher read, gradient written), per row 4 (incoming gradient) + 1 + 50 (the
    # key mask again); 4 table entries per program.
    run = launch(ct, "_layer_mse_kernel", (7, 1), BACKWARD=True, HAS_MASK=True, MASK_COLUMNS=True)
    assert ct.layer_mse_modeled_bytes(run, 400, 50, 4) == 400 * (50 * 12 + 55) + 7 * 32


def test_info_nce_forward_model(ct):
    # N = 100, M = 200, D = 64, bf16, 64 x 64 tiles: 2 query blocks, 4 key tiles. Queries are
    # read once per key tile (4 x 100 rows), keys once per query block (2 x 200 rows), 128 B a
    # row; key scales once per query block; row scale, label, lse, loss 20 B a row.
    run = launch(ct, "_info_nce_forward_kernel", (2,), BLOCK_N=64, BLOCK_M=64, BLOCK_D=64)
    assert ct.info_nce_modeled_bytes(run, 100, 200, 64, 2) == 128 * 800 + 4 * 400 + 100 * 20


def test_info_nce_backward_models(ct):
    # The query kernel over 2 output slices: each slice recomputes the similarities (as in the
    # forward: 102,400 B), reads 16 B per row per key tile, 8 B per key per query block and the
    # 100 row factors; the product's key slices sum to one more read of the keys per query
    # block (2 x 200 x 64 x 2 B); u is written in fp32.
    slices = 2
    query = launch(
        ct, "_info_nce_grad_query_kernel", (2, slices), BLOCK_N=64, BLOCK_M=64, BLOCK_D=64
    )
    per_slice = 102400 + 16 * 100 * 4 + 8 * 200 * 2 + 4 * 100
    expected = slices * per_slice + 2 * 200 * 64 * 2 + 4 * 100 * 64
    assert ct.info_nce_modeled_bytes(query, 100, 200, 64, 2) == expected
    key = launch(ct, "_info_nce_grad_key_kernel", (4, slices), BLOCK_N=64, BLOCK_M=64, BLOCK_D=64)
    per_slice = 102400 + 20 * 100 * 4 + 4 * 200 * 2 + 4 * 200
    expected = slices * per_slice + 4 * 100 * 64 * 2 + 4 * 200 * 64
    assert ct.info_nce_modeled_bytes(key, 100, 200, 64, 2) == expected
    assert (
        ct.info_nce_modeled_bytes(launch(ct, "_unknown", (1,), BLOCK_N=16, BLOCK_M=16), 1, 1, 1, 2)
        is None
    )


KD_FLAGS = dict(HAS_LABELS=False, HAS_MASK=False, HARD=False, TEACHER_COLS=1)


@pytest.mark.parametrize(
    "kind, write_grad, passes", [(0, True, 2), (0, False, 2), (2, True, 3), (2, False, 2)]
)
def test_kd_loss_whole_row_model(ct, kind, write_grad, passes):
    # 8 rows x 1000 classes, one teacher, bf16, one program per row block: each pass reads
    # student and teacher (8 x 1000 x 2 x 2 B); KL / soft CE: statistics, then loss + gradient;
    # reverse KL / JSD add the row-sum pass; the loss (4 B a row) and the gradient written.
    run = launch(
        ct, "_kd_loss_kernel", (1, 1), PHASE=0, KIND=kind, WRITE_GRAD=write_grad, **KD_FLAGS
    )
    expected = passes * 32000 + 16000 * write_grad + 8 * 4
    assert ct.kd_loss_modeled_bytes(run, 8, 1000, 1, 2) == expected


def test_kd_loss_split_statistics_model(ct):
    # 2 rows split in 4, one teacher, fp32, KL with gradient: phase 1 reads the inputs once and
    # writes 4 partial states of 8 fields per row; phase 3 merges all 4 states in each of the 4
    # programs of a row, reads the inputs again, writes the gradient and the 4 partial losses.
    phase1 = launch(ct, "_kd_loss_kernel", (2, 4), PHASE=1, KIND=0, WRITE_GRAD=True, **KD_FLAGS)
    phase3 = launch(ct, "_kd_loss_kernel", (2, 4), PHASE=3, KIND=0, WRITE_GRAD=True, **KD_FLAGS)
    inputs = 2 * 20000 * 4 * 2
    assert ct.kd_loss_modeled_bytes(phase1, 2, 20000, 1, 4) == inputs + 2 * 4 * 8 * 4
    expected = inputs + 2 * 20000 * 4 + 2 * (4 * 4 + 4 * 4 * 8 * 4)
    assert ct.kd_loss_modeled_bytes(phase3, 2, 20000, 1, 4) == expected


NATIVE_SCRIPT = """
import json, sys
sys.path.insert(0, {scripts!r})
import check_triton as ct
case = ct.layer_mse_case(2, 2, 1, 16, 312, mask=True)
result = ct.check_case(case, ct.ARCHS[90], None)
print(json.dumps(result))
"""


def test_check_case_reports_modeled_bytes():
    """One hidden-state case compiled natively: the result carries its launch's modeled bytes,
    the case total against the ideal, and (D = 312 bf16: 624-byte rows) 128-bit loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = NATIVE_SCRIPT.format(scripts=str(REPO / "scripts"))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in result, result.get("error")
    (kernel,) = result["kernels"]
    rows = 2 * 2 * 16
    programs = kernel["grid"][0] * kernel["grid"][1]
    assert kernel["modeled_bytes"] == rows * (312 * 4 + 5) + programs * 24
    assert result["ideal_bytes"] == rows * 312 * 4
    assert result["modeled_ratio"] == round(kernel["modeled_bytes"] / (rows * 312 * 4), 3)
    assert kernel["widest_load"] == 128
