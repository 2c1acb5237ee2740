"""kd_loss with a sparse teacher and ``topk_remainder="bucket"``: the teacher's missing mass and
the student's mass outside the same k classes are one extra class of both distributions.

Oracles: the spec ``reference.topk_bucket_row_losses`` (written from the coarse-grained
definition, gradchecked in float64) evaluated in float64, and at t = 1 the (k + 1)-class
distributions built by hand and handed to ``torch.nn.functional.kl_div`` and plain formulas.
The kernels run a different route (a dense teacher whose ratio to the student is constant
outside the top k, see ``reference.topk_bucket_teacher_logits``).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import GRAD_TOLERANCE, LOSS_TOLERANCE, cpu_backends, device_for

import kd_kernels as kdk
from kd_kernels import reference

BACKENDS = [*cpu_backends(), "torch"]
KINDS = reference.KD_KINDS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sparse_teacher(rows, classes, k, generator, scale=2.0):
    """(indices, logprobs at t = 1) of the top k of a random dense teacher (random order)."""
    dense = torch.randn(rows, classes, generator=generator, dtype=torch.float64) * scale
    indices = dense.topk(k, dim=-1).indices
    order = torch.rand(rows, k, generator=generator).argsort(dim=-1)
    indices = indices.gather(1, order)
    return indices, dense.log_softmax(dim=-1).gather(1, indices)


def bucket_loss_and_grad(backend, student, indices, logprobs, grad_seed=1, **options):
    student = student.detach().clone().requires_grad_(True)
    loss = kdk.kd_loss(
        student,
        teacher_topk=(indices, logprobs),
        topk_remainder="bucket",
        backend=backend,
        **options,
    )
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(grad_seed))
    (grad,) = torch.autograd.grad((loss * weights.to(loss.device, loss.dtype)).sum(), student)
    return loss, grad


def spec64(student, indices, logprobs, **options):
    """The spec in float64 on the same (rounded) inputs, on the CPU. The logprobs keep their
    dtype: the rounding floor of the missing mass is k * eps of that dtype."""
    cpu = [x.detach().cpu() for x in (student, indices, logprobs)]
    return bucket_loss_and_grad("torch", cpu[0].double(), *cpu[1:], **options)


def assert_close_to_spec(actual, expected, dtype):
    loss, grad = actual
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    ref_loss, ref_grad = expected
    torch.testing.assert_close(loss.cpu().double(), ref_loss, **LOSS_TOLERANCE[dtype])
    # Rows whose loss is +inf (reverse_kl where the teacher's missing mass is rounding, hence
    # 0) have no meaningful gradient; the others are compared (per-row losses).
    finite = torch.isfinite(ref_loss)
    grad, ref_grad = grad.cpu()[finite], ref_grad[finite]
    if ref_grad.numel() == 0:
        return
    # Relative to the gradient's scale (entries of classes with tiny mass are tiny).
    tolerance = GRAD_TOLERANCE[dtype]
    atol = tolerance["atol"] + tolerance["rtol"] * ref_grad.abs().max().item()
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=tolerance["rtol"], atol=atol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("k", [1, 3, 8, 9])
def test_spec_gradcheck_float64(kind, temperature, k):
    indices, logprobs = sparse_teacher(4, 9, k, torch.Generator().manual_seed(k))
    student = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)

    def fn(student):
        return reference.topk_bucket_row_losses(
            student,
            indices,
            logprobs,
            temperature=temperature,
            kind=kind,
            beta=0.3,
            scale_t2=True,
        )

    assert torch.autograd.gradcheck(fn, (student,))


def hand_bucket_distributions(student, indices, logprobs):
    """At t = 1, literally: q = softmax(student), (q_top, 1 - sum q_top) and
    (exp(logprobs), 1 - sum exp(logprobs)), in float64."""
    q = student.double().softmax(dim=-1)
    q_top = q.gather(1, indices)
    q_k1 = torch.cat([q_top, 1 - q_top.sum(dim=-1, keepdim=True)], dim=-1)
    p_top = logprobs.double().exp()
    p_k1 = torch.cat([p_top, 1 - p_top.sum(dim=-1, keepdim=True)], dim=-1)
    return q_k1, p_k1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_t1_equals_kl_div_of_the_coarse_grained_distributions(backend, kind):
    indices, logprobs = sparse_teacher(6, 30, 5, torch.Generator().manual_seed(0))
    student = torch.randn(6, 30, dtype=torch.float64) * 2
    q, p = hand_bucket_distributions(student, indices, logprobs)
    if kind == "kl":
        expected = F.kl_div(q.log(), p, reduction="none").sum(dim=-1)
    elif kind == "reverse_kl":
        expected = F.kl_div(p.log(), q, reduction="none").sum(dim=-1)
    elif kind == "soft_ce":
        expected = -(p * q.log()).sum(dim=-1)
    else:
        m = 0.3 * p + 0.7 * q
        expected = 0.3 * (p * (p / m).log()).sum(dim=-1) + 0.7 * (q * (q / m).log()).sum(dim=-1)
    device = device_for(backend)
    loss = kdk.kd_loss(
        student.float().to(device),
        teacher_topk=(indices.to(device), logprobs.float().to(device)),
        topk_remainder="bucket",
        kind=kind,
        beta=0.3,
        reduction="none",
        backend=backend,
    )
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("k", [1, 4, 39, 40])
def test_every_backend_matches_the_spec(backend, dtype, kind, temperature, k):
    classes = 40
    indices, logprobs = sparse_teacher(7, classes, k, torch.Generator().manual_seed(k))
    device = device_for(backend)
    student = (torch.randn(7, classes, generator=torch.Generator().manual_seed(9)) * 2).to(dtype)
    inputs = (student.to(device), indices.to(device), logprobs.to(device, dtype))
    options = dict(temperature=temperature, kind=kind, beta=0.3, reduction="none")
    assert_close_to_spec(
        bucket_loss_and_grad(backend, *inputs, **options), spec64(*inputs, **options), dtype
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_rows_of_several_dims_and_noncontiguous_inputs(backend, kind):
    indices, logprobs = sparse_teacher(12, 17, 3, torch.Generator().manual_seed(3))
    device = device_for(backend)
    student = (torch.randn(2, 6, 34) * 2)[..., ::2].to(device)  # a strided last dim
    indices = indices.reshape(2, 6, 3).to(device)
    logprobs = logprobs.reshape(2, 6, 3).float().to(device)
    options = dict(temperature=2.0, kind=kind, reduction="none")
    assert_close_to_spec(
        bucket_loss_and_grad(backend, student, indices, logprobs, **options),
        spec64(student, indices, logprobs, **options),
        torch.float32,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", reference.KD_REDUCTIONS)
def test_labels_mask_hard_term_and_reductions(backend, kind, reduction):
    indices, logprobs = sparse_teacher(12, 30, 6, torch.Generator().manual_seed(3))
    device = device_for(backend)
    student = torch.randn(12, 30, generator=torch.Generator().manual_seed(4)) * 2
    labels = torch.randint(0, 30, (12,), generator=torch.Generator().manual_seed(5))
    labels[::4] = -100
    mask = torch.rand(12, generator=torch.Generator().manual_seed(6)) > 0.3
    student[~mask] = math.nan  # uncounted rows reach neither the loss nor the gradient
    options = dict(
        temperature=1.5,
        kind=kind,
        labels=labels.to(device),
        mask=mask.to(device),
        hard_weight=0.4,
        soft_weight=0.6,
        reduction=reduction,
    )
    inputs = (student.to(device), indices.to(device), logprobs.float().to(device))
    actual = bucket_loss_and_grad(backend, *inputs, **options)
    assert torch.isfinite(actual[0]).all() and (actual[1][~mask.to(device)] == 0).all()
    options.update(labels=labels, mask=mask)
    assert_close_to_spec(actual, spec64(*inputs, **options), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
def test_normalizer_and_scale_t2(backend, kind):
    indices, logprobs = sparse_teacher(8, 25, 4, torch.Generator().manual_seed(7))
    device = device_for(backend)
    student = (torch.randn(8, 25) * 2).to(device)
    inputs = (student, indices.to(device), logprobs.float().to(device))
    options = dict(temperature=3.0, kind=kind, normalizer=5.0, scale_t2=False)
    summed = dict(options, normalizer=None, reduction="sum")
    loss, grad = bucket_loss_and_grad(backend, *inputs, **options)
    ref_loss, ref_grad = spec64(*inputs, **summed)
    torch.testing.assert_close(loss.cpu().double(), ref_loss / 5.0, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad.cpu().double(), ref_grad / 5.0, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_student_without_mass_outside_the_topk(backend, kind):
    """All other student logits -inf while the teacher misses mass: the bucket's q is 0 and
    its p is not, so kl and soft_ce are +inf, reverse_kl and jsd finite (0 log 0 = 0 for the
    student's bucket term; jsd's teacher term beta p_B log(1 / beta))."""
    indices, logprobs = sparse_teacher(5, 20, 4, torch.Generator().manual_seed(8))
    device = device_for(backend)
    student = torch.full((5, 20), -math.inf)
    student.scatter_(1, indices, torch.randn(5, 4) * 2)
    inputs = (student.to(device), indices.to(device), logprobs.float().to(device))
    options = dict(temperature=2.0, kind=kind, beta=0.3, reduction="none")
    loss, grad = bucket_loss_and_grad(backend, *inputs, **options)
    if kind in ("kl", "soft_ce"):
        assert torch.isposinf(loss).all()
        return
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close_to_spec((loss, grad), spec64(*inputs, **options), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_no_missing_mass_is_renormalize(backend, kind):
    """r = 0 (the top k hold all the teacher's mass, up to rounding): the bucket class has
    p = 0, no NaN from 0 log 0; every kind equals "renormalize" (reverse_kl: both +inf)."""
    dense = torch.randn(6, 30) * 2
    indices = dense.topk(5, dim=-1).indices
    logprobs = dense.gather(1, indices).log_softmax(dim=-1)
    device = device_for(backend)
    student = (torch.randn(6, 30) * 2).to(device)
    inputs = (student, indices.to(device), logprobs.to(device))
    options = dict(temperature=4.0, kind=kind, reduction="none")
    loss, grad = bucket_loss_and_grad(backend, *inputs, **options)
    renormalized = kdk.kd_loss(student, teacher_topk=inputs[1:], backend=backend, **options)
    if kind == "reverse_kl":
        assert torch.isposinf(loss).all() and torch.isposinf(renormalized).all()
        return
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(loss, renormalized, rtol=2e-5, atol=2e-6)
    assert_close_to_spec((loss, grad), spec64(*inputs, **options), torch.float32)


def test_nan_logprob_in_a_counted_row_gives_nan_and_in_a_masked_row_nothing():
    indices, logprobs = sparse_teacher(4, 12, 3, torch.Generator().manual_seed(5))
    logprobs = logprobs.float()
    logprobs[1, 0] = math.nan
    student = torch.randn(4, 12, requires_grad=True)
    for backend in BACKENDS:
        topk = dict(teacher_topk=(indices, logprobs), topk_remainder="bucket", backend=backend)
        rows = kdk.kd_loss(student, reduction="none", **topk)
        assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2, 3]]).all()
        loss = kdk.kd_loss(student, mask=torch.tensor([True, False, True, True]), **topk)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[1] == 0).all()


def test_logprobs_must_be_log_probabilities():
    indices, logprobs = sparse_teacher(3, 10, 4, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"log-probabilities.*'bucket'"):
        kdk.kd_loss(
            torch.randn(3, 10),
            teacher_topk=(indices, logprobs.float() + 1.0),
            topk_remainder="bucket",
        )


def test_vocab_parallel_refuses_bucket_as_not_implemented():
    from kd_kernels import vocab_parallel

    indices, logprobs = sparse_teacher(3, 10, 4, torch.Generator().manual_seed(1))
    with pytest.raises(NotImplementedError, match="bucket"):
        vocab_parallel._topk_source(
            (indices, logprobs.float()), "bucket", torch.Size([3]), 10, torch.randn(3, 10)
        )
