"""kd_loss: every backend against reference.py, fwd and bwd, over shape x dtype x option."""

import pytest
import torch
from conftest import DTYPES, GRAD_TOLERANCE, LOSS_TOLERANCE, cpu_backends, device_for
from kd_loss_checks import assert_matches_reference, logits, loss_and_grad

import kd_kernels as kdk
from kd_kernels import reference

KINDS = reference.KD_KINDS
REDUCTIONS = reference.KD_REDUCTIONS
BACKENDS = cpu_backends()


SHAPES = [(1, 1), (3, 5), (2, 7, 33), (65, 2), (5, 257)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_over_shapes_and_dtypes(backend, dtype, kind, shape):
    device = device_for(backend)
    student = logits(*shape, dtype=dtype, device=device)
    teacher = logits(*shape, dtype=dtype, device=device)
    assert_matches_reference(backend, student, teacher, temperature=2.0, kind=kind)


def _option_cases():
    """(id, builder) pairs: builder(rows, classes) -> (student, teacher, options)."""

    def labelled(rows, classes):
        labels = torch.randint(0, classes, (rows,))
        labels[::3] = -100
        return labels

    def masked(rows, classes):
        mask = torch.rand(rows) > 0.4
        mask[0] = True
        return mask

    def base(rows, classes, **extra):
        return logits(rows, classes), logits(rows, classes), extra

    def ensemble(rows, classes):
        return logits(rows, classes), logits(3, rows, classes), {}

    def neg_inf_teacher(rows, classes):
        teacher = logits(rows, classes)
        teacher[:, ::2] = float("-inf")
        return logits(rows, classes), teacher, {}

    def extreme(rows, classes):
        return logits(rows, classes, scale=1e4), logits(rows, classes, scale=1e4), {}

    def non_contiguous(rows, classes):
        student = logits(classes, rows).t()
        teacher = logits(rows, 2 * classes)[:, ::2]
        assert not student.is_contiguous() and not teacher.is_contiguous()
        return student, teacher, {}

    return [
        ("plain", lambda r, c: base(r, c)),
        ("mask", lambda r, c: base(r, c, mask=masked(r, c))),
        ("labels_ignore", lambda r, c: base(r, c, labels=labelled(r, c))),
        (
            "hard_mix",
            lambda r, c: base(r, c, labels=labelled(r, c), hard_weight=0.4, soft_weight=0.6),
        ),
        (
            "mask_and_hard",
            lambda r, c: base(r, c, mask=masked(r, c), labels=labelled(r, c), hard_weight=1.0),
        ),
        ("ensemble", ensemble),
        (
            "ensemble_hard",
            lambda r, c: (*ensemble(r, c)[:2], dict(labels=labelled(r, c), hard_weight=0.5)),
        ),
        ("neg_inf_teacher", neg_inf_teacher),
        ("extreme_logits", extreme),
        ("non_contiguous", non_contiguous),
        ("no_t2", lambda r, c: base(r, c, scale_t2=False)),
        ("beta_0.1", lambda r, c: base(r, c, beta=0.1)),
    ]


OPTION_CASES = _option_cases()


# Reverse KL is +inf against -inf teacher logits: test_neg_inf_teacher_semantics covers it.
OPTION_TABLE = [
    pytest.param(kind, build, id=f"{name}-{kind}")
    for name, build in OPTION_CASES
    for kind in KINDS
    if not (name == "neg_inf_teacher" and kind == "reverse_kl")
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("kind", "build"), OPTION_TABLE)
def test_matches_reference_for_every_option(backend, reduction, kind, build):
    student, teacher, options = build(9, 13)
    device = device_for(backend)
    options = {k: v.to(device) if torch.is_tensor(v) else v for k, v in options.items()}
    assert_matches_reference(
        backend,
        student.to(device),
        teacher.to(device),
        temperature=1.5,
        kind=kind,
        reduction=reduction,
        **options,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_gpt2_vocabulary(kind, dtype):
    """7 x 50257 (GPT-2 vocabulary): long rows on the C++ backend."""
    student, teacher = logits(7, 50257, dtype=dtype), logits(7, 50257, dtype=dtype)
    labels = torch.randint(0, 50257, (7,))
    assert_matches_reference(
        "cpu", student, teacher, temperature=2.0, kind=kind, labels=labels, hard_weight=0.5
    )


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_online_softmax_over_many_column_chunks(monkeypatch, backend, kind, dtype):
    """Rows spanning many column chunks exercise the online max / sum-exp merge."""
    from kd_kernels.triton import kd_loss as triton_kd_loss

    monkeypatch.setattr(triton_kd_loss, "MAX_BLOCK_COLUMNS", 64)
    device = device_for("triton")
    student = logits(6, 1000, dtype=dtype, device=device)
    teacher = logits(2, 6, 1000, dtype=dtype, device=device)
    teacher[0, :, 10:500] = float("-inf")  # a chunk of the row is all -inf for one teacher
    labels = torch.tensor([3, -100, 999, 0, 512, 7], device=device)
    assert_matches_reference(
        backend, student, teacher, temperature=3.0, kind=kind, labels=labels, hard_weight=0.3
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_counted_row_gives_zero_loss_and_zero_grad(backend, reduction):
    device = device_for(backend)
    student = logits(4, 6, device=device)
    student[1] = float("nan")  # uncounted rows may hold anything
    labels = torch.full((4,), -100, device=device)
    loss, grad = loss_and_grad(
        backend,
        student,
        logits(4, 6, device=device),
        labels=labels,
        mask=torch.ones(4, dtype=torch.bool, device=device),
        hard_weight=1.0,
        reduction=reduction,
    )
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", [*BACKENDS, "torch"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_or_inf_row_gives_nan_for_that_row_only(backend, bad_value, where):
    device = device_for(backend)
    student, teacher = logits(3, 8, device=device), logits(3, 8, device=device)
    (student if where == "student" else teacher)[1, 4] = bad_value
    loss, grad = loss_and_grad(backend, student, teacher, reduction="none", temperature=2.0)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2]]).all()


@pytest.mark.parametrize("backend", [*BACKENDS, "torch"])
@pytest.mark.parametrize("kind", KINDS)
def test_neg_inf_teacher_semantics(backend, kind):
    """-inf teacher logits: p_T = 0 and 0 log 0 = 0; reverse KL is +inf there (p_S > 0)."""
    device = device_for(backend)
    student, teacher = logits(2, 6, device=device), logits(2, 6, device=device)
    teacher[:, :3] = float("-inf")
    loss = kdk.kd_loss(student, teacher, kind=kind, reduction="none", backend=backend)
    if kind == "reverse_kl":
        assert torch.isinf(loss).all() and (loss > 0).all()
    else:
        assert torch.isfinite(loss).all() and (loss >= -1e-6).all()


@pytest.mark.parametrize("backend", [*BACKENDS, "torch"])
def test_neg_inf_student_where_teacher_has_mass_gives_inf_kl(backend):
    device = device_for(backend)
    student, teacher = logits(2, 6, device=device), logits(2, 6, device=device)
    student[0, 2] = float("-inf")
    loss = kdk.kd_loss(student, teacher, reduction="none", backend=backend)
    assert loss[0] == float("inf") and torch.isfinite(loss[1])


@pytest.mark.parametrize("backend", [*BACKENDS, "torch"])
def test_all_neg_inf_teacher_row_is_nan(backend):
    device = device_for(backend)
    teacher = logits(2, 6, device=device)
    teacher[0] = float("-inf")
    loss = kdk.kd_loss(logits(2, 6, device=device), teacher, reduction="none", backend=backend)
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])


@pytest.mark.parametrize("backend", [*BACKENDS, "torch"])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_at_beta_0_and_1_is_zero_even_where_probabilities_underflow(backend, beta):
    """beta = 0 or 1 makes m one of the two distributions: JSD is exactly 0, never 0 * inf."""
    device = device_for(backend)
    student = torch.tensor([[200.0, 0.0, -200.0], [0.0, 1.0, 2.0]], device=device)
    teacher = torch.tensor([[-200.0, 0.0, 200.0], [2.0, 1.0, 0.0]], device=device)
    loss, grad = loss_and_grad(backend, student, teacher, kind="jsd", beta=beta, reduction="none")
    torch.testing.assert_close(loss, torch.zeros_like(loss), rtol=0, atol=1e-6)
    assert torch.isfinite(grad).all() and grad.abs().max() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_inplace_grad_writes_gradient_into_the_logits(backend, reduction):
    device = device_for(backend)
    base = logits(5, 40, device=device, dtype=torch.bfloat16)
    teacher = logits(5, 40, device=device, dtype=torch.bfloat16)
    ref_loss, ref_grad = loss_and_grad("torch", base, teacher, reduction=reduction, kind="jsd")

    leaf = base.clone().requires_grad_(True)
    student = leaf * 1  # a non-leaf, like an LM head's output
    loss = kdk.kd_loss(
        student, teacher, reduction=reduction, kind="jsd", backend=backend, inplace_grad=True
    )
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (loss * weights).sum().backward(retain_graph=True)
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOLERANCE[torch.bfloat16])
    torch.testing.assert_close(
        leaf.grad.float(), ref_grad.float(), **GRAD_TOLERANCE[torch.bfloat16]
    )
    # The gradient lives in the logits' own storage.
    torch.testing.assert_close(
        student.detach().float(), ref_grad.float(), **GRAD_TOLERANCE[torch.bfloat16]
    )
    with pytest.raises(RuntimeError, match="only once"):
        (loss * weights).sum().backward()


def test_inplace_grad_rejects_leaf_logits():
    student = logits(2, 4).requires_grad_(True)
    with pytest.raises(ValueError, match="leaf"):
        kdk.kd_loss(student, logits(2, 4), inplace_grad=True, backend=BACKENDS[0])


def test_inplace_grad_protects_logits_saved_by_another_op():
    """Autograd's version counter turns reuse of the overwritten logits into an error."""
    leaf = logits(3, 4).requires_grad_(True)
    student = leaf * 1
    squares = (student * student).sum()  # mul saves student for its backward
    loss = kdk.kd_loss(student, logits(3, 4), inplace_grad=True, backend="cpu")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + squares).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_call_skips_the_gradient_and_matches(backend):
    device = device_for(backend)
    student, teacher = logits(4, 9, device=device), logits(4, 9, device=device)
    with torch.no_grad():
        loss = kdk.kd_loss(student, teacher, kind="reverse_kl", backend=backend)
    expected = kdk.kd_loss(student, teacher, kind="reverse_kl", backend="torch")
    torch.testing.assert_close(loss, expected, **LOSS_TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", [*BACKENDS, "torch"])
def test_teacher_gets_no_gradient(backend):
    device = device_for(backend)
    student = logits(3, 5, device=device).requires_grad_(True)
    teacher = logits(3, 5, device=device).requires_grad_(True)
    kdk.kd_loss(student, teacher, backend=backend).backward()
    assert student.grad is not None and teacher.grad is None


def test_module_wrapper_matches_functional():
    student, teacher = logits(4, 6), logits(4, 6)
    labels = torch.tensor([0, 1, -100, 5])
    module = kdk.nn.KDLoss(temperature=3.0, kind="soft_ce", hard_weight=0.5)
    expected = kdk.kd_loss(
        student, teacher, temperature=3.0, kind="soft_ce", labels=labels, hard_weight=0.5
    )
    torch.testing.assert_close(module(student, teacher, labels=labels), expected)
    assert "soft_ce" in repr(module)


def test_auto_backend_uses_the_cpu_kernel_for_cpu_tensors():
    assert "cpu" in kdk.available_backends() and "torch" in kdk.available_backends()
    from kd_kernels._backend import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "cpu"
    assert resolve_backend("auto", torch.device("cpu"), torch.float64) == "cpu"
    assert resolve_backend("auto", torch.device("cuda"), torch.float64) == "torch"
