"""Inputs and parity helpers shared by the attention/hidden MSE test tables (CPU and GPU)."""

import torch
from conftest import GRAD_TOLERANCE, LOSS_TOLERANCE

import kd_kernels as kdk

LOSSES = {"attention": kdk.attention_mse_loss, "hidden": kdk.hidden_mse_loss}


def padding_mask(batch: int, length: int, device="cpu") -> torch.Tensor:
    """(B, L) int64 1/0 mask with ragged lengths: the first sequence full, the last one empty
    when there are 3 or more (a layer may have a sequence with no real token)."""
    lengths = torch.randint(1, length + 1, (batch,))
    lengths[0] = length
    if batch >= 3:
        lengths[-1] = 0
    return (torch.arange(length)[None, :] < lengths[:, None]).long().to(device)


def bert_scores(
    batch, heads, length, mask=None, dtype=torch.float32, device="cpu", at_threshold=True
):
    """Pre-softmax attention scores as BERT makes them: q.k / sqrt(d) + (1 - mask) * -10000,
    with a few entries at exactly -100 when ``at_threshold`` (the threshold is inclusive; not
    for gradcheck, whose finite differences would straddle the step)."""
    queries, keys = torch.randn(2, batch, heads, length, 8).unbind(0)
    scores = queries @ keys.transpose(-1, -2) * 8**-0.5 * 4
    if mask is not None:
        scores = scores + (1 - mask[:, None, None, :].float()) * -10000.0
    if at_threshold:
        scores.view(-1)[::7] = -100.0
    return scores.to(device=device, dtype=dtype)


def loss_and_grads(loss_name, backend, students, teachers, grad_seed=1, **options):
    """The loss and d(loss . w)/d student for each layer, for a fixed random weighting w."""
    students = [s.detach().clone().requires_grad_(True) for s in students]
    loss = LOSSES[loss_name](students, teachers, backend=backend, **options)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(grad_seed))
    grads = torch.autograd.grad((loss * weights.to(loss.device)).sum(), students)
    return loss, grads


def assert_layers_match_reference(loss_name, backend, students, teachers, **options):
    loss, grads = loss_and_grads(loss_name, backend, students, teachers, **options)
    ref_loss, ref_grads = loss_and_grads(loss_name, "torch", students, teachers, **options)
    dtype = students[0].dtype
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss_tol = dict(LOSS_TOLERANCE[dtype])
    # Squares of scores up to ~20: scale the absolute tolerance with the loss itself.
    loss_tol["atol"] *= max(1.0, ref_loss.abs().max().item())
    torch.testing.assert_close(loss, ref_loss, **loss_tol)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert grad.dtype == dtype and grad.shape == ref_grad.shape
        grad_tol = dict(GRAD_TOLERANCE[dtype])
        grad_tol["atol"] *= max(1.0, ref_grad.abs().max().item())
        torch.testing.assert_close(grad.float(), ref_grad.float(), **grad_tol)
    return loss, grads
