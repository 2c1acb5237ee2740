"""kd_loss Triton: rows split over several programs, and rows read from a 16-byte boundary.

Few long rows (N = 8 at C = 262144) are split over several programs per row: phase 1 writes
each split's partial online-softmax state, phases 2-3 merge them and form the loss and the
gradient. Odd vocabularies (C = 50257) start every other row off a 16-byte boundary; the
kernel reads those rows from the boundary on (HEAD), with the first and last few columns
in an edge tile. The interpreter has no SM count, so the split count is forced here, on
small shapes, and checked against reference.kd_loss like every other backend.
"""

import pytest
import torch
from conftest import DTYPES, GRAD_TOLERANCE, LOSS_TOLERANCE, device_for
from kd_loss_checks import assert_matches_reference, logits, loss_and_grad

import kd_kernels as kdk
from kd_kernels import reference
from kd_kernels.triton import kd_loss as triton_kd_loss

pytestmark = pytest.mark.skipif(
    "triton" not in kdk.available_backends(), reason="needs Triton (or its interpreter)"
)
KINDS = reference.KD_KINDS
# 1001 columns: 7 tiles of 128 and a tail; odd, so rows 1, 2, ... start off 16-byte boundaries.
ROWS, CLASSES = 5, 1001


@pytest.fixture
def split(monkeypatch):
    """force(splits): tiles of 128 columns, one row per program, `splits` programs per row."""

    def force(splits):
        monkeypatch.setattr(triton_kd_loss, "MAX_BLOCK_COLUMNS", 128)
        monkeypatch.setattr(triton_kd_loss, "MAX_BLOCK_ROWS", 1)
        monkeypatch.setattr(triton_kd_loss, "SPLITS_OVERRIDE", splits)

    return force


def _launches(monkeypatch):
    """Records (grid, PHASE, HEAD) of every kd_loss kernel launch."""
    seen = []
    kernel = triton_kd_loss._kd_loss_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((tuple(grid), kwargs["PHASE"], kwargs["HEAD"]))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(triton_kd_loss, "_kd_loss_kernel", Recorder())
    return seen


def _labels(rows, classes):
    labels = torch.randint(0, classes, (rows,))
    labels[1] = -100
    labels[2] = classes - 1  # the last column: in the edge tile
    return labels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_split_rows_match_reference(split, monkeypatch, kind, dtype):
    split(3)
    seen = _launches(monkeypatch)
    device = device_for("triton")
    student = logits(ROWS, CLASSES, dtype=dtype, device=device)
    teacher = logits(ROWS, CLASSES, dtype=dtype, device=device)
    assert_matches_reference(
        "triton", student, teacher, temperature=2.0, kind=kind, reduction="none"
    )
    phases = [1, 2, 3] if kind in ("reverse_kl", "jsd") else [1, 3]
    assert [phase for _, phase, _ in seen] == phases
    assert all(grid == (ROWS, 3) and head for grid, _, head in seen)


def _option_cases():
    def masked(rows):
        mask = torch.tensor([True, False, True, True, False])[:rows]
        return mask

    return [
        ("ensemble", lambda: (logits(ROWS, CLASSES), logits(3, ROWS, CLASSES), {})),
        (
            "labels_hard",
            lambda: (
                logits(ROWS, CLASSES),
                logits(ROWS, CLASSES),
                dict(labels=_labels(ROWS, CLASSES), hard_weight=0.4, soft_weight=0.6),
            ),
        ),
        (
            "ensemble_mask_hard",
            lambda: (
                logits(ROWS, CLASSES, dtype=torch.bfloat16),
                logits(2, ROWS, CLASSES, dtype=torch.bfloat16),
                dict(mask=masked(ROWS), labels=_labels(ROWS, CLASSES), hard_weight=1.0),
            ),
        ),
        (
            "labels_ignore_only",
            lambda: (logits(ROWS, CLASSES), logits(ROWS, CLASSES), dict(labels=_labels(5, 1001))),
        ),
        ("no_t2_beta", lambda: (logits(ROWS, CLASSES), logits(ROWS, CLASSES), dict(beta=0.2))),
        ("extreme", lambda: (logits(ROWS, CLASSES, scale=1e3), logits(ROWS, CLASSES), {})),
    ]


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("name", "build"), _option_cases(), ids=[n for n, _ in _option_cases()])
def test_split_rows_match_reference_for_every_option(split, kind, reduction, name, build):
    split(4)
    torch.manual_seed(7)
    student, teacher, options = build()
    device = device_for("triton")
    options = {k: v.to(device) if torch.is_tensor(v) else v for k, v in options.items()}
    assert_matches_reference(
        "triton",
        student.to(device),
        teacher.to(device),
        temperature=1.5,
        kind=kind,
        reduction=reduction,
        **options,
    )


@pytest.mark.parametrize("splits", [2, 5, 7, 9])
@pytest.mark.parametrize("classes", [1000, 1001, 1003])
def test_uneven_split_counts_and_heads(split, splits, classes):
    """Splits that do not divide the tiles (9 > 7 tiles: 7 splits), aligned and odd rows."""
    split(splits)
    device = device_for("triton")
    student = logits(4, classes, dtype=torch.float16, device=device)
    teacher = logits(4, classes, dtype=torch.float16, device=device)
    assert_matches_reference("triton", student, teacher, temperature=2.0, kind="jsd")


@pytest.mark.parametrize("kind", KINDS)
def test_one_row_per_program_reads_rows_from_their_16_byte_boundary(monkeypatch, split, kind):
    """The unsplit kernel with HEAD: the head and tail columns in the edge tile."""
    split(1)
    seen = _launches(monkeypatch)
    device = device_for("triton")
    student = logits(ROWS, CLASSES, dtype=torch.bfloat16, device=device)
    teacher = logits(ROWS, CLASSES, dtype=torch.bfloat16, device=device)
    labels = _labels(ROWS, CLASSES).to(device)
    assert_matches_reference(
        "triton", student, teacher, kind=kind, labels=labels, hard_weight=0.5, temperature=2.0
    )
    assert seen == [((ROWS, 1), 0, True)]


@pytest.mark.parametrize("hard_weight", [0.0, 0.5])
def test_split_without_gradient_and_in_place_gradient(split, hard_weight):
    """No gradient wanted (phases 1-2 for reverse KL / JSD), and the gradient written over
    the logits while other splits of the row still read them (the label's logit included)."""
    split(3)
    device = device_for("triton")
    student = logits(ROWS, CLASSES, device=device)
    teacher = logits(ROWS, CLASSES, device=device)
    labels = _labels(ROWS, CLASSES).to(device)
    options = dict(labels=labels, hard_weight=hard_weight, temperature=2.0)
    for kind in KINDS:
        with torch.no_grad():
            loss = kdk.kd_loss(student, teacher, kind=kind, backend="triton", **options)
        expected = kdk.kd_loss(student, teacher, kind=kind, backend="torch", **options)
        torch.testing.assert_close(loss, expected, **LOSS_TOLERANCE[torch.float32])

        reference_leaf = student.clone().requires_grad_(True)
        expected = kdk.kd_loss(reference_leaf, teacher, kind=kind, backend="torch", **options)
        expected.backward()
        leaf = student.clone().requires_grad_(True)
        loss = kdk.kd_loss(
            leaf * 1, teacher, kind=kind, backend="triton", inplace_grad=True, **options
        )
        loss.backward()
        torch.testing.assert_close(loss, expected, **LOSS_TOLERANCE[torch.float32])
        torch.testing.assert_close(leaf.grad, reference_leaf.grad, **GRAD_TOLERANCE[torch.float32])


@pytest.mark.parametrize("where", ["first split", "last split"])
def test_bad_value_in_one_split_makes_the_whole_row_nan(split, where):
    split(3)
    device = device_for("triton")
    student, teacher = logits(3, CLASSES, device=device), logits(3, CLASSES, device=device)
    student[1, 5 if where == "first split" else CLASSES - 2] = float("nan")
    teacher[2, 400] = float("inf")
    loss, grad = loss_and_grad("triton", student, teacher, reduction="none")
    assert torch.isnan(loss[1:]).all() and torch.isfinite(loss[0])
    assert torch.isnan(grad[1:]).all() and torch.isfinite(grad[0]).all()


def test_neg_inf_columns_spanning_whole_splits(split):
    """A teacher that is -inf over a whole split, and one split of the student all -inf
    where the teacher is -inf too: the partial states merge with empty ones."""
    split(4)
    device = device_for("triton")
    student, teacher = logits(3, CLASSES, device=device), logits(2, 3, CLASSES, device=device)
    teacher[0, :, :300] = float("-inf")
    teacher[1, 1, 200:700] = float("-inf")
    student[2, :256] = float("-inf")
    teacher[:, 2, :256] = float("-inf")
    for kind in ("kl", "soft_ce", "jsd"):
        assert_matches_reference("triton", student, teacher, kind=kind, temperature=2.0)


def test_rows_split_by_themselves_when_few(monkeypatch):
    """No override: 2 rows of 8203 columns (odd) fill the chip only split; the plan picks 2
    splits of 4096 columns under the interpreter (132 SMs assumed off a GPU)."""
    seen = _launches(monkeypatch)
    device = device_for("triton")
    student = logits(2, 8203, dtype=torch.bfloat16, device=device)
    teacher = logits(2, 8203, dtype=torch.bfloat16, device=device)
    assert_matches_reference("triton", student, teacher, kind="reverse_kl", temperature=2.0)
    assert [(grid, phase) for grid, phase, _ in seen] == [((2, 2), 1), ((2, 2), 2), ((2, 2), 3)]


def test_split_plan_fills_an_h100():
    """N = 8 at C = 262144: 8 programs unsplit; the plan gives >= 132 (issue 20)."""
    plan = triton_kd_loss._split_plan
    splits, per_split = plan(8, 262144, 4096, 132)
    assert 8 * splits >= 132 and per_split * splits >= 262144 // 4096
    assert 262144 // splits >= triton_kd_loss.MIN_SPLIT_COLUMNS
    assert plan(1024, 262144, 4096, 132)[0] == 1  # enough rows: one program per row
    assert plan(1024, 2, 2, 132)[0] == 1  # short rows never split
    assert plan(8, 5000, 4096, 132)[0] == 1  # a row too short for two splits
    assert plan(1, 262144, 4096, 132)[0] == triton_kd_loss.MAX_SPLITS


def test_head_needs_one_boundary_for_every_input():
    student = torch.empty(4, 1001, dtype=torch.bfloat16)
    teacher = torch.empty(1, 4, 1001, dtype=torch.bfloat16)
    assert triton_kd_loss._shared_head(student, teacher, torch.empty_like(student), 1) == (
        True,
        8,
    )
    assert not triton_kd_loss._shared_head(student, teacher, None, 4)[0]  # rows per program
    wide = torch.empty(4, 1008, dtype=torch.bfloat16)[:, :1001]  # stride 1008: aligned rows
    assert not triton_kd_loss._shared_head(wide, teacher, None, 1)[0]
    # Teacher rows 1001 apart, student rows 1008: their boundaries differ.
    assert not triton_kd_loss._shared_head(student, wide[None], None, 1)[0]
    # An ensemble whose second teacher starts off the boundary (4 * 1001 elements in).
    assert not triton_kd_loss._shared_head(
        student, torch.empty(2, 4, 1001, dtype=torch.bfloat16), None, 1
    )[0]
    assert not triton_kd_loss._shared_head(student[:, 1:], teacher[:, :, 1:], None, 1)[0]
