"""fused_linear_kd_loss and top-k teachers on a GPU: the cuda and native triton backends
against the unfused reference. Run with ``python -m pytest -m cuda`` on a GPU machine."""

import pytest
import torch
import torch.nn.functional as F
from conftest import gpu_backends
from test_fused_linear_kd import assert_matches, losses_and_grads

import kd_kernels as kdk
from kd_kernels import reference

pytestmark = pytest.mark.cuda
BACKENDS = gpu_backends() if torch.cuda.is_available() else ["cuda", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", reference.KD_KINDS)
@pytest.mark.parametrize("chunk_size", [None, 100, (100, 4000)], ids=str)
def test_gpu_fused_head_matches_unfused(backend, dtype, kind, chunk_size):
    rows, hidden, vocab = 300, 64, 32003
    h = torch.randn(rows, hidden, device="cuda", dtype=dtype)
    w = (torch.randn(vocab, hidden, device="cuda") * 0.3).to(dtype)
    b = torch.randn(vocab, device="cuda", dtype=dtype)
    teacher = (torch.randn(rows, vocab, device="cuda") * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    labels[::7] = -100
    options = dict(temperature=2.0, kind=kind, labels=labels, hard_weight=0.3)

    def unfused(h, w, b):
        return kdk.kd_loss(F.linear(h, w, b), teacher, backend="torch", **options)

    def fused(h, w, b):
        return kdk.fused_linear_kd_loss(
            h, w, teacher, student_bias=b, chunk_size=chunk_size, backend=backend, **options
        )

    assert_matches(losses_and_grads(fused, h, w, b), losses_and_grads(unfused, h, w, b), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("remainder", reference.TOPK_REMAINDERS)
def test_gpu_topk_teacher_matches_dense(backend, remainder):
    rows, vocab, k = 513, 50257, 20
    student = torch.randn(rows, vocab, device="cuda", requires_grad=True)
    teacher = torch.randn(rows, vocab, device="cuda") * 3
    logprobs, indices = teacher.log_softmax(-1).topk(k, dim=-1)
    dense = reference.topk_teacher_logits(indices, logprobs, vocab, remainder)
    loss = kdk.kd_loss(
        student, teacher_topk=(indices, logprobs), topk_remainder=remainder, backend=backend
    )
    expected = kdk.kd_loss(student, dense, backend="torch")
    (grad,) = torch.autograd.grad(loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(loss, expected, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
