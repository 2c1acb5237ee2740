"""fused_linear_kd_loss against the unfused spec kd_loss(h @ W.T + b, teacher), loss and the
gradients of h, W and b, over backend x dtype x kind x chunking, and every option."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import GRAD_TOLERANCE, LOSS_TOLERANCE, cpu_backends, device_for

import kd_kernels as kdk
from kd_kernels import _chunked_kd, fused_linear, reference

BACKENDS = cpu_backends()
KINDS = reference.KD_KINDS
# N = 10 rows, V = 40 classes: 5 and 8 divide them, 4 and 7 do not.
ROWS, HIDDEN, VOCAB = 10, 16, 40
CHUNKS = [None, 5, 4, (5, 8), (4, 7), (3, 1)]


def head(rows=ROWS, hidden=HIDDEN, vocab=VOCAB, dtype=torch.float32, device="cpu", bias=True):
    """Student hidden states (rows, hidden) or (*rows, hidden), weight and bias, logits ~ 3."""
    shape = rows if isinstance(rows, tuple) else (rows,)
    h = torch.randn(*shape, hidden)
    w = torch.randn(vocab, hidden) * 3 / math.sqrt(hidden)
    b = torch.randn(vocab) if bias else None
    return tuple(None if x is None else x.to(device, dtype) for x in (h, w, b))


def losses_and_grads(fn, h, w, b, grad_seed=1):
    """fn(h, w, b) -> loss; the loss and d(loss . r)/d(h, w, b) for a fixed random r."""
    inputs = [None if x is None else x.detach().clone().requires_grad_(True) for x in (h, w, b)]
    loss = fn(*inputs)
    r = torch.rand(loss.shape, generator=torch.Generator().manual_seed(grad_seed))
    wrt = [x for x in inputs if x is not None]
    grads = torch.autograd.grad((loss * r.to(loss.device)).sum(), wrt)
    return loss.detach(), grads


def spec(teacher, **options):
    """The unfused composition in the reference backend."""
    return lambda h, w, b: kdk.kd_loss(F.linear(h, w, b), teacher, backend="torch", **options)


def fused(backend, chunk_size, teacher=None, **options):
    return lambda h, w, b: kdk.fused_linear_kd_loss(
        h, w, teacher, student_bias=b, chunk_size=chunk_size, backend=backend, **options
    )


def assert_matches(actual, expected, dtype):
    (loss, grads), (ref_loss, ref_grads) = actual, expected
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss, ref_loss, **LOSS_TOLERANCE[dtype])
    tolerance = GRAD_TOLERANCE[dtype]
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert grad.dtype == dtype
        # Weight gradients sum over rows: compare on the scale of the largest entry.
        atol = tolerance["atol"] + tolerance["rtol"] * ref_grad.float().abs().max().item()
        torch.testing.assert_close(
            grad.float(), ref_grad.float(), rtol=tolerance["rtol"], atol=atol
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", CHUNKS, ids=str)
def test_matches_unfused_over_chunks_dtypes_and_kinds(backend, dtype, kind, chunk_size):
    device = device_for(backend)
    h, w, b = head(dtype=dtype, device=device)
    teacher = (torch.randn(ROWS, VOCAB) * 3).to(device, dtype)
    options = dict(temperature=2.0, kind=kind, beta=0.3)
    expected = losses_and_grads(spec(teacher, **options), h, w, b)
    actual = losses_and_grads(fused(backend, chunk_size, teacher, **options), h, w, b)
    assert_matches(actual, expected, dtype)


def _labels(rows, vocab):
    labels = torch.randint(0, vocab, rows if isinstance(rows, tuple) else (rows,))
    labels.view(-1)[::3] = -100
    return labels


def _mask(rows):
    mask = torch.rand(rows if isinstance(rows, tuple) else (rows,)) > 0.4
    mask.view(-1)[0] = True
    return mask


# (id, options(rows) -> kd options shared by both sides)
OPTION_CASES = [
    ("mask", lambda rows: dict(mask=_mask(rows))),
    ("labels-hard", lambda rows: dict(labels=_labels(rows, VOCAB), hard_weight=0.7)),
    (
        "all-options",
        lambda rows: dict(
            mask=_mask(rows),
            labels=_labels(rows, VOCAB),
            hard_weight=0.3,
            soft_weight=0.5,
            beta=0.8,
            scale_t2=False,
            temperature=0.7,
        ),
    ),
    *[(f"reduction-{r}", lambda rows, r=r: dict(reduction=r)) for r in reference.KD_REDUCTIONS],
    (
        "masked-none",
        lambda rows: dict(reduction="none", mask=_mask(rows), labels=_labels(rows, VOCAB)),
    ),
    ("all-rows-masked", lambda rows: dict(mask=torch.zeros(rows, dtype=torch.bool))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [4, (4, 7)], ids=str)
@pytest.mark.parametrize("case", [c[1] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_options_match_unfused(backend, kind, chunk_size, case):
    rows = (2, 5)  # (batch, sequence) rows
    h, w, b = head(rows=rows)
    teacher = torch.randn(*rows, VOCAB) * 3
    options = {"temperature": 2.0, "kind": kind, **case(rows)}
    expected = losses_and_grads(spec(teacher, **options), h, w, b)
    actual = losses_and_grads(fused(backend, chunk_size, teacher, **options), h, w, b)
    assert_matches(actual, expected, torch.float32)


def _ensemble(rows):
    return {"teacher_logits": torch.randn(3, *rows, VOCAB) * 3}, None


def _teacher_head(rows):
    teacher_hidden = torch.randn(*rows, 24, dtype=torch.float64)
    teacher_weight = torch.randn(VOCAB, 24, dtype=torch.float64) * 0.6
    teacher_bias = torch.randn(VOCAB, dtype=torch.float64)
    dense = F.linear(teacher_hidden, teacher_weight, teacher_bias).float()
    given = dict(
        teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias
    )
    return given, dense


def _topk(remainder):
    def make(rows):
        logits = torch.randn(*rows, VOCAB) * 3
        indices = logits.topk(6, dim=-1).indices
        logprobs = logits.log_softmax(dim=-1).gather(-1, indices)
        dense = reference.topk_teacher_logits(indices, logprobs, VOCAB, remainder)
        return {"teacher_topk": (indices, logprobs), "topk_remainder": remainder}, dense

    return make


TEACHER_FORMS = [
    ("ensemble", _ensemble),
    ("teacher-head", _teacher_head),
    ("topk-renormalize", _topk("renormalize")),
    ("topk-spread", _topk("spread")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [None, 4, (4, 7)], ids=str)
@pytest.mark.parametrize("form", [f[1] for f in TEACHER_FORMS], ids=[f[0] for f in TEACHER_FORMS])
def test_teacher_forms_match_their_dense_teacher(backend, kind, chunk_size, form):
    rows = (2, 5)
    h, w, b = head(rows=rows)
    given, dense = form(rows)
    if dense is None:
        dense = given["teacher_logits"]
    labels = _labels(rows, VOCAB)
    options = dict(temperature=2.0, kind=kind, labels=labels, hard_weight=0.2)
    if kind == "reverse_kl" and given.get("topk_remainder") == "renormalize":
        options["kind"] = "jsd"  # reverse KL to a top-k-only teacher is +inf
    expected = losses_and_grads(spec(dense, **options), h, w, b)

    def fn(h, w, b):
        return kdk.fused_linear_kd_loss(
            h, w, student_bias=b, chunk_size=chunk_size, backend=backend, **given, **options
        )

    assert_matches(losses_and_grads(fn, h, w, b), expected, torch.float32)


@pytest.mark.parametrize("chunk_size", [3, (3, 4)], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gradcheck_float64(chunk_size, kind, reduction):
    h, w, b = head(rows=5, hidden=3, vocab=9, dtype=torch.float64)
    teacher = torch.randn(5, 9, dtype=torch.float64) * 2
    labels = torch.tensor([1, -100, 8, 0, 4])

    def fn(h, w, b):
        return kdk.fused_linear_kd_loss(
            h,
            w,
            teacher,
            student_bias=b,
            kind=kind,
            temperature=1.5,
            labels=labels,
            hard_weight=0.4,
            reduction=reduction,
            chunk_size=chunk_size,
            backend="cpu",
        )

    inputs = [x.requires_grad_(True) for x in (h, w, b)]
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [4, (4, 7)], ids=str)
def test_uncounted_rows_never_reach_loss_or_gradients(backend, chunk_size):
    h, w, b = head()
    teacher = torch.randn(ROWS, VOCAB) * 3
    mask = torch.ones(ROWS, dtype=torch.bool)
    mask[[2, 7]] = False
    h_nan, teacher_nan = h.clone(), teacher.clone()
    h_nan[[2, 7]] = math.nan
    teacher_nan[7] = math.nan
    keep = mask.nonzero().squeeze(1)
    expected = losses_and_grads(spec(teacher[keep]), h[keep], w, b)
    loss, (grad_h, grad_w, grad_b) = losses_and_grads(
        fused(backend, chunk_size, teacher_nan, mask=mask), h_nan, w, b
    )
    assert torch.isfinite(loss) and (grad_h[~mask] == 0).all()
    assert_matches((loss, (grad_h[keep], grad_w, grad_b)), expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [4, (4, 7)], ids=str)
def test_nan_in_a_counted_row_gives_nan(backend, chunk_size):
    h, w, b = head()
    h[3, 0] = math.nan
    loss = fused(backend, chunk_size, torch.randn(ROWS, VOCAB), reduction="none")(h, w, b)
    assert torch.isnan(loss[3]) and torch.isfinite(loss[torch.arange(ROWS) != 3]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [4, (4, 7)], ids=str)
def test_only_inputs_that_require_grad_get_one(backend, chunk_size):
    h, w, b = head()
    teacher = torch.randn(ROWS, VOCAB) * 3
    h.requires_grad_(True)
    loss = kdk.fused_linear_kd_loss(
        h, w, teacher, student_bias=b, chunk_size=chunk_size, backend=backend
    )
    (grad_h,) = torch.autograd.grad(loss, h)
    h_ref = h.detach().clone().requires_grad_(True)
    ref = kdk.kd_loss(F.linear(h_ref, w, b), teacher, backend="torch")
    (ref_grad_h,) = torch.autograd.grad(ref, h_ref)
    torch.testing.assert_close(grad_h, ref_grad_h, **GRAD_TOLERANCE[torch.float32])
    with torch.no_grad():
        torch.testing.assert_close(
            kdk.fused_linear_kd_loss(h, w, teacher, student_bias=b, chunk_size=chunk_size),
            ref.detach(),
            **LOSS_TOLERANCE[torch.float32],
        )


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_backward_can_run_again_with_retain_graph(reduction):
    """Scalar reductions hand their gradient buffers to the first backward; a second one
    recomputes them. Both equal the unfused gradient, scaled by grad_output."""
    h, w, _ = head()
    teacher = torch.randn(ROWS, VOCAB) * 3
    h.requires_grad_(True)
    loss = kdk.fused_linear_kd_loss(h, w, teacher, reduction=reduction, chunk_size=4).sum()
    (first,) = torch.autograd.grad(2 * loss, h, retain_graph=True)
    (second,) = torch.autograd.grad(3 * loss, h)
    ref_h = h.detach().clone().requires_grad_(True)
    ref = kdk.kd_loss(F.linear(ref_h, w), teacher, reduction=reduction).sum()
    (ref_grad,) = torch.autograd.grad(ref, ref_h)
    torch.testing.assert_close(first, 2 * ref_grad, **GRAD_TOLERANCE[torch.float32])
    torch.testing.assert_close(second, 3 * ref_grad, **GRAD_TOLERANCE[torch.float32])


@pytest.mark.parametrize(
    "chunk_size, rows, vocab", [(None, 10, 40), (4, 4, 40), ((3, 7), 3, 7), ((100, 100), 10, 40)]
)
def test_no_matmul_is_larger_than_a_chunk(monkeypatch, chunk_size, rows, vocab):
    """The logits are made chunk by chunk: every F.linear output is at most rows x vocab."""
    shapes = []
    linear = F.linear

    def recording_linear(*args):
        out = linear(*args)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(_chunked_kd.F, "linear", recording_linear)
    h, w, _ = head()
    teacher_hidden, teacher_weight = torch.randn(ROWS, 8), torch.randn(VOCAB, 8)
    loss = kdk.fused_linear_kd_loss(
        h.requires_grad_(True),
        w,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        chunk_size=chunk_size,
    )
    loss.backward()
    assert shapes and all(s[0] <= rows and s[1] <= vocab for s in shapes)
    assert (rows, vocab) in shapes


def test_default_chunks_bound_the_logits_and_cut_the_vocabulary_only_when_huge():
    cpu = torch.device("cpu")
    assert fused_linear._chunk_sizes(None, 8192, 128256, cpu) == (130, 128256)
    assert fused_linear._chunk_sizes(None, 10, 128256, cpu) == (10, 128256)
    assert fused_linear._chunk_sizes(None, 4096, 2, cpu) == (4096, 2)
    rows, vocab = fused_linear._chunk_sizes(None, 4096, 2**20, cpu)
    assert rows == 32 and vocab == 2**24 // 32
    assert fused_linear._chunk_sizes((7, None), 5, 40, cpu) == (5, 40)


def test_module_wrapper_matches_function():
    h, w, b = head()
    teacher = torch.randn(ROWS, VOCAB) * 3
    module = kdk.nn.FusedLinearKDLoss(temperature=2.0, kind="jsd", chunk_size=4)
    torch.testing.assert_close(
        module(h, w, teacher, student_bias=b),
        kdk.fused_linear_kd_loss(h, w, teacher, student_bias=b, temperature=2.0, kind="jsd"),
    )
    assert "chunk_size=4" in repr(module)


def _bad(**changes):
    h, w, b = head()
    args = dict(
        student_hidden=h,
        student_weight=w,
        teacher_logits=torch.randn(ROWS, VOCAB),
        student_bias=b,
    )
    args.update(changes)
    return args


BAD_INPUTS = [
    ("hidden not a tensor", _bad(student_hidden=[1.0]), TypeError, "student_hidden"),
    (
        "int hidden",
        _bad(student_hidden=torch.ones(ROWS, HIDDEN, dtype=torch.long)),
        TypeError,
        "float",
    ),
    ("0-d hidden", _bad(student_hidden=torch.tensor(1.0)), ValueError, "0-d"),
    ("weight width", _bad(student_weight=torch.randn(VOCAB, HIDDEN + 1)), ValueError, r"\(V, H\)"),
    ("weight 1-d", _bad(student_weight=torch.randn(VOCAB)), ValueError, r"\(V, H\)"),
    (
        "empty vocabulary",
        _bad(student_weight=torch.randn(0, HIDDEN), teacher_logits=torch.randn(ROWS, 0)),
        ValueError,
        "V >= 1",
    ),
    (
        "weight dtype",
        _bad(student_weight=torch.randn(VOCAB, HIDDEN, dtype=torch.float64)),
        TypeError,
        "share a dtype",
    ),
    ("bias shape", _bad(student_bias=torch.randn(VOCAB + 1)), ValueError, r"\(V,\)"),
    (
        "teacher vocabulary",
        _bad(teacher_logits=torch.randn(ROWS, VOCAB + 1)),
        ValueError,
        "teacher_logits must have",
    ),
    (
        "teacher rows",
        _bad(teacher_logits=torch.randn(ROWS + 1, VOCAB)),
        ValueError,
        "teacher_logits must have",
    ),
    (
        "teacher dtype",
        _bad(teacher_logits=torch.randn(ROWS, VOCAB, dtype=torch.float64)),
        TypeError,
        "share a dtype",
    ),
    ("no teacher", _bad(teacher_logits=None), ValueError, "exactly one teacher"),
    (
        "two teachers",
        _bad(teacher_topk=(torch.zeros(ROWS, 2, dtype=torch.long), torch.zeros(ROWS, 2))),
        ValueError,
        "exactly one teacher",
    ),
    (
        "head without weight",
        _bad(teacher_logits=None, teacher_hidden=torch.randn(ROWS, 8)),
        ValueError,
        "both teacher_hidden and teacher_weight",
    ),
    (
        "teacher head vocabulary",
        _bad(
            teacher_logits=None,
            teacher_hidden=torch.randn(ROWS, 8),
            teacher_weight=torch.randn(VOCAB - 1, 8),
        ),
        ValueError,
        "classes",
    ),
    (
        "teacher head width",
        _bad(
            teacher_logits=None,
            teacher_hidden=torch.randn(ROWS, 8),
            teacher_weight=torch.randn(VOCAB, 9),
        ),
        ValueError,
        "teacher_weight",
    ),
    (
        "teacher head rows",
        _bad(
            teacher_logits=None,
            teacher_hidden=torch.randn(ROWS + 2, 8),
            teacher_weight=torch.randn(VOCAB, 8),
        ),
        ValueError,
        "teacher_hidden",
    ),
    (
        "topk out of range",
        _bad(
            teacher_logits=None,
            teacher_topk=(torch.tensor([[0, VOCAB]] * ROWS), torch.log(torch.full((ROWS, 2), 0.4))),
        ),
        ValueError,
        r"\[0, 40\)",
    ),
    ("temperature", _bad(temperature=0.0), ValueError, "temperature"),
    ("kind", _bad(kind="kl2"), ValueError, "kind"),
    ("reduction", _bad(reduction="avg"), ValueError, "reduction"),
    ("labels range", _bad(labels=torch.full((ROWS,), VOCAB)), ValueError, "labels must lie"),
    ("labels shape", _bad(labels=torch.zeros(ROWS + 1, dtype=torch.long)), ValueError, "labels"),
    ("complex mask", _bad(mask=torch.ones(ROWS) * 1j), TypeError, "mask"),
    ("hard weight without labels", _bad(hard_weight=1.0), ValueError, "needs labels"),
    ("chunk zero", _bad(chunk_size=0), ValueError, ">= 1"),
    ("chunk vocab zero", _bad(chunk_size=(4, 0)), ValueError, ">= 1"),
    ("chunk float", _bad(chunk_size=2.5), TypeError, "chunk_size"),
    ("chunk triple", _bad(chunk_size=(1, 2, 3)), TypeError, "chunk_size"),
    ("backend", _bad(backend="fast"), ValueError, "backend"),
    (
        "float64 on triton",
        _bad(
            student_hidden=torch.randn(ROWS, HIDDEN, dtype=torch.float64),
            student_weight=torch.randn(VOCAB, HIDDEN, dtype=torch.float64),
            student_bias=None,
            teacher_logits=torch.randn(ROWS, VOCAB, dtype=torch.float64),
            backend="triton",
        ),
        (TypeError, ValueError),
        "float64|triton",
    ),
]


@pytest.mark.parametrize(
    "args, error, match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_refused_with_a_clear_error(args, error, match):
    with pytest.raises(error, match=match):
        kdk.fused_linear_kd_loss(**args)


def test_empty_batch_gives_zero_loss_and_zero_gradients():
    h, w, b = head(rows=0)
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss = kdk.fused_linear_kd_loss(h, w, torch.randn(0, VOCAB), student_bias=b, chunk_size=4)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    assert loss.item() == 0 and grad_h.shape == (0, HIDDEN) and (grad_w == 0).all()
