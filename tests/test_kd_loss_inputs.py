"""kd_loss: every bad input gets a clear ValueError / TypeError naming what it saw."""

import pytest
import torch
from conftest import cpu_backends

import kd_kernels as kdk

BACKENDS = [*cpu_backends(), "torch"]


def good(rows=3, classes=5):
    return torch.randn(rows, classes), torch.randn(rows, classes)


BAD_CALLS = [
    ("temperature_zero", lambda s, t: dict(temperature=0.0), ValueError, "temperature"),
    ("temperature_negative", lambda s, t: dict(temperature=-1.0), ValueError, "temperature"),
    ("temperature_nan", lambda s, t: dict(temperature=float("nan")), ValueError, "temperature"),
    (
        "temperature_tensor",
        lambda s, t: dict(temperature=torch.tensor(2.0)),
        TypeError,
        "temperature",
    ),
    ("kind", lambda s, t: dict(kind="kld"), ValueError, "kind"),
    ("reduction", lambda s, t: dict(reduction="avg"), ValueError, "reduction"),
    ("beta", lambda s, t: dict(kind="jsd", beta=1.5), ValueError, "beta"),
    ("backend", lambda s, t: dict(backend="tpu"), ValueError, "backend"),
    ("hard_without_labels", lambda s, t: dict(hard_weight=1.0), ValueError, "labels"),
    ("label_too_large", lambda s, t: dict(labels=torch.tensor([0, 5, 1])), ValueError, "labels"),
    ("label_negative", lambda s, t: dict(labels=torch.tensor([0, -1, 1])), ValueError, "labels"),
    ("labels_float", lambda s, t: dict(labels=torch.zeros(3)), TypeError, "labels"),
    (
        "labels_shape",
        lambda s, t: dict(labels=torch.zeros(4, dtype=torch.long)),
        ValueError,
        "labels",
    ),
    (
        "mask_complex",
        lambda s, t: dict(mask=torch.ones(3, dtype=torch.complex64)),
        TypeError,
        "mask",
    ),
    ("mask_shape", lambda s, t: dict(mask=torch.ones(3, 1, dtype=torch.bool)), ValueError, "mask"),
    (
        "mask_device",
        lambda s, t: dict(mask=torch.ones(3, dtype=torch.bool, device="meta")),
        ValueError,
        "mask",
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("name", "options", "error", "match"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS]
)
def test_bad_option_raises(backend, name, options, error, match):
    student, teacher = good()
    call = dict(backend=backend)
    call.update(options(student, teacher))
    with pytest.raises(error, match=match):
        kdk.kd_loss(student, teacher, **call)


BAD_TENSORS = [
    ("teacher_shape", lambda: (torch.randn(3, 5), torch.randn(3, 6)), ValueError, r"\(3, 6\)"),
    ("teacher_rows", lambda: (torch.randn(3, 5), torch.randn(4, 5)), ValueError, r"\(4, 5\)"),
    (
        "broadcastable_teacher",
        lambda: (torch.randn(3, 5), torch.randn(1, 5)),
        ValueError,
        "teacher_logits",
    ),
    ("ensemble_shape", lambda: (torch.randn(3, 5), torch.randn(2, 3, 6)), ValueError, "ensemble"),
    (
        "integer_student",
        lambda: (torch.ones(3, 5, dtype=torch.long), torch.randn(3, 5)),
        TypeError,
        "student_logits",
    ),
    (
        "integer_teacher",
        lambda: (torch.randn(3, 5), torch.ones(3, 5, dtype=torch.int32)),
        TypeError,
        "teacher_logits",
    ),
    ("dtype_mismatch", lambda: (torch.randn(3, 5), torch.randn(3, 5).half()), TypeError, "dtype"),
    (
        "device_mismatch",
        lambda: (torch.randn(3, 5), torch.randn(3, 5, device="meta")),
        ValueError,
        "device",
    ),
    ("scalar", lambda: (torch.tensor(1.0), torch.tensor(1.0)), ValueError, "class dimension"),
    ("zero_classes", lambda: (torch.randn(3, 0), torch.randn(3, 0)), ValueError, "0 classes"),
    ("not_a_tensor", lambda: ([[1.0, 2.0]], torch.randn(1, 2)), TypeError, "student_logits"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("name", "tensors", "error", "match"), BAD_TENSORS, ids=[c[0] for c in BAD_TENSORS]
)
def test_bad_tensor_raises(backend, name, tensors, error, match):
    student, teacher = tensors()
    with pytest.raises(error, match=match):
        kdk.kd_loss(student, teacher, backend=backend)


def test_backend_that_cannot_run_here_raises():
    student, teacher = good()
    with pytest.raises(ValueError, match="cuda"):
        kdk.kd_loss(student, teacher, backend="cuda")


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b == "triton"])
def test_triton_rejects_float64(backend):
    student, teacher = good()
    with pytest.raises(TypeError, match="float64"):
        kdk.kd_loss(student.double(), teacher.double(), backend=backend)


def test_ignore_index_labels_are_not_range_checked():
    student, teacher = good()
    loss = kdk.kd_loss(student, teacher, labels=torch.tensor([-100, 2, -100]), hard_weight=1.0)
    assert torch.isfinite(loss)


def test_empty_batch_gives_zero():
    student, teacher = torch.randn(0, 5, requires_grad=True), torch.randn(0, 5)
    for backend in BACKENDS:
        loss = kdk.kd_loss(student, teacher, backend=backend)
        assert loss.item() == 0.0
        loss.backward()
        assert student.grad.shape == (0, 5)
