"""info_nce_loss on a GPU: the cuda and native triton backends against the reference.

Run on a GPU machine with ``python -m pytest -m cuda``; deselected by default (pyproject.toml).
"""

import pytest
import torch
from conftest import DTYPES, gpu_backends
from info_nce_checks import (
    assert_matches_reference,
    assert_shape_matches_reference,
    confident_errors,
    embeddings,
)

from kd_kernels import reference

pytestmark = pytest.mark.cuda
BACKENDS = gpu_backends() if torch.cuda.is_available() else ["cuda", "triton"]
SHAPES = [(1, 1, 1), (7, 12, 257), (130, 130, 64), (1000, 3000, 768), (4096, 4096, 256)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("similarity", reference.INFO_NCE_SIMILARITIES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
# "mean" takes the cuda backend's loss-and-gradient op (info_nce_fused); "none" the recompute.
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gpu_matches_reference(backend, dtype, similarity, symmetric, shape, reduction):
    assert_shape_matches_reference(
        backend, shape, dtype, "cuda", similarity, symmetric=symmetric, reduction=reduction
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_labels_and_non_contiguous(backend):
    query = embeddings(96, 100, device="cuda").t()  # (100, 96) column-major
    key = embeddings(50, 192, device="cuda")[:, ::2]
    labels = torch.randint(0, 50, (100,), device="cuda")
    assert_matches_reference(backend, query, key, labels=labels, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
def test_gpu_confident_rows_keep_their_gradient(backend, dtype, symmetric):
    """P_iy ~ 0.99 with real half-precision tiles (tests/test_info_nce_triton_fused.py): the
    outputs' own rounding costs ~2e-4 (fp16) / ~1.7e-3 (bf16)."""
    errors = confident_errors(backend, dtype, symmetric, "cuda")
    assert max(errors) < {torch.float16: 1e-3, torch.bfloat16: 4e-3}[dtype], errors
