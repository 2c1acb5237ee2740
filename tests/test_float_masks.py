"""Masks as users hold them (issue 17): kd_loss's mask, attention_mse_loss's and
hidden_mse_loss's attention_mask accept float 0/1 (Hugging Face, TextBrewer) and integer masks
as well as bool ones; every non-zero value counts."""

import pytest
import torch
from conftest import cpu_backends, device_for
from kd_loss_checks import logits

import kd_kernels as kdk

BACKENDS = ["torch", *cpu_backends()]
MASK_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32]


def _as(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return mask.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "none"])
def test_kd_loss_float_and_integer_masks_equal_the_bool_mask(backend, dtype, reduction):
    device = device_for(backend)
    student = logits(2, 5, 9, device=device)
    teacher = logits(2, 5, 9, device=device)
    student[0, 1] = float("nan")  # a masked row may hold anything
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]], dtype=torch.bool, device=device)
    results = []
    for m in (mask, _as(mask, dtype)):
        s = student.clone().requires_grad_()
        loss = kdk.kd_loss(
            s, teacher, mask=m, temperature=2.0, reduction=reduction, backend=backend
        )
        (grad,) = torch.autograd.grad(loss.sum(), s)
        results.append((loss, grad))
    (loss, grad), (float_loss, float_grad) = results
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(float_loss, loss, rtol=0, atol=0)
    torch.testing.assert_close(float_grad, grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_loss_counts_every_non_zero_mask_value(backend):
    """0.5 or 2.0 count as 1 (the mask selects rows, it does not weight them)."""
    device = device_for(backend)
    student, teacher = logits(4, 6, device=device), logits(4, 6, device=device)
    weights = torch.tensor([0.5, 0.0, 2.0, 1.0], device=device)
    loss = kdk.kd_loss(student, teacher, mask=weights, backend=backend)
    expected = kdk.kd_loss(student, teacher, mask=weights != 0, backend=backend)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=str)
def test_layer_mse_float_and_integer_masks_equal_the_bool_mask(backend, dtype):
    device = device_for(backend)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool, device=device)
    attn = [torch.randn(2, 3, 5, 5, device=device) for _ in range(2)]
    hidden = [torch.randn(2, 5, 4, device=device) for _ in range(2)]
    for loss_fn, student, teacher in (
        (kdk.attention_mse_loss, attn[0], attn[1]),
        (kdk.hidden_mse_loss, hidden[0], hidden[1]),
    ):
        results = []
        for m in (mask, _as(mask, dtype)):
            s = student.clone().requires_grad_()
            loss = loss_fn(s, teacher, attention_mask=m, backend=backend)
            (grad,) = torch.autograd.grad(loss, s)
            results.append((loss, grad))
        (loss, grad), (float_loss, float_grad) = results
        assert loss > 0
        torch.testing.assert_close(float_loss, loss, rtol=0, atol=0)
        torch.testing.assert_close(float_grad, grad, rtol=0, atol=0)


def test_complex_masks_are_refused():
    with pytest.raises(TypeError, match="mask"):
        kdk.kd_loss(logits(2, 3), logits(2, 3), mask=torch.ones(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="attention_mask"):
        kdk.hidden_mse_loss(
            torch.randn(1, 2, 3), torch.randn(1, 2, 3), attention_mask=torch.ones(1, 2) * 1j
        )
