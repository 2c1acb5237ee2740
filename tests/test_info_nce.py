"""info_nce_loss: every backend against reference.py (loss and the gradients of query, key and
temperature) over N x M x D x dtype x similarity x symmetric x labels x reduction."""

import pytest
import torch
from conftest import DTYPES, cpu_backends, device_for
from info_nce_checks import assert_matches_reference, assert_shape_matches_reference, embeddings

import kd_kernels as kdk
from kd_kernels import reference

BACKENDS = cpu_backends()
# (N, M, D): 1x1x1, odd sizes around the tile sizes, hard negatives (M > N), D = 257.
SHAPES = [(1, 1, 1), (5, 5, 16), (7, 12, 257), (33, 70, 40), (130, 130, 8)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("similarity", reference.INFO_NCE_SIMILARITIES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, dtype, similarity, symmetric, shape):
    device = device_for(backend)
    assert_shape_matches_reference(
        backend, shape, dtype, device, similarity, symmetric=symmetric, reduction="none"
    )


@pytest.mark.parametrize("backend", [*BACKENDS, "torch"])
@pytest.mark.parametrize("reduction", reference.INFO_NCE_REDUCTIONS)
@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
def test_reductions(backend, reduction, symmetric):
    device = device_for(backend)
    query, key = embeddings(9, 24, device=device), embeddings(9, 24, device=device)
    loss, *_ = assert_matches_reference(
        backend, query, key, reduction=reduction, symmetric=symmetric
    )
    rows = kdk.info_nce_loss(query, key, reduction="none", symmetric=symmetric, backend=backend)
    expected = {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("similarity", reference.INFO_NCE_SIMILARITIES)
def test_explicit_labels(backend, dtype, similarity):
    device = device_for(backend)
    query, key = embeddings(11, 20, dtype, device), embeddings(6, 20, dtype, device)
    labels = torch.tensor([5, 0, 0, 3, 1, 2, 4, 5, 5, 1, 0], device=device)
    temperature = 0.1 if similarity == "cosine" else 5.0
    assert_matches_reference(
        backend,
        query,
        key,
        labels=labels,
        temperature=temperature,
        similarity=similarity,
        reduction="none",
    )


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"] + ["torch"])
def test_fp64_on_cpu_and_torch(backend):
    query = embeddings(6, 10, torch.float64)
    key = embeddings(8, 10, torch.float64)
    assert_matches_reference(backend, query, key, symmetric=True, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    device = device_for(backend)
    query = embeddings(24, 9, device=device).t()  # (9, 24), column-major
    key = embeddings(12, 48, device=device)[:, ::2]  # (12, 24), every other column
    assert not query.is_contiguous() and not key.is_contiguous()
    assert_matches_reference(backend, query, key, reduction="none")


@pytest.mark.parametrize("backend", [*BACKENDS, "torch"])
def test_zero_rows_follow_f_normalize(backend):
    """An all-zero embedding normalises to 0 (F.normalize's eps): finite loss and gradients."""
    device = device_for(backend)
    query, key = embeddings(4, 8, device=device), embeddings(4, 8, device=device)
    query[1] = 0.0
    loss, grad_query, grad_key, _ = assert_matches_reference(backend, query, key)
    assert torch.isfinite(loss) and bool(torch.isfinite(grad_query).all())
    assert bool(torch.isfinite(grad_key).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_learnable_temperature_module(backend):
    device = device_for(backend)
    module = kdk.nn.InfoNCELoss(temperature=0.07, learnable_temperature=True, backend=backend)
    query = embeddings(6, 16, device=device).requires_grad_()
    key = embeddings(6, 16, device=device).requires_grad_()
    module(query, key).backward()
    reference_module = kdk.nn.InfoNCELoss(temperature=0.07, learnable_temperature=True)
    reference_module.options["backend"] = "torch"
    query_ref = query.detach().clone().requires_grad_()
    reference_module(query_ref, key.detach()).backward()
    torch.testing.assert_close(
        module.log_temperature.grad, reference_module.log_temperature.grad, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(query.grad, query_ref.grad, rtol=1e-4, atol=1e-6)
    assert "temperature=0.07" in repr(module)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    device = device_for(backend)
    query = embeddings(5, 16, device=device).requires_grad_()
    key = embeddings(7, 16, device=device).requires_grad_()
    labels = torch.tensor([0, 6, 2, 2, 4], device=device)
    temperature = torch.tensor(0.1, device=device, requires_grad=True)
    if backend == "triton":
        from kd_kernels.triton.info_nce import info_nce_backward_triton as backward
        from kd_kernels.triton.info_nce import info_nce_forward_triton as forward
    else:
        forward, backward = (
            torch.ops.kd_kernels.info_nce_forward,
            torch.ops.kd_kernels.info_nce_backward,
        )
    for cosine in (True, False):
        torch.library.opcheck(forward, (query, key, labels, temperature, cosine))
        _, lse = forward(query, key, labels, temperature, cosine)
        grad = torch.rand(5, device=device)
        torch.library.opcheck(
            backward,
            (grad, query.detach(), key.detach(), labels, temperature.detach(), lse, cosine),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    device = device_for(backend)
    torch._dynamo.reset()

    def step(query, key, temperature):
        return kdk.info_nce_loss(
            query, key, temperature=temperature, symmetric=True, backend=backend
        )

    query = embeddings(6, 16, device=device).requires_grad_()
    key = embeddings(6, 16, device=device).requires_grad_()
    temperature = torch.tensor(0.05, device=device, requires_grad=True)
    loss = torch.compile(step, fullgraph=True)(query, key, temperature)
    grads = torch.autograd.grad(loss, (query, key, temperature))
    expected = step(query, key, temperature)
    expected_grads = torch.autograd.grad(expected, (query, key, temperature))
    torch.testing.assert_close(loss, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


# Relative-norm error of a half-precision gradient against float64 (from the same rounded
# inputs): a few units of the dtype's rounding. Long embeddings (|x| ~ 170) with g = 1/N make
# the entries of g (p - delta) a_i b_j / t ~1e-7, below fp16's normal range: a kernel that
# rounds them to fp16 before its tile product was 1.4% off here (fp16), 0.03% with the fix.
HALF_GRAD_RELATIVE_ERROR = {torch.float16: 2e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("similarity", reference.INFO_NCE_SIMILARITIES)
def test_half_precision_gradients_against_float64(backend, dtype, similarity):
    device = device_for(backend)
    query = (30 * torch.randn(128, 32)).to(dtype)
    key = (30 * torch.randn(128, 32)).to(dtype)
    temperature = 0.05 if similarity == "cosine" else 2000.0
    grads = []
    for inputs in ((query.to(device), key.to(device)), (query.double(), key.double())):
        q, k = (x.detach().clone().requires_grad_(True) for x in inputs)
        run_backend = backend if q.dtype == dtype else "torch"
        loss = kdk.info_nce_loss(
            q, k, temperature=temperature, similarity=similarity, backend=run_backend
        )
        grads.append(torch.autograd.grad(loss, (q, k)))
    for ours, exact in zip(*grads, strict=True):
        error = (ours.double().cpu() - exact).norm() / exact.norm()
        assert error < HALF_GRAD_RELATIVE_ERROR[dtype], f"relative error {error:.2e}"
