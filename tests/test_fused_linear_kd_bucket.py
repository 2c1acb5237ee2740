"""fused_linear_kd_loss with a sparse teacher and ``topk_remainder="bucket"`` against the unfused
spec ``reference.fused_linear_kd_loss`` (which runs ``reference.topk_bucket_row_losses``) in
float64, in row chunks and in vocabulary chunks (where a first pass finds the student's
log-sum-exp outside the top k), loss and the gradients of h, W and b."""

import math

import pytest
import torch
from conftest import cpu_backends, device_for
from test_fused_linear_kd import HIDDEN, ROWS, VOCAB, assert_matches, head, losses_and_grads

import kd_kernels as kdk
from kd_kernels import reference
from kd_kernels._logit_transform import LogitTransform

BACKENDS = [*cpu_backends(), "torch"]
KINDS = reference.KD_KINDS
CHUNKS = [None, 4, (4, 7), (3, 1), (5, 40)]


def sparse_teacher(rows, k, seed):
    """(indices, float32 logprobs at t = 1) of the top k of a random teacher, rows (...)."""
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(*rows, VOCAB, generator=generator, dtype=torch.float64) * 2
    indices = dense.topk(k, dim=-1).indices
    return indices, dense.log_softmax(dim=-1).gather(-1, indices).float()


def spec64(indices, logprobs, softcap=None, logit_scale=None, **options):
    """The unfused spec in float64, on the CPU."""

    def fn(h, w, b):
        return reference.fused_linear_kd_loss(
            h.double().cpu(),
            w.double().cpu(),
            student_bias=None if b is None else b.double().cpu(),
            transform=LogitTransform.of(softcap, logit_scale),
            teacher_topk=(indices.cpu(), logprobs.cpu()),
            topk_remainder="bucket",
            **options,
        )

    return fn


def fused(backend, chunk_size, indices, logprobs, **options):
    return lambda h, w, b: kdk.fused_linear_kd_loss(
        h,
        w,
        student_bias=b,
        teacher_topk=(indices, logprobs),
        topk_remainder="bucket",
        chunk_size=chunk_size,
        backend=backend,
        **options,
    )


def compare(backend, chunk_size, k, dtype=torch.float32, rows=(2, 5), seed=0, **options):
    device = device_for(backend)
    h, w, b = head(rows=rows, dtype=dtype, device=device)
    indices, logprobs = sparse_teacher(rows, k, seed)
    indices, logprobs = indices.to(device), logprobs.to(device)
    spec_options = {"beta": 0.5, "scale_t2": True, **options}
    ref_loss, ref_grads = losses_and_grads(spec64(indices, logprobs, **spec_options), h, w, b)
    expected = (ref_loss.float(), [g.to(dtype) for g in ref_grads])
    actual = losses_and_grads(fused(backend, chunk_size, indices, logprobs, **options), h, w, b)
    actual = (actual[0].cpu(), [g.cpu() for g in actual[1]])
    assert_matches(actual, expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", CHUNKS, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_matches_the_unfused_spec(backend, kind, chunk_size, temperature):
    compare(backend, chunk_size, 6, temperature=temperature, kind=kind, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [4, (4, 7)], ids=str)
@pytest.mark.parametrize("k", [1, VOCAB - 1, VOCAB])
def test_extreme_k(backend, kind, chunk_size, k):
    compare(backend, chunk_size, k, temperature=2.0, kind=kind, seed=k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [4, (4, 7)], ids=str)
def test_half_precision(backend, dtype, kind, chunk_size):
    compare(backend, chunk_size, 6, dtype=dtype, temperature=2.0, kind=kind)


def _options(rows):
    generator = torch.Generator().manual_seed(11)
    labels = torch.randint(0, VOCAB, rows, generator=generator)
    labels.view(-1)[::3] = -100
    mask = torch.rand(rows, generator=generator) > 0.25
    return dict(labels=labels, mask=mask, hard_weight=0.3, soft_weight=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [4, (4, 7)], ids=str)
@pytest.mark.parametrize("reduction", reference.KD_REDUCTIONS)
def test_labels_mask_hard_term_and_reductions(backend, kind, chunk_size, reduction):
    compare(
        backend,
        chunk_size,
        5,
        temperature=1.5,
        kind=kind,
        reduction=reduction,
        **_options((2, 5)),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["kl", "soft_ce", "jsd"])
@pytest.mark.parametrize("chunk_size", [4, (4, 7)], ids=str)
def test_normalizer(backend, kind, chunk_size):
    device = device_for(backend)
    h, w, b = head(device=device)
    indices, logprobs = sparse_teacher((ROWS,), 4, 3)
    indices, logprobs = indices.to(device), logprobs.to(device)
    options = dict(temperature=3.0, kind=kind, scale_t2=False)
    ref_loss, ref_grads = losses_and_grads(
        spec64(indices, logprobs, reduction="sum", beta=0.5, **options), h, w, b
    )
    loss, grads = losses_and_grads(
        fused(backend, chunk_size, indices, logprobs, normalizer=7.0, **options), h, w, b
    )
    torch.testing.assert_close(loss.cpu().double(), ref_loss / 7.0, rtol=2e-5, atol=2e-6)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        atol = 1e-6 + 1e-4 * ref_grad.abs().max().item()
        torch.testing.assert_close(grad.cpu(), ref_grad / 7.0, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [4, (4, 7)], ids=str)
def test_softcap_head(backend, chunk_size):
    compare(backend, chunk_size, 6, temperature=2.0, kind="kl", softcap=5.0, logit_scale=0.5)


@pytest.mark.parametrize("backend", cpu_backends())  # the unfused spec lets NaN reach W's grad
@pytest.mark.parametrize("chunk_size", [4, (4, 7)], ids=str)
def test_uncounted_nan_rows_reach_nothing(backend, chunk_size):
    device = device_for(backend)
    h, w, b = head(device=device)
    mask = torch.ones(ROWS, dtype=torch.bool)
    mask[[2, 7]] = False
    h[mask.logical_not().to(device)] = math.nan
    indices, logprobs = sparse_teacher((ROWS,), 5, 4)
    fn = fused(backend, chunk_size, indices.to(device), logprobs.to(device), mask=mask.to(device))
    loss, (grad_h, grad_w, grad_b) = losses_and_grads(fn, h, w, b)
    assert torch.isfinite(loss) and torch.isfinite(grad_w).all() and torch.isfinite(grad_b).all()
    assert (grad_h[~mask.to(device)] == 0).all()


def test_vocab_parallel_refuses_bucket():
    """The refusal comes before any collective, so no process group is needed to see it."""
    from kd_kernels import vocab_parallel

    indices, logprobs = sparse_teacher((ROWS,), 5, 4)
    h = torch.randn(ROWS, HIDDEN)
    with pytest.raises(NotImplementedError, match="bucket"):
        vocab_parallel._topk_source((indices, logprobs), "bucket", h.shape[:-1], VOCAB, h)
