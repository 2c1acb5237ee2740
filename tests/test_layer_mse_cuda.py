"""attention/hidden MSE on a GPU: the cuda and native triton backends against the reference.

Run on a GPU machine with ``python -m pytest -m cuda``; deselected by default (pyproject.toml).
"""

import pytest
import torch
from conftest import DTYPES, gpu_backends
from layer_mse_checks import assert_layers_match_reference, bert_scores, padding_mask

pytestmark = pytest.mark.cuda
BACKENDS = gpu_backends() if torch.cuda.is_available() else ["cuda", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [-100.0, None])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    ("shape", "layers"),
    [((1, 1, 1), 1), ((2, 3, 33), 4), ((2, 3, 33), 40), ((8, 12, 128), 4), ((2, 4, 513), 1)],
    ids=str,
)  # 40 layers: more than one CUDA launch table holds
def test_gpu_attention_matches_reference(backend, dtype, threshold, masked, shape, layers):
    mask = padding_mask(shape[0], shape[-1], "cuda") if masked else None
    students = [bert_scores(*shape, mask, dtype, "cuda") for _ in range(layers)]
    teachers = [bert_scores(*shape, mask, dtype, "cuda") for _ in range(layers)]
    assert_layers_match_reference(
        "attention",
        backend,
        students,
        teachers,
        attention_mask=mask,
        threshold=threshold,
        layer_reduction="none",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 17, 65), (8, 128, 768), (2, 9, 1030)], ids=str)
def test_gpu_hidden_matches_reference(backend, dtype, masked, shape):
    mask = padding_mask(shape[0], shape[1], "cuda") if masked else None
    students = [torch.randn(shape, device="cuda").to(dtype) for _ in range(5)]
    teachers = [torch.randn(shape, device="cuda").to(dtype) for _ in range(5)]
    assert_layers_match_reference(
        "hidden", backend, students, teachers, attention_mask=mask, layer_reduction="none"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_non_contiguous_and_unaligned(backend):
    full = bert_scores(2, 6, 9, device="cuda")
    unaligned = bert_scores(2, 3, 10, device="cuda")[..., 1:, 1:]  # rows start off 16 bytes
    broadcast = bert_scores(2, 1, 9, device="cuda").expand(2, 3, 9, 9)
    mask = padding_mask(2, 9, "cuda")
    assert_layers_match_reference(
        "attention",
        backend,
        [full[:, ::2], unaligned, full[:, 1::2].transpose(-1, -2)],
        [broadcast, full[:, :3], unaligned],
        attention_mask=mask,
        layer_reduction="none",
    )
