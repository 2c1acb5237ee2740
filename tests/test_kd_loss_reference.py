"""The kd_loss reference itself: gradcheck in fp64, and agreement with independent formulations
(torch's F.kl_div and F.cross_entropy, TextBrewer's kd_ce_loss)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import textbrewer_losses

import kd_kernels as kdk
from kd_kernels import reference


def fp64_inputs(rows=4, classes=6, teachers=None):
    student = torch.randn(rows, classes, dtype=torch.float64, requires_grad=True)
    shape = (rows, classes) if teachers is None else (teachers, rows, classes)
    return student, torch.randn(*shape, dtype=torch.float64)


GRADCHECK_OPTIONS = [
    dict(),
    dict(reduction="sum", temperature=3.0),
    dict(reduction="mean", scale_t2=False),
    dict(reduction="none", mask=torch.tensor([True, False, True, True])),
    dict(labels=torch.tensor([1, -100, 5, 0]), hard_weight=0.7, soft_weight=0.3),
    dict(beta=0.2, temperature=0.5),
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("teachers", [None, 3])
@pytest.mark.parametrize("kind", reference.KD_KINDS)
@pytest.mark.parametrize("options", GRADCHECK_OPTIONS, ids=range(len(GRADCHECK_OPTIONS)))
def test_gradcheck_fp64(backend, teachers, kind, options):
    """gradcheck of the reference, and of the C++ kernel (which computes in fp64 for fp64)."""
    student, teacher = fp64_inputs(teachers=teachers)

    def loss(s):
        return kdk.kd_loss(s, teacher, kind=kind, backend=backend, **options)

    assert torch.autograd.gradcheck(loss, (student,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_kl_matches_torch_kl_div(temperature, reduction):
    student, teacher = fp64_inputs()
    t = temperature
    with warnings.catch_warnings():  # kl_div warns that its "mean" is not batchmean: known
        warnings.simplefilter("ignore", UserWarning)
        expected = (
            F.kl_div(
                F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction=reduction
            )
            * t
            * t
        )
    got = reference.kd_loss(student, teacher, temperature=t, reduction=reduction)
    torch.testing.assert_close(got, expected)


def test_reverse_kl_and_jsd_match_kl_div_compositions():
    student, teacher = fp64_inputs()
    log_p_s, log_p_t = F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1)
    # KL(p_S || p_T) through kl_div's (input=log q, target=log p) convention.
    reverse = F.kl_div(log_p_t, log_p_s, log_target=True, reduction="batchmean")
    torch.testing.assert_close(
        reference.kd_loss(student, teacher, temperature=2.0, kind="reverse_kl", scale_t2=False),
        reverse,
    )
    beta = 0.3
    log_m = torch.log(beta * log_p_t.exp() + (1 - beta) * log_p_s.exp())
    jsd = beta * F.kl_div(log_m, log_p_t, log_target=True, reduction="batchmean") + (
        1 - beta
    ) * F.kl_div(log_m, log_p_s, log_target=True, reduction="batchmean")
    torch.testing.assert_close(
        reference.kd_loss(student, teacher, temperature=2.0, kind="jsd", beta=beta, scale_t2=False),
        jsd,
    )


def test_soft_ce_and_hard_ce_match_cross_entropy():
    student, teacher = fp64_inputs()
    labels = torch.tensor([2, -100, 0, 5])
    t = 3.0
    soft = F.cross_entropy(student / t, F.softmax(teacher / t, -1), reduction="none") * t * t
    hard = F.cross_entropy(student, labels, ignore_index=-100, reduction="none")
    counted = labels != -100
    expected = (0.25 * soft + 0.75 * hard)[counted].mean()
    got = reference.kd_loss(
        student,
        teacher,
        temperature=t,
        kind="soft_ce",
        labels=labels,
        hard_weight=0.75,
        soft_weight=0.25,
    )
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("temperature", [1.0, 8.0])
def test_soft_ce_matches_textbrewer_kd_ce_loss(temperature):
    losses = textbrewer_losses()
    student, teacher = fp64_inputs(rows=5, classes=3)
    expected = losses.kd_ce_loss(student, teacher, temperature=temperature)
    got = reference.kd_loss(
        student, teacher, temperature=temperature, kind="soft_ce", scale_t2=False
    )
    torch.testing.assert_close(got, expected)


def test_ensemble_averages_probabilities_not_logits():
    student, teacher = fp64_inputs(teachers=2)
    mean_probs = F.softmax(teacher, -1).mean(0)
    expected = F.kl_div(F.log_softmax(student, -1), mean_probs, reduction="batchmean")
    torch.testing.assert_close(reference.kd_loss(student, teacher), expected)


def test_three_dimensional_batchmean_counts_every_token_row():
    student, teacher = torch.randn(2, 3, 7, dtype=torch.float64), torch.randn(2, 3, 7).double()
    expected = F.kl_div(
        F.log_softmax(student.reshape(6, 7), -1),
        F.softmax(teacher.reshape(6, 7), -1),
        reduction="batchmean",
    )
    torch.testing.assert_close(reference.kd_loss(student, teacher), expected)
