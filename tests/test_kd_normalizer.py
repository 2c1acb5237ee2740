"""normalizer= on kd_loss, fused_linear_kd_loss and their modules (issue 17): the summed loss
divided by a number or a 0-dim tensor, so that micro-batches accumulated with the step's token
count equal one big batch."""

import pytest
import torch
from conftest import cpu_backends, device_for
from kd_loss_checks import logits

import kd_kernels as kdk

BACKENDS = ["torch", *cpu_backends()]
FUSED_CHUNKS = {"rows": 3, "vocab": (3, 7)}


def _divisor(kind, count, classes):
    return count * classes if kind == "mean" else count


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["number", "tensor"])
def test_kd_loss_divides_the_sum_by_the_normalizer(backend, reduction, as_tensor):
    device = device_for(backend)
    student = logits(6, 11, device=device).requires_grad_()
    teacher = logits(6, 11, device=device)
    labels = torch.tensor([1, -100, 3, 4, -100, 0], device=device)
    normalizer = torch.tensor(17, device=device) if as_tensor else 17.0
    loss = kdk.kd_loss(
        student,
        teacher,
        labels=labels,
        reduction=reduction,
        normalizer=normalizer,
        temperature=2.0,
        kind="jsd",
        backend=backend,
    )
    (grad,) = torch.autograd.grad(loss, student)
    total = kdk.kd_loss(
        student,
        teacher,
        labels=labels,
        reduction="sum",
        temperature=2.0,
        kind="jsd",
        backend="torch",
    )
    (total_grad,) = torch.autograd.grad(total, student)
    expected = total / _divisor(reduction, 17, 11)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, expected, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(grad, total_grad / _divisor(reduction, 17, 11), rtol=1e-4, atol=1e-7)


def _micro_batches(generator, vocab=13, hidden=8):
    """Four micro-batches of 5 rows with 1, 3, 4 and 5 counted rows (labels = ignore_index
    elsewhere), the student head (W, b) and a teacher per batch."""
    batches = []
    for counted in (1, 3, 4, 5):
        h = torch.randn(5, hidden, generator=generator)
        teacher = 3 * torch.randn(5, vocab, generator=generator)
        labels = torch.randint(0, vocab, (5,), generator=generator)
        labels[counted:] = -100
        batches.append((h, teacher, labels))
    w = torch.randn(vocab, hidden, generator=generator)
    b = torch.randn(vocab, generator=generator)
    return batches, w, b


@pytest.mark.parametrize("path", ["kd_loss", *FUSED_CHUNKS])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["kl", "reverse_kl"])
def test_accumulated_micro_batches_equal_one_big_batch(path, backend, kind):
    """Gradient accumulation as the HF Trainer does it: each micro-batch's loss divided by the
    tokens counted over all four (num_items_in_batch), gradients summed; the result is the
    batchmean loss of the concatenated batch, and so are the gradients of W and b."""
    device = device_for(backend)
    batches, w, b = _micro_batches(torch.Generator().manual_seed(1))
    options = dict(temperature=2.0, kind=kind, hard_weight=0.5, backend=backend)
    w = w.to(device).requires_grad_()
    b = b.to(device).requires_grad_()

    def loss_of(h, teacher, labels, **extra):
        h, teacher, labels = h.to(device), teacher.to(device), labels.to(device)
        if path == "kd_loss":
            return kdk.kd_loss(h @ w.T + b, teacher, labels=labels, **options, **extra)
        return kdk.fused_linear_kd_loss(
            h,
            w,
            teacher,
            student_bias=b,
            labels=labels,
            chunk_size=FUSED_CHUNKS[path],
            **options,
            **extra,
        )

    num_items = torch.tensor(sum(int((labels != -100).sum()) for _, _, labels in batches))
    accumulated = sum(loss_of(*batch, normalizer=num_items.to(device)) for batch in batches)
    accumulated_grads = torch.autograd.grad(accumulated, (w, b))
    big = loss_of(*(torch.cat(parts) for parts in zip(*batches, strict=True)))
    big_grads = torch.autograd.grad(big, (w, b))
    # The mean of per-micro-batch means would differ: 1, 3, 4 and 5 counted rows.
    assert not torch.isclose(big, sum(loss_of(*batch) for batch in batches).detach() / 4, rtol=1e-3)
    torch.testing.assert_close(accumulated, big, rtol=2e-5, atol=1e-6)
    for grad, big_grad in zip(accumulated_grads, big_grads, strict=True):
        torch.testing.assert_close(grad, big_grad, rtol=1e-4, atol=1e-6)


def test_modules_take_the_normalizer_in_forward():
    student, teacher = logits(4, 6).requires_grad_(), logits(4, 6)
    module = kdk.nn.KDLoss(temperature=2.0)
    expected = kdk.kd_loss(student, teacher, temperature=2.0, reduction="sum") / 10
    torch.testing.assert_close(module(student, teacher, normalizer=10), expected)
    h, w = torch.randn(4, 5), torch.randn(6, 5)
    fused = kdk.nn.FusedLinearKDLoss(temperature=2.0)
    expected = kdk.fused_linear_kd_loss(h, w, teacher, temperature=2.0, reduction="sum") / 10
    torch.testing.assert_close(fused(h, w, teacher, normalizer=torch.tensor(10.0)), expected)


@pytest.mark.parametrize(
    ("normalizer", "reduction", "error", "match"),
    [
        (0, "batchmean", ValueError, "> 0"),
        (-3.0, "batchmean", ValueError, "> 0"),
        (float("nan"), "batchmean", ValueError, "> 0"),
        (torch.ones(2), "batchmean", ValueError, "0-dim"),
        (torch.tensor(True), "batchmean", ValueError, "0-dim"),
        (True, "batchmean", TypeError, "number"),
        ("8", "batchmean", TypeError, "number"),
        (8, "sum", ValueError, "batchmean"),
        (8, "none", ValueError, "batchmean"),
    ],
    ids=["zero", "negative", "nan", "vector", "bool_tensor", "bool", "string", "sum", "none"],
)
@pytest.mark.parametrize("fn", ["kd_loss", "fused"])
def test_bad_normalizer_is_refused(fn, normalizer, reduction, error, match):
    teacher = logits(3, 4)
    with pytest.raises(error, match=match):
        if fn == "kd_loss":
            kdk.kd_loss(logits(3, 4), teacher, normalizer=normalizer, reduction=reduction)
        else:
            kdk.fused_linear_kd_loss(
                torch.randn(3, 2),
                torch.randn(4, 2),
                teacher,
                normalizer=normalizer,
                reduction=reduction,
            )
