"""The Triton layer MSE on rows that are whole 16-byte vectors but not multiples of 16
elements (D = 24 or 312 in fp16 / bf16: 48 and 624 bytes a row; D = 4 k in fp32).

The launcher then sets ROW_ALIGN (elements per 16-byte vector) and the kernel rebuilds C as a
multiple of it, so that the GPU compiler emits 128-bit loads (scripts/check_triton.py and
tests/test_check_triton.py show the width); here the same kernel runs under the interpreter
against float64, forward and backward, masked, two layers in one launch.
"""

import pytest
import torch
from conftest import cpu_backends, device_for
from layer_mse_checks import padding_mask

import kd_kernels as kdk

pytestmark = pytest.mark.skipif("triton" not in cpu_backends(), reason="no triton backend")

# Relative-norm tolerances against float64: the loss accumulates in fp32; the gradient is
# rounded once to the input's dtype (bf16: 2^-9 per element).
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 2e-3), torch.bfloat16: (1e-4, 8e-3)}


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    return ((value.double() - expected).norm() / expected.norm()).item()


class RecordingKernel:
    """Stands in for the kernel: records each launch's ROW_ALIGN, then launches for real."""

    def __init__(self, kernel):
        self.kernel, self.row_aligns = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.row_aligns.append(kwargs["ROW_ALIGN"])
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [24, 312])
def test_hidden_rows_of_whole_vectors_match_float64(monkeypatch, dtype, dim):
    from kd_kernels.triton import layer_mse as triton_layer_mse

    recorder = RecordingKernel(triton_layer_mse._layer_mse_kernel)
    monkeypatch.setattr(triton_layer_mse, "_layer_mse_kernel", recorder)
    device = device_for("triton")
    torch.manual_seed(dim)
    batch, length = 3, 5
    mask = padding_mask(batch, length, device)
    students = [torch.randn(batch, length, dim).to(device, dtype) for _ in range(2)]
    teachers = [torch.randn(batch, length, dim).to(device, dtype) for _ in range(2)]
    leaves = [s.clone().requires_grad_(True) for s in students]
    loss = kdk.hidden_mse_loss(
        leaves, teachers, attention_mask=mask, layer_reduction="none", backend="triton"
    )
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(0)).to(device)
    grads = torch.autograd.grad((loss * weights).sum(), leaves)

    exact = [s.double().requires_grad_(True) for s in students]
    expected = kdk.hidden_mse_loss(
        exact,
        [t.double() for t in teachers],
        attention_mask=mask,
        layer_reduction="none",
        backend="torch",
    )
    expected_grads = torch.autograd.grad((expected * weights.double()).sum(), exact)

    loss_tolerance, grad_tolerance = TOLERANCE[dtype]
    assert relative_error(loss, expected.detach()) < loss_tolerance
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert grad.dtype == dtype
        assert relative_error(grad, expected_grad) < grad_tolerance
    vector = 16 // students[0].element_size()
    assert recorder.row_aligns == [vector, vector]  # forward and backward, one launch each
