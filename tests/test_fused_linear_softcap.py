"""fused_linear_kd_loss with today's LM heads (issue 17): soft-capped (Gemma 2/3) and scaled
(Cohere) final logits of the student and of a teacher head, inside the chunk loop, against the
heads' own forwards written out."""

import pytest
import torch
from conftest import GRAD_TOLERANCE, LOSS_TOLERANCE, cpu_backends, device_for

import kd_kernels as kdk
from kd_kernels import reference

BACKENDS = cpu_backends()
CHUNKS = {"rows": 4, "vocab": (4, 7)}
TRANSFORMS = {
    "softcap": dict(softcap=4.0),
    "scale": dict(logit_scale=0.6),
    "both": dict(softcap=4.0, logit_scale=1.7),
    "teacher": dict(teacher_softcap=3.0, teacher_logit_scale=1.3),
    "all": dict(softcap=4.0, logit_scale=0.6, teacher_softcap=3.0, teacher_logit_scale=1.3),
}


def model_logits(hidden, weight, bias, softcap=None, logit_scale=None):
    """What the model's forward returns: Cohere scales, Gemma caps (cap tanh(z / cap))."""
    z = hidden @ weight.T + (0 if bias is None else bias)
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _inputs(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    h, w, b = (
        torch.randn(6, 8, generator=g),
        torch.randn(30, 8, generator=g),
        torch.randn(30, generator=g),
    )
    th, tw = torch.randn(6, 5, generator=g), torch.randn(30, 5, generator=g)
    labels = torch.randint(0, 30, (6,), generator=g)
    return [
        x.to(device, dtype) if x.is_floating_point() else x.to(device)
        for x in (h, w, b, th, tw, labels)
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", list(CHUNKS), ids=list(CHUNKS))
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("kind", reference.KD_KINDS)
def test_transformed_heads_match_their_forwards(backend, chunk, transform, kind):
    device = device_for(backend)
    h, w, b, th, tw, labels = _inputs(device)
    options = TRANSFORMS[transform]
    student_opts = {k: v for k, v in options.items() if not k.startswith("teacher_")}
    teacher_opts = {k[len("teacher_") :]: v for k, v in options.items() if k.startswith("teacher_")}
    common = dict(temperature=2.0, kind=kind, labels=labels, hard_weight=0.3)

    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    loss = kdk.fused_linear_kd_loss(
        hh,
        ww,
        student_bias=bb,
        teacher_hidden=th,
        teacher_weight=tw,
        chunk_size=CHUNKS[chunk],
        backend=backend,
        **options,
        **common,
    )
    grads = torch.autograd.grad(loss, (hh, ww, bb))

    rh, rw, rb = (x.clone().requires_grad_() for x in (h, w, b))
    teacher = model_logits(th, tw, None, **teacher_opts)
    expected = kdk.kd_loss(
        model_logits(rh, rw, rb, **student_opts), teacher, backend="torch", **common
    )
    expected_grads = torch.autograd.grad(expected, (rh, rw, rb))
    torch.testing.assert_close(loss, expected, **LOSS_TOLERANCE[torch.float32])
    for grad, ref in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, ref, **GRAD_TOLERANCE[torch.float32])


def test_softcap_changes_the_loss():
    """The transform is not a no-op on these inputs (logits well past the cap)."""
    h, w, _, th, tw, _ = _inputs("cpu")
    plain = kdk.fused_linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw)
    capped = kdk.fused_linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw, softcap=2.0)
    assert abs(plain.item() - capped.item()) > 0.1 * abs(plain.item())


def test_reference_form_passes_gradcheck_in_fp64():
    """Student and teacher transforms, hard term included; small so that gradcheck is quick."""
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(3, 4, generator=g), 3 * torch.randn(7, 4, generator=g)
    th, tw = torch.randn(3, 3, generator=g), 3 * torch.randn(7, 3, generator=g)
    h, w, th, tw = (x.double() for x in (h, w, th, tw))
    labels = torch.tensor([1, 6, 0])

    def loss(hidden, weight):
        return kdk.fused_linear_kd_loss(
            hidden,
            weight,
            teacher_hidden=th,
            teacher_weight=tw,
            labels=labels,
            hard_weight=0.5,
            temperature=1.5,
            backend="torch",
            **TRANSFORMS["all"],
        )

    inputs = (h.requires_grad_(), w.requires_grad_())
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(softcap=float("inf")), ValueError, "softcap"),
        (dict(logit_scale=0), ValueError, "logit_scale"),
        (dict(softcap=True), TypeError, "softcap"),
        (dict(logit_scale="2"), TypeError, "logit_scale"),
        (dict(teacher_softcap=float("nan")), ValueError, "teacher_softcap"),
    ],
    ids=["cap_zero", "cap_negative", "cap_inf", "scale_zero", "cap_bool", "scale_str", "nan"],
)
def test_bad_transforms_are_refused(options, error, match):
    h, w, _, th, tw, _ = _inputs("cpu")
    with pytest.raises(error, match=match):
        kdk.fused_linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw, **options)


def test_teacher_transform_needs_a_teacher_head():
    h, w, *_ = _inputs("cpu")
    with pytest.raises(ValueError, match="teacher head"):
        kdk.fused_linear_kd_loss(h, w, torch.randn(6, 30), teacher_softcap=3.0)


@pytest.mark.parametrize("transform", ["softcap", "logit_scale", "teacher_softcap"])
def test_transforms_with_process_group_are_not_implemented(transform):
    """Refused before the group is used, so a stand-in group object suffices here."""
    h, w, _, th, tw, _ = _inputs("cpu")
    with pytest.raises(NotImplementedError, match="process_group"):
        kdk.fused_linear_kd_loss(
            h, w, teacher_hidden=th, teacher_weight=tw, process_group=object(),
            **{transform: 2.0},
        )  # fmt: skip
