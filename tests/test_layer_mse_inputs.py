"""attention_mse_loss / hidden_mse_loss on bad and edge-case input, and kdk.layer_map."""

import pytest
import torch
from conftest import cpu_backends, device_for
from layer_mse_checks import bert_scores, padding_mask

import kd_kernels as kdk

ALL_BACKENDS = [*cpu_backends(), "torch"]


def scores(*shape):
    return torch.randn(*shape)


BAD_ATTENTION_CASES = [
    ("pair_shape", lambda: ([scores(2, 2, 4, 4), scores(2, 2, 4, 4)],
                            [scores(2, 2, 4, 4), scores(2, 2, 5, 5)], {}),
     ValueError, r"layer 1: .*\(2, 2, 4, 4\).*\(2, 2, 5, 5\)"),
    ("layer_count", lambda: ([scores(2, 2, 4, 4)] * 2, [scores(2, 2, 4, 4)], {}),
     ValueError, "2 layers"),
    ("empty", lambda: ([], [], {}), ValueError, "empty"),
    ("not_tensor", lambda: ([[1.0]], [scores(1, 1, 1, 1)], {}), TypeError, "torch.Tensor"),
    ("int_tensor", lambda: (torch.ones(1, 1, 2, 2, dtype=torch.long),
                            torch.ones(1, 1, 2, 2, dtype=torch.long), {}), TypeError, "float"),
    ("dtype_mix", lambda: (scores(1, 1, 2, 2), scores(1, 1, 2, 2).double(), {}),
     TypeError, "dtype"),
    ("ndim", lambda: (scores(2, 4, 4), scores(2, 4, 4), {}), ValueError, "4-d"),
    ("mask_shape", lambda: (scores(2, 2, 4, 4), scores(2, 2, 4, 4),
                            {"attention_mask": torch.ones(2, 5)}), ValueError, r"\(2, 4\)"),
    ("mask_complex", lambda: (scores(2, 2, 4, 4), scores(2, 2, 4, 4),
                              {"attention_mask": torch.ones(2, 4) * 1j}), TypeError,
     "bool, integer or float"),
    ("mask_length", lambda: (scores(2, 2, 4, 4), scores(2, 2, 4, 4),
                             {"attention_mask": torch.ones(2, 5, dtype=torch.long)}),
     ValueError, r"\(2, 4\)"),
    ("mask_not_square", lambda: (scores(2, 2, 3, 4), scores(2, 2, 3, 4),
                                 {"attention_mask": torch.ones(2, 4, dtype=torch.long)}),
     ValueError, "Lq == Lk"),
    ("mask_device", lambda: (scores(2, 2, 4, 4), scores(2, 2, 4, 4),
                             {"attention_mask": torch.ones(2, 4, dtype=torch.bool,
                                                           device="meta")}),
     ValueError, "meta"),
    ("threshold_nan", lambda: (scores(1, 1, 2, 2), scores(1, 1, 2, 2),
                               {"threshold": float("nan")}), TypeError, "threshold"),
    ("threshold_str", lambda: (scores(1, 1, 2, 2), scores(1, 1, 2, 2), {"threshold": "-100"}),
     TypeError, "threshold"),
    ("layer_reduction", lambda: (scores(1, 1, 2, 2), scores(1, 1, 2, 2),
                                 {"layer_reduction": "batchmean"}), ValueError, "layer_reduction"),
    ("backend", lambda: (scores(1, 1, 2, 2), scores(1, 1, 2, 2), {"backend": "tpu"}),
     ValueError, "backend"),
]  # fmt: skip


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    ("build", "error", "message"),
    [case[1:] for case in BAD_ATTENTION_CASES],
    ids=[case[0] for case in BAD_ATTENTION_CASES],
)
def test_attention_bad_input(backend, build, error, message):
    student, teacher, options = build()
    options.setdefault("backend", backend)
    with pytest.raises(error, match=message):
        kdk.attention_mse_loss(student, teacher, **options)


BAD_HIDDEN_CASES = [
    ("pair_shape", (scores(2, 3, 4), scores(2, 3, 5), {}), ValueError, r"layer 0"),
    ("ndim", (scores(2, 3, 4, 1), scores(2, 3, 4, 1), {}), ValueError, "3-d"),
    ("mask_shape", (scores(2, 3, 4), scores(2, 3, 4),
                    {"attention_mask": torch.ones(3, 2, dtype=torch.long)}),
     ValueError, r"\(2, 3\)"),
    ("mask_complex", (scores(2, 3, 4), scores(2, 3, 4),
                      {"attention_mask": torch.ones(2, 3) * 1j}), TypeError,
     "bool, integer or float"),
    ("string", ("abc", scores(2, 3, 4), {}), TypeError, "sequence of tensors"),
]  # fmt: skip


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    ("case", "error", "message"),
    [case[1:] for case in BAD_HIDDEN_CASES],
    ids=[case[0] for case in BAD_HIDDEN_CASES],
)
def test_hidden_bad_input(backend, case, error, message):
    student, teacher, options = case
    with pytest.raises(error, match=message):
        kdk.hidden_mse_loss(student, teacher, backend=backend, **options)


def test_triton_refuses_fp64():
    if "triton" not in kdk.available_backends():
        pytest.skip("no triton backend on this machine")
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        kdk.attention_mse_loss(x, x, backend="triton")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_tokens_masked_gives_zero_not_nan(backend):
    device = device_for(backend)
    student = bert_scores(2, 2, 5, device=device).requires_grad_()
    hidden = torch.randn(2, 5, 3, device=device, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool, device=device)
    loss = kdk.attention_mse_loss(
        student, bert_scores(2, 2, 5, device=device), attention_mask=mask, backend=backend
    ) + kdk.hidden_mse_loss(hidden, torch.randn_like(hidden), attention_mask=mask, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert student.grad.abs().sum().item() == 0.0 and hidden.grad.abs().sum().item() == 0.0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_in_padding_stays_out_and_nan_in_tokens_shows(backend):
    device = device_for(backend)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], device=device)
    student = bert_scores(2, 2, 4, device=device)
    teacher = bert_scores(2, 2, 4, device=device)
    student[0, :, 3, :] = float("nan")  # a padded query row
    teacher[1, :, :, 2:] = float("nan")  # padded keys
    student.requires_grad_()
    loss = kdk.attention_mse_loss(student, teacher, attention_mask=mask, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(student.grad).all())
    with torch.no_grad():
        student[0, 0, 1, 1] = float("nan")  # a real (query, key) pair
    student.grad = None
    loss = kdk.attention_mse_loss(student, teacher, attention_mask=mask, backend=backend)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(student.grad[0, 0, 1, 1])
    assert bool(torch.isfinite(student.grad[1]).all())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batch_gives_zero(backend):
    device = device_for(backend)
    student = torch.randn(0, 2, 3, 3, device=device, requires_grad=True)
    loss = kdk.attention_mse_loss([student] * 2, [student.detach()] * 2, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and student.grad.shape == student.shape


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_teacher_gets_no_gradient_and_student_grad_is_zero_below_threshold(backend):
    device = device_for(backend)
    student = bert_scores(1, 1, 4, device=device)
    student[0, 0, 0, 0] = -500.0
    student.requires_grad_()
    teacher = bert_scores(1, 1, 4, device=device).requires_grad_()
    kdk.attention_mse_loss(student, teacher, backend=backend).backward()
    assert teacher.grad is None
    assert student.grad[0, 0, 0, 0].item() == 0.0


def test_modules_match_functions():
    mask = padding_mask(3, 6)
    students = [bert_scores(3, 2, 6, mask) for _ in range(2)]
    teachers = [bert_scores(3, 2, 6, mask) for _ in range(2)]
    module = kdk.nn.AttentionMSELoss(threshold=None, layer_reduction="mean")
    expected = kdk.attention_mse_loss(
        students, teachers, attention_mask=mask, threshold=None, layer_reduction="mean"
    )
    torch.testing.assert_close(module(students, teachers, mask), expected)
    assert "layer_reduction='mean'" in repr(module)
    hidden_s, hidden_t = torch.randn(3, 6, 5), torch.randn(3, 6, 5)
    hidden_module = kdk.nn.HiddenMSELoss(layer_reduction="none")
    torch.testing.assert_close(
        hidden_module(hidden_s, hidden_t, mask),
        kdk.hidden_mse_loss(hidden_s, hidden_t, attention_mask=mask, layer_reduction="none"),
    )


LAYER_MAPS = [
    (4, 12, "uniform", (2, 5, 8, 11), (0, 3, 6, 9, 12)),
    (6, 12, "uniform", (1, 3, 5, 7, 9, 11), (0, 2, 4, 6, 8, 10, 12)),
    (12, 12, "uniform", tuple(range(12)), tuple(range(13))),
    (4, 12, "top", (8, 9, 10, 11), (0, 9, 10, 11, 12)),
    (4, 12, "bottom", (0, 1, 2, 3), (0, 1, 2, 3, 4)),
    (3, 12, [1, 6, 11], (1, 6, 11), (0, 2, 7, 12)),
]


@pytest.mark.parametrize(("student", "teacher", "strategy", "attention", "hidden"), LAYER_MAPS)
def test_layer_map(student, teacher, strategy, attention, hidden):
    mapping = kdk.layer_map(student, teacher, strategy)
    assert mapping.attention == attention and mapping.hidden == hidden
    assert len(mapping.hidden) == student + 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((5, 12, "uniform"), "divisible"),
        ((13, 12, "top"), "cannot map"),
        ((0, 12, "top"), "num_student"),
        ((4, 12, "middle"), "strategy"),
        ((2, 12, [1, 2, 3]), "one teacher layer per student layer"),
        ((2, 12, [1, 12]), r"\[0, 12\)"),
        ((2, 12, [1, -1]), r"\[0, 12\)"),
    ],
)
def test_layer_map_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        kdk.layer_map(*args)
