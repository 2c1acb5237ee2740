"""kd_loss with a sparse top-k teacher (teacher_topk=(indices, logprobs)) against dense teachers.

Oracles: a dense teacher whose mass outside the top k is exactly zero (both remainder options
must equal it), and a dense teacher whose remaining mass is spread evenly by construction
(``"spread"`` must equal it, ``"renormalize"`` must equal its top k renormalised).
"""

import math

import pytest
import torch
from conftest import GRAD_TOLERANCE, LOSS_TOLERANCE, cpu_backends, device_for
from kd_loss_checks import loss_and_grad

import kd_kernels as kdk
from kd_kernels import reference

BACKENDS = [*cpu_backends(), "torch"]
KINDS = reference.KD_KINDS


def topk_loss_and_grad(backend, student, indices, logprobs, **options):
    student = student.detach().clone().requires_grad_(True)
    loss = kdk.kd_loss(student, teacher_topk=(indices, logprobs), backend=backend, **options)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((loss * weights.to(loss.device)).sum(), student)
    return loss, grad


def zero_mass_teacher(rows, classes, k, generator):
    """(indices, logprobs at t=1, dense logits with -inf outside the top k)."""
    dense = torch.randn(rows, classes, generator=generator) * 3
    indices = dense.topk(k, dim=-1).indices
    outside = torch.ones_like(dense, dtype=torch.bool).scatter_(1, indices, False)
    dense = dense.masked_fill(outside, -math.inf)
    logprobs = dense.log_softmax(dim=-1).gather(1, indices)
    return indices, logprobs, dense


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual[0], expected[0], **LOSS_TOLERANCE[dtype])
    torch.testing.assert_close(actual[1].float(), expected[1].float(), **GRAD_TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["kl", "soft_ce", "jsd"])
@pytest.mark.parametrize("remainder", reference.TOPK_REMAINDERS)
@pytest.mark.parametrize("shape", [(6, 50, 5), (2, 3, 17, 1), (4, 9, 9)], ids=str)
def test_zero_mass_outside_topk_equals_dense(backend, dtype, kind, remainder, shape):
    *row_shape, classes, k = shape
    rows = math.prod(row_shape)
    indices, logprobs, dense = zero_mass_teacher(rows, classes, k, torch.Generator().manual_seed(0))
    device = device_for(backend)
    student = (torch.randn(*row_shape, classes) * 3).to(device, dtype)
    options = dict(temperature=2.0, kind=kind, reduction="none")
    expected = loss_and_grad(
        "torch", student, dense.reshape(*row_shape, classes).to(device, dtype), **options
    )
    actual = topk_loss_and_grad(
        backend,
        student,
        indices.reshape(*row_shape, k).to(device),
        logprobs.reshape(*row_shape, k).to(device, dtype),
        topk_remainder=remainder,
        **options,
    )
    assert_close(actual, expected, dtype)


@pytest.mark.parametrize("remainder", reference.TOPK_REMAINDERS)
def test_reverse_kl_against_renormalized_topk_is_infinite_like_dense(remainder):
    indices, logprobs, dense = zero_mass_teacher(3, 10, 4, torch.Generator().manual_seed(0))
    student = torch.randn(3, 10)
    dense_loss = kdk.kd_loss(student, dense, kind="reverse_kl", reduction="none")
    sparse_loss = kdk.kd_loss(
        student,
        teacher_topk=(indices, logprobs),
        topk_remainder=remainder,
        kind="reverse_kl",
        reduction="none",
    )
    assert torch.isinf(dense_loss).all() and torch.equal(sparse_loss, dense_loss)


def spread_teacher(rows, classes, k, kept_mass, generator):
    """A teacher whose top k hold ``kept_mass`` and whose other classes share the rest evenly."""
    indices = torch.rand(rows, classes, generator=generator).argsort(dim=-1)[:, :k]
    top = torch.rand(rows, k, generator=generator) + 0.1
    top = top / top.sum(dim=-1, keepdim=True) * kept_mass
    probs = torch.full((rows, classes), (1 - kept_mass) / (classes - k)).scatter(1, indices, top)
    return indices, top.log(), probs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_spread_gives_the_other_classes_the_missing_mass_evenly(backend, kind, temperature):
    indices, logprobs, probs = spread_teacher(7, 40, 5, 0.7, torch.Generator().manual_seed(2))
    device = device_for(backend)
    student = (torch.randn(7, 40) * 2).to(device)
    options = dict(temperature=temperature, kind=kind, reduction="none", beta=0.3)
    expected = loss_and_grad("torch", student, probs.log().to(device), **options)
    actual = topk_loss_and_grad(
        backend,
        student,
        indices.to(device),
        logprobs.to(device),
        topk_remainder="spread",
        **options,
    )
    assert_close(actual, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["kl", "soft_ce", "jsd"])
def test_renormalize_is_the_softmax_of_the_topk_alone(backend, kind):
    indices, logprobs, probs = spread_teacher(7, 40, 5, 0.7, torch.Generator().manual_seed(2))
    device = device_for(backend)
    kept = torch.zeros_like(probs).scatter(1, indices, logprobs.exp() / 0.7)
    student = (torch.randn(7, 40) * 2).to(device)
    options = dict(temperature=2.0, kind=kind, reduction="none")
    expected = loss_and_grad("torch", student, kept.log().to(device), **options)
    actual = topk_loss_and_grad(
        backend, student, indices.to(device), logprobs.to(device), **options
    )
    assert_close(actual, expected, torch.float32)


def test_topk_with_options_labels_mask_and_reductions():
    indices, logprobs, dense = zero_mass_teacher(12, 30, 6, torch.Generator().manual_seed(3))
    student = torch.randn(12, 30) * 2
    labels = torch.randint(0, 30, (12,))
    labels[::4] = -100
    mask = torch.rand(12) > 0.3
    for reduction in reference.KD_REDUCTIONS:
        options = dict(
            temperature=1.5,
            labels=labels,
            mask=mask,
            hard_weight=0.4,
            soft_weight=0.6,
            reduction=reduction,
        )
        for backend in BACKENDS:
            expected = loss_and_grad("torch", student, dense, **options)
            actual = topk_loss_and_grad(backend, student, indices, logprobs, **options)
            assert_close(actual, expected, torch.float32)


def test_rounding_residue_is_not_spread():
    """Log-probabilities that sum to 1 only up to rounding leave nothing to spread, even at a
    temperature that would blow a 1e-8 floor up to a visible one."""
    indices, logprobs, dense = zero_mass_teacher(5, 1000, 8, torch.Generator().manual_seed(4))
    rest = reference.topk_remainder_logprob(logprobs, 1000, "spread")
    assert torch.isneginf(rest).all()
    student = torch.randn(5, 1000)
    sparse = kdk.kd_loss(
        student, teacher_topk=(indices, logprobs), topk_remainder="spread", temperature=8.0
    )
    torch.testing.assert_close(sparse, kdk.kd_loss(student, dense, temperature=8.0))


def test_nan_logprob_in_a_counted_row_gives_nan_and_in_a_masked_row_nothing():
    indices, logprobs, _ = zero_mass_teacher(4, 12, 3, torch.Generator().manual_seed(5))
    logprobs[1, 0] = math.nan
    student = torch.randn(4, 12, requires_grad=True)
    for remainder in reference.TOPK_REMAINDERS:
        rows = kdk.kd_loss(
            student, teacher_topk=(indices, logprobs), topk_remainder=remainder, reduction="none"
        )
        assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2, 3]]).all()
        mask = torch.tensor([True, False, True, True])
        loss = kdk.kd_loss(
            student, teacher_topk=(indices, logprobs), topk_remainder=remainder, mask=mask
        )
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[1] == 0).all()


def _topk(rows=3, classes=10, k=4):
    indices = torch.stack([torch.randperm(classes)[:k] for _ in range(rows)])
    return indices, torch.log(torch.full((rows, k), 0.2))


BAD_TOPK = [
    ("not a pair", lambda i, lp: (i,), {}, TypeError, "pair"),
    ("float indices", lambda i, lp: (i.float(), lp), {}, TypeError, "integer"),
    ("int logprobs", lambda i, lp: (i, lp.long()), {}, TypeError, "float"),
    ("shapes differ", lambda i, lp: (i, lp[:, :2]), {}, ValueError, r"\(\.\.\., k\)"),
    ("wrong rows", lambda i, lp: (i[:2], lp[:2]), {}, ValueError, "student's rows"),
    (
        "index too big",
        lambda i, lp: (i.index_fill(1, torch.tensor([0]), 10), lp),
        {},
        ValueError,
        r"\[0, 10\)",
    ),
    (
        "negative index",
        lambda i, lp: (i.index_fill(1, torch.tensor([0]), -1), lp),
        {},
        ValueError,
        r"\[0, 10\)",
    ),
    (
        "duplicate index",
        lambda i, lp: (i.index_fill(1, torch.tensor([0, 1]), 3), lp),
        {},
        ValueError,
        "distinct",
    ),
    (
        "mass above one",
        lambda i, lp: (i, lp + 1.0),
        {"topk_remainder": "spread"},
        ValueError,
        "log-probabilities",
    ),
    (
        "bad remainder",
        lambda i, lp: (i, lp),
        {"topk_remainder": "uniform"},
        ValueError,
        "topk_remainder",
    ),
]


@pytest.mark.parametrize(
    "make, options, error, match", [case[1:] for case in BAD_TOPK], ids=[c[0] for c in BAD_TOPK]
)
def test_bad_topk_teacher_is_refused(make, options, error, match):
    student = torch.randn(3, 10)
    with pytest.raises(error, match=match):
        kdk.kd_loss(student, teacher_topk=make(*_topk()), **options)


def test_k_larger_than_classes_is_refused():
    indices = torch.arange(12).expand(3, 12)
    with pytest.raises(ValueError, match="k must be in"):
        kdk.kd_loss(torch.randn(3, 10), teacher_topk=(indices, torch.zeros(3, 12)))


def test_one_teacher_form_only():
    student = torch.randn(3, 10)
    with pytest.raises(ValueError, match="not both"):
        kdk.kd_loss(student, torch.randn(3, 10), teacher_topk=_topk())
    with pytest.raises(ValueError, match="needs a teacher"):
        kdk.kd_loss(student)
