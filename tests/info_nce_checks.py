"""Parity helpers shared by the InfoNCE test tables (CPU and GPU)."""

import torch
from conftest import GRAD_TOLERANCE, LOSS_TOLERANCE

import kd_kernels as kdk


def embeddings(rows, dim, dtype=torch.float32, device="cpu"):
    return torch.randn(rows, dim).to(device=device, dtype=dtype)


def loss_and_grads(backend, query, key, temperature=0.05, grad_seed=1, **options):
    """The loss and d(loss . w)/d (query, key, temperature) for a fixed random weighting w.

    The temperature is a 0-dim tensor that requires grad, so its gradient is checked too.
    """
    query = query.detach().clone().requires_grad_(True)
    key = key.detach().clone().requires_grad_(True)
    # float64 inputs get a float64 temperature, so its gradient is not rounded to float32.
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    temperature = torch.tensor(
        float(temperature), dtype=dtype, device=query.device, requires_grad=True
    )
    loss = kdk.info_nce_loss(query, key, temperature=temperature, backend=backend, **options)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(grad_seed))
    grads = torch.autograd.grad((loss * weights.to(loss.device)).sum(), (query, key, temperature))
    return (loss, *grads)


def assert_matches_reference(backend, query, key, **options):
    """Loss, grad query, grad key, grad temperature of ``backend`` against the reference."""
    ours = loss_and_grads(backend, query, key, **options)
    expected = loss_and_grads("torch", query, key, **options)
    dtype = query.dtype
    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    names = ("loss", "grad query", "grad key", "grad temperature")
    max_logit = _max_abs_logit(query, key, **options)
    for name, value, reference in zip(names, ours, expected, strict=True):
        tolerance = dict(LOSS_TOLERANCE[dtype] if name == "loss" else GRAD_TOLERANCE[dtype])
        if dtype in (torch.float16, torch.bfloat16) and name != "loss":
            # fp16/bf16 kernels feed the tensor cores the gradient weights in that dtype.
            tolerance = dict(rtol=2e-2, atol=2e-3)
        scale = max(1.0, reference.abs().max().item())
        if name == "grad temperature":
            # -sum_ij G_ij z_ij / t: each term's rounding is ~eps |z|^2 / t, N of them per row.
            scale = max(
                scale, query.shape[0] * max_logit**2 * float(options.get("temperature", 0.05))
            )
        tolerance["atol"] *= scale
        torch.testing.assert_close(
            value.float(),
            reference.float(),
            **tolerance,
            msg=lambda text, name=name: f"{name}: {text}",
        )
    return ours


def assert_shape_matches_reference(backend, shape, dtype, device, similarity, **options):
    """Random (N, D) queries and (M, D) keys of ``shape`` = (N, M, D) against the reference,
    with a temperature that keeps the logits sane for ``similarity``."""
    rows, keys, dim = shape
    query, key = embeddings(rows, dim, dtype, device), embeddings(keys, dim, dtype, device)
    # dot products of unit-variance rows grow like sqrt(D): a temperature that keeps them sane.
    temperature = 0.05 if similarity == "cosine" else float(dim) ** 0.5
    return assert_matches_reference(
        backend, query, key, temperature=temperature, similarity=similarity, **options
    )


def _max_abs_logit(query, key, temperature=0.05, similarity="cosine", **_):
    q, k = query.double(), key.double()
    if similarity == "cosine":
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    return (q @ k.T).abs().max().item() / temperature


def confident_errors(backend, dtype, symmetric, device):
    """Relative errors (vs float64 on the same rounded inputs) of d query, d key and
    d temperature where every query sits next to its key (P_iy ~ 0.99 at t = 0.12, 16 pairs,
    D = 32, reduction "sum"): the gradient is ~100x smaller than the keys, so a kernel that
    rounds P_iy (~1) to half precision and subtracts the label's key afterwards loses it."""
    generator = torch.Generator().manual_seed(3)
    key = torch.randn(16, 32, generator=generator)
    query = key + 0.15 * torch.randn(16, 32, generator=generator)
    query, key = query.to(device, dtype), key.to(device, dtype)
    expected = _sum_loss_and_grads(query.double(), key.double(), "torch", symmetric)
    assert expected[0].item() < 0.05 * query.shape[0]  # confident: loss_i ~ 0.01
    ours = _sum_loss_and_grads(query, key, backend, symmetric)
    return [
        ((value.double() - wanted).norm() / wanted.norm()).item()
        for value, wanted in zip(ours[1:], expected[1:], strict=True)
    ]


def _sum_loss_and_grads(query, key, backend, symmetric):
    query, key = query.clone().requires_grad_(), key.clone().requires_grad_()
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    temperature = torch.tensor(0.12, dtype=dtype, device=query.device, requires_grad=True)
    loss = kdk.info_nce_loss(
        query, key, temperature=temperature, symmetric=symmetric, reduction="sum", backend=backend
    )
    return (loss, *torch.autograd.grad(loss, (query, key, temperature)))
