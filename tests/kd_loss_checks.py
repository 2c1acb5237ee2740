"""Parity helpers shared by the CPU and GPU kd_loss test tables."""

import torch
from conftest import GRAD_TOLERANCE, LOSS_TOLERANCE

import kd_kernels as kdk


def loss_and_grad(backend, student, teacher, grad_seed=1, **options):
    """Loss and d(loss . w)/d student for a fixed random weighting w of the output."""
    student = student.detach().clone().requires_grad_(True)
    loss = kdk.kd_loss(student, teacher, backend=backend, **options)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(grad_seed))
    (grad,) = torch.autograd.grad((loss * weights.to(loss.device)).sum(), student)
    return loss, grad


def assert_matches_reference(backend, student, teacher, **options):
    loss, grad = loss_and_grad(backend, student, teacher, **options)
    ref_loss, ref_grad = loss_and_grad("torch", student, teacher, **options)
    assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    assert grad.dtype == student.dtype
    loss_tol, grad_tol = dict(LOSS_TOLERANCE[student.dtype]), dict(GRAD_TOLERANCE[student.dtype])
    # fp32 rounds z = logits / t to ~1 ulp of |z|: for logits of 1e4 that alone is ~1e-3, an
    # error every fp32 implementation has. Widen atol by that inherent error.
    t = options.get("temperature", 1.0)
    finite = torch.cat([student.flatten(), teacher.flatten()]).float()
    max_abs = finite[finite.isfinite()].abs().max().item() if finite.numel() else 0.0
    z_error = 4 * torch.finfo(torch.float32).eps * max_abs / t
    loss_tol["atol"] += 4 * z_error * max(t * t, 1.0)
    grad_tol["atol"] += 4 * z_error * max(t, 1.0)
    torch.testing.assert_close(loss, ref_loss, **loss_tol)
    torch.testing.assert_close(grad.float(), ref_grad.float(), **grad_tol)
    return loss, grad


def logits(*shape, dtype=torch.float32, scale=3.0, device="cpu"):
    return (torch.randn(*shape) * scale).to(device=device, dtype=dtype)
