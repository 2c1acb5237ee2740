"""kd_loss ops: torch.library registration (opcheck) and torch.compile(fullgraph=True)."""

import sys

import pytest
import torch
from conftest import cpu_backends, device_for

import kd_kernels as kdk


def op_for(backend: str, out: bool = False):
    if backend == "triton":
        from kd_kernels.triton import kd_loss as triton_kd_loss

        return (
            triton_kd_loss.kd_loss_forward_out_triton
            if out
            else triton_kd_loss.kd_loss_forward_triton
        )
    return torch.ops.kd_kernels.kd_loss_forward_out if out else torch.ops.kd_kernels.kd_loss_forward


OP_CASES = [
    ("kl", None, None, 0.0),
    ("jsd", torch.tensor([1, -100, 3, 0, 2]), None, 0.5),
    ("reverse_kl", None, torch.tensor([True, False, True, True, False]), 0.0),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize(
    ("kind", "labels", "mask", "hard_weight"), OP_CASES, ids=[c[0] for c in OP_CASES]
)
def test_opcheck(backend, kind, labels, mask, hard_weight):
    device = device_for(backend)
    student = torch.randn(5, 11, device=device, requires_grad=True)
    teacher = torch.randn(2, 5, 11, device=device)
    labels = None if labels is None else labels.to(device)
    mask = None if mask is None else mask.to(device)
    options = (2.0, kind, 1.0, hard_weight, 0.5, True, -100)
    torch.library.opcheck(op_for(backend), (student, teacher, labels, mask, *options, True))
    grad = torch.empty_like(student).detach()
    torch.library.opcheck(
        op_for(backend, out=True), (student.detach(), teacher, labels, mask, *options, grad)
    )


@pytest.mark.parametrize("backend", cpu_backends())
def test_torch_compile_fullgraph_traces_through_kd_loss(backend):
    device = device_for(backend)
    torch._dynamo.reset()

    def step(student, teacher, labels):
        return kdk.kd_loss(
            student, teacher, temperature=2.0, labels=labels, hard_weight=0.3, backend=backend
        )

    compiled = torch.compile(step, fullgraph=True)
    student = torch.randn(6, 10, device=device, requires_grad=True)
    teacher = torch.randn(6, 10, device=device)
    labels = torch.tensor([0, 3, -100, 9, 1, 2], device=device)
    loss = compiled(student, teacher, labels)
    (grad,) = torch.autograd.grad(loss, student)
    expected = step(student, teacher, labels)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize(
    ("kind", "labels", "mask", "hard_weight"), OP_CASES, ids=[c[0] for c in OP_CASES]
)
def test_eager_autograd_matches_the_registered_one(
    backend, reduction, kind, labels, mask, hard_weight
):
    """Outside torch.compile kd_loss runs its op inside one autograd.Function
    (_ops.KDLossWithGrad, reduction included); the op's registered autograd (what compile
    traces) must give the same loss and gradient, and backward may run twice."""
    device = device_for(backend)
    student = torch.randn(5, 11, device=device, requires_grad=True)
    teacher = torch.randn(2, 5, 11, device=device)
    labels = None if labels is None else labels.to(device)
    mask = None if mask is None else mask.to(device)
    options = dict(kind=kind, labels=labels, mask=mask, hard_weight=hard_weight, temperature=2.0)
    loss = kdk.kd_loss(student, teacher, reduction=reduction, backend=backend, **options)
    assert type(loss.grad_fn).__name__ in ("KDLossWithGradBackward", "ViewBackward0")
    weights = torch.rand(loss.shape, device=device)
    (grad,) = torch.autograd.grad((loss * weights).sum(), student, retain_graph=True)
    (again,) = torch.autograd.grad((loss * weights).sum(), student)
    torch.testing.assert_close(again, grad)

    row_loss, _ = op_for(backend)(
        student, teacher, labels, mask, 2.0, kind, 1.0, hard_weight, 0.5, True, -100, True
    )
    counted = torch.ones(5, dtype=torch.bool, device=device)
    if mask is not None:
        counted &= mask
    if labels is not None:
        counted &= labels != -100
    divisor = {"batchmean": counted.sum(), "sum": 1, "mean": counted.sum() * 11, "none": None}
    expected = row_loss if reduction == "none" else row_loss.sum() / divisor[reduction]
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), student)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.skipif(sys.platform != "linux", reason="the OpenMP build flag is set on Linux only")
def test_cpu_kernels_are_built_with_openmp():
    """at::parallel_for forks threads only in code compiled with -fopenmp; without it every
    CPU kernel silently runs on one thread (as the extension once did)."""
    from kd_kernels import _C

    with open(_C.__file__, "rb") as library:
        assert b"GOMP_parallel" in library.read()
