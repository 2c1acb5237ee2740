"""Native (sm_90) compiles of the Triton kernels as their launchers configure them.

The interpreter accepts what the GPU compiler rejects (a non-power-of-two tl.arange) and
cannot show integer widths, so these tests compile for real, with Triton's own ptxas, through
scripts/check_triton.py in a subprocess (the interpreter is switched on in this process).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from kd_kernels.triton import kd_loss as kd_loss_triton

REPO = Path(__file__).resolve().parents[1]
VOCABULARIES = (2, 3, 5, 32000, 50257, 128256, 262144)
ROW_COUNTS = (1, 7, 8, 1024, 16384)


def _is_power_of_2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@pytest.mark.parametrize("interpreting", ["0", "1"])
@pytest.mark.parametrize("teachers", range(1, 17))
def test_kd_loss_tiles_are_powers_of_two(monkeypatch, interpreting, teachers):
    """K teachers share a tile: K = 3 once gave BLOCK_C = 1365, which does not compile."""
    monkeypatch.setenv("TRITON_INTERPRET", interpreting)
    for classes in VOCABULARIES:
        for rows in ROW_COUNTS:
            block_n, block_c, num_warps = kd_loss_triton._launch_config(rows, classes, teachers)
            assert _is_power_of_2(block_n) and _is_power_of_2(block_c), (rows, classes)
            assert block_c <= triton.next_power_of_2(classes)
            assert num_warps in (1, 2, 4, 8)


NATIVE_SCRIPT = """
import json, sys
sys.path.insert(0, {scripts!r})
import check_triton as ct
out = {{}}
for teachers in (3, 5, 7):
    for rows, classes in ((1024, 2), (64, 32000)):
        result = ct.check_case(ct.kd_loss_case(rows, classes, teachers), ct.ARCHS[90], None)
        out[f"K={{teachers}} N={{rows}} C={{classes}}"] = result.get("error", "ok")
# K = 4, N = 4096, C = 262144: teacher 2 starts 2^31 elements past the base.
with ct.CompileOnly(ct.ARCHS[90]) as recorder:
    ct.kd_loss_case(4096, 262144, teachers=4).launch()
out["ttir"] = recorder.launches[0].compiled.asm["ttir"]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def native_kd_loss():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = NATIVE_SCRIPT.format(scripts=str(REPO / "scripts"))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kd_loss_ensembles_compile_natively(native_kd_loss):
    compiled = {k: v for k, v in native_kd_loss.items() if k != "ttir"}
    assert len(compiled) == 6
    assert compiled == dict.fromkeys(compiled, "ok")


def test_kd_loss_ensemble_offset_is_int64(native_kd_loss):
    """Triton types a stride that fits in i32 as i32: k * stride_tk must be formed in i64."""
    ttir = native_kd_loss["ttir"]
    assert "arith.extsi %stride_tk : i32 to i64" in ttir
    i32_products = [
        line
        for line in ttir.splitlines()
        if "arith.muli" in line and re.search(r"%stride_tk(?!\w)", line)
    ]
    assert i32_products == [], i32_products


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_info_nce_fp32_precision_follows_torch(allow_tf32):
    """fp32 InfoNCE is exact (ieee) unless the user allows TF32 matmuls, as torch does; half
    inputs always use the tensor cores as they are."""
    import torch

    from kd_kernels.triton import info_nce as info_nce_triton

    before = torch.backends.cuda.matmul.allow_tf32  # a property of torch's cuBLAS module
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        fp32 = info_nce_triton._matmul_precision(torch.float32)
        bf16 = info_nce_triton._matmul_precision(torch.bfloat16)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert fp32 == ("tf32" if allow_tf32 else "ieee")
    assert bf16 == "tf32"
