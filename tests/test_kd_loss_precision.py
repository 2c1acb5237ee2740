"""kd_loss when the student is close to the teacher (issue 17): every backend and the fused
head keep the loss within 1e-3 and the gradient within 1e-4 (relative) of float64 computed
from the same float32 inputs, and give exactly 0 where student and teacher agree."""

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends, device_for

import kd_kernels as kdk
from benchmarks.kd_precision import composed_loss
from kd_kernels import reference

KINDS = reference.KD_KINDS
BACKENDS = ["torch", *cpu_backends()]
LOSS_RTOL, GRAD_RTOL = 1e-3, 1e-4


def close_pair(rows, classes, teachers, noise, generator):
    """float32 student logits ~ 4 N(0, 1) and teacher(s) = student + noise N(0, 1)."""
    student = 4 * torch.randn(rows, classes, generator=generator)
    teacher = student + noise * torch.randn(teachers, rows, classes, generator=generator)
    return student, teacher[0] if teachers == 1 else teacher


def relative_errors(loss, grad, student, teacher, t, kind):
    s64 = student.double().requires_grad_()
    loss64 = composed_loss(s64, teacher.reshape(-1, *student.shape), t, kind)
    (grad64,) = torch.autograd.grad(loss64, s64)
    loss_error = abs(loss.item() - loss64.item()) / abs(loss64.item())
    grad_error = (grad.double().cpu() - grad64).abs().max() / grad64.abs().max()
    return loss_error, grad_error.item()


PRECISION_TABLE = [
    pytest.param(kind, t, classes, teachers, id=f"{kind}-t{t:g}-C{classes}-K{teachers}")
    for kind in KINDS
    for t in (1.0, 4.0, 20.0)
    for classes in (2, 333)
    for teachers in ((1, 3) if kind in ("kl", "jsd") else (1,))
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("kind", "t", "classes", "teachers"), PRECISION_TABLE)
def test_loss_and_gradient_keep_their_digits_at_noise_1e_3(backend, kind, t, classes, teachers):
    generator = torch.Generator().manual_seed(classes + teachers)
    student, teacher = close_pair(3, classes, teachers, 1e-3, generator)
    device = device_for(backend)
    s = student.to(device).requires_grad_()
    loss = kdk.kd_loss(s, teacher.to(device), temperature=t, kind=kind, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    loss_error, grad_error = relative_errors(loss, grad, student, teacher, t, kind)
    assert loss_error < LOSS_RTOL and grad_error < GRAD_RTOL, (loss_error, grad_error)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("kind", KINDS)
def test_long_rows_keep_their_digits(backend, kind):
    """C = 128000 (an LLM vocabulary) at t = 4: the row sums that cancel are the longest."""
    student, teacher = close_pair(2, 128000, 1, 1e-3, torch.Generator().manual_seed(5))
    s = student.clone().requires_grad_()
    loss = kdk.kd_loss(s, teacher, temperature=4.0, kind=kind, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    loss_error, grad_error = relative_errors(loss, grad, student, teacher, 4.0, kind)
    assert loss_error < LOSS_RTOL and grad_error < GRAD_RTOL, (loss_error, grad_error)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("teachers", [1, 2])
def test_identical_rows_and_one_class_give_exactly_zero(backend, kind, teachers):
    device = device_for(backend)
    student = (4 * torch.randn(5, 77)).to(device).requires_grad_()
    teacher = student.detach().expand(teachers, -1, -1).contiguous()
    teacher = teacher[0] if teachers == 1 else teacher
    loss = kdk.kd_loss(
        student, teacher, temperature=3.0, kind=kind, reduction="none", backend=backend
    )
    (grad,) = torch.autograd.grad(loss.sum(), student)
    if kind == "soft_ce":  # = KL + H(p_T): the entropy, not 0
        log_p = torch.log_softmax(student.detach() / 3, -1)
        entropy = -(log_p.exp() * log_p).sum(-1) * 9
        torch.testing.assert_close(loss, entropy, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(loss, torch.zeros_like(loss))
        assert torch.equal(grad.abs(), torch.zeros_like(grad))
    one = torch.randn(4, 1, device=device).requires_grad_()
    other = torch.randn(teachers, 4, 1, device=device)
    loss = kdk.kd_loss(
        one,
        other[0] if teachers == 1 else other,
        temperature=2.0,
        kind=kind,
        reduction="none",
        backend=backend,
    )
    (grad,) = torch.autograd.grad(loss.sum(), one)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad.abs(), torch.zeros_like(grad))


@pytest.mark.parametrize("chunk_size", [4, (4, 100)], ids=["rows", "vocab"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_head_keeps_its_digits(kind, chunk_size):
    """fused_linear_kd_loss on a head whose float32 logits are exact (dyadic entries), so the
    gradient of the hidden states is compared with float64 G @ W."""
    generator = torch.Generator().manual_seed(3)
    h = torch.randint(-8, 9, (4, 32), generator=generator).float() / 8
    w = torch.randint(-24, 25, (333, 32), generator=generator).float() / 16
    student = h @ w.T
    teacher = student + 1e-3 * torch.randn(4, 333, generator=generator)
    hh = h.clone().requires_grad_()
    loss = kdk.fused_linear_kd_loss(
        hh, w, teacher, temperature=4.0, kind=kind, chunk_size=chunk_size, backend="cpu"
    )
    (grad_h,) = torch.autograd.grad(loss, hh)
    s64 = student.double().requires_grad_()
    loss64 = composed_loss(s64, teacher[None], 4.0, kind)
    (grad64,) = torch.autograd.grad(loss64, s64)
    grad64 = grad64 @ w.double()
    assert abs(loss.item() - loss64.item()) / abs(loss64.item()) < LOSS_RTOL
    assert ((grad_h.double() - grad64).abs().max() / grad64.abs().max()).item() < GRAD_RTOL


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("noise", [1e-2, 0.3], ids=["series", "closed_form"])
@pytest.mark.parametrize("teachers", [1, 2])
def test_log_ratio_forms_pass_gradcheck_in_fp64(kind, noise, teachers):
    """Near inputs, so that the log-ratio branches (series below |u| = 0.1, closed forms up
    to 1) are the ones differentiated."""
    student = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    teacher = student.detach() + noise * torch.randn(teachers, 3, 7, dtype=torch.float64)

    def loss(s):
        return kdk.kd_loss(s, teacher, kind=kind, temperature=1.5, backend="torch")

    assert torch.autograd.gradcheck(loss, (student,), eps=1e-6, atol=1e-8)


def test_reference_matches_the_plain_forms_when_far_apart():
    """Far apart (|u| > 1 everywhere possible) the log-probability forms are used: the
    reference still equals F.kl_div."""
    student, teacher = 5 * torch.randn(4, 9, dtype=torch.float64), 5 * torch.randn(4, 9).double()
    expected = F.kl_div(
        F.log_softmax(student, -1),
        F.log_softmax(teacher, -1),
        log_target=True,
        reduction="batchmean",
    )
    torch.testing.assert_close(reference.kd_loss(student, teacher), expected)
