"""kd_loss on a GPU: the cuda and native triton backends against the reference.

Run on a GPU machine with ``python -m pytest -m cuda``; deselected by default (pyproject.toml).
"""

import pytest
import torch
from conftest import DTYPES, gpu_backends
from kd_loss_checks import assert_matches_reference, logits

import kd_kernels as kdk
from kd_kernels import reference

pytestmark = pytest.mark.cuda
BACKENDS = gpu_backends() if torch.cuda.is_available() else ["cuda", "triton"]

SHAPES = [(1, 1), (3, 5), (2, 7, 33), (4096, 3), (33, 50257), (3, 262144), (1000, 1000)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", reference.KD_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gpu_matches_reference(backend, dtype, kind, shape):
    student = logits(*shape, dtype=dtype, device="cuda")
    teacher = logits(*shape, dtype=dtype, device="cuda")
    assert_matches_reference(backend, student, teacher, temperature=2.0, kind=kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", reference.KD_KINDS)
@pytest.mark.parametrize("reduction", reference.KD_REDUCTIONS)
@pytest.mark.parametrize("classes", [2, 3000])
def test_gpu_options(backend, kind, reduction, classes):
    rows = 257
    student = logits(2 * classes, rows, device="cuda").t()[:, ::2]  # non-contiguous
    teacher = logits(3, rows, classes, device="cuda")  # ensemble
    teacher[0, :, : classes // 2] = float("-inf")
    labels = torch.randint(0, classes, (rows,), device="cuda")
    labels[::5] = -100
    mask = torch.rand(rows, device="cuda") > 0.3
    assert_matches_reference(
        backend, student, teacher, temperature=3.0, kind=kind, reduction=reduction,
        labels=labels, mask=mask, hard_weight=0.4, soft_weight=0.6, beta=0.3,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_bad_rows_and_inplace_grad(backend):
    student = logits(64, 40000, dtype=torch.bfloat16, device="cuda")
    teacher = logits(64, 40000, dtype=torch.bfloat16, device="cuda")
    student[3, 7] = float("nan")
    teacher[5, 9] = float("inf")
    leaf = student.clone().requires_grad_(True)
    logits_view = leaf * 1
    loss = kdk.kd_loss(logits_view, teacher, reduction="none", inplace_grad=True, backend=backend)
    assert torch.isnan(loss[[3, 5]]).all()
    finite = [i for i in range(64) if i not in (3, 5)]
    assert torch.isfinite(loss[finite]).all()
    loss[finite].sum().backward()
    torch.cuda.synchronize()
    assert torch.isfinite(leaf.grad[finite]).all()
