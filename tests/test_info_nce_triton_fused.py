"""info_nce_loss reduced by mean or sum on the triton backend: loss and gradients in forward
(``info_nce_fused_triton``: the online-softmax query walk + the key walk one-way, the row and
column log-sum-exps + one walk per side symmetric) against the reference, and the routing
(mean / sum take the fused op, "none" the recomputing backward). Under the interpreter on CPU;
on a GPU machine the same table runs on CUDA tensors."""

import pytest
import torch
from conftest import DTYPES, cpu_backends, device_for
from info_nce_checks import (
    assert_matches_reference,
    assert_shape_matches_reference,
    confident_errors,
    embeddings,
)

import kd_kernels as kdk
from kd_kernels import reference

pytestmark = pytest.mark.skipif("triton" not in cpu_backends(), reason="needs triton")

info_nce_triton = pytest.importorskip("kd_kernels.triton.info_nce")
DEVICE = device_for("triton")
FUSED_NODE = "InfoNCEGradInForwardBackward"
# (N, M, D): tiny N, odd D, hard negatives (M > N), several key tiles (the interpreter's
# tiles are 128 wide: M = 300 rescales the running max across 3 tiles), two output slices
# of D (BLOCK_DO = 256: D = 257), several query tiles for the key walk (N = 130).
SHAPES = [(1, 1, 1), (2, 2, 3), (7, 12, 257), (33, 300, 17), (130, 140, 8)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("similarity", reference.INFO_NCE_SIMILARITIES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(dtype, similarity, symmetric, reduction, shape):
    assert_shape_matches_reference(
        "triton", shape, dtype, DEVICE, similarity, symmetric=symmetric, reduction=reduction
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("rows", "keys"), [(11, 6), (5, 20)], ids=["N>M", "N<M"])
def test_explicit_labels(dtype, reduction, rows, keys):
    query, key = embeddings(rows, 20, dtype, DEVICE), embeddings(keys, 20, dtype, DEVICE)
    labels = torch.randint(0, keys, (rows,), generator=torch.Generator().manual_seed(rows))
    assert_matches_reference(
        "triton", query, key, labels=labels.to(DEVICE), temperature=0.1, reduction=reduction
    )


@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
def test_non_contiguous_inputs(symmetric):
    query = embeddings(24, 9, device=DEVICE).t()  # (9, 24), column-major
    key = embeddings(12, 48, device=DEVICE)[:, ::2]  # (12, 24), every other column
    assert_matches_reference("triton", query, key, symmetric=symmetric, reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
def test_confident_rows_keep_their_gradient(dtype, symmetric):
    """P_iy close to 1: the gradient is the small difference (P_iy - 1) k_y + sum_{j != y}
    P_ij k_j. Rounding a tile entry near 1 to fp16 / bf16 and subtracting k_y afterwards would
    lose it; the fused walk keeps the label's term in fp32 (info_nce_checks.confident_errors).
    Rounding the outputs costs 2e-4 (fp16) / 1.7e-3 (bf16) here; the fused walk gets 3e-4 /
    1.7e-3 (interpreter: bf16 tiles are fp32), and with the label's entry inside the fp16 tile
    it got 3.9e-3."""
    errors = confident_errors("triton", dtype, symmetric, DEVICE)
    bound = {torch.float16: 1e-3, torch.bfloat16: 4e-3}[dtype]
    assert max(errors) < bound, errors


class _Counter:
    """Wraps a function of the Triton module and counts its calls."""

    def __init__(self, monkeypatch, name):
        self.calls = 0
        wrapped = getattr(info_nce_triton, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return wrapped(*args, **kwargs)

        monkeypatch.setattr(info_nce_triton, name, counted)


@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
@pytest.mark.parametrize("reduction", reference.INFO_NCE_REDUCTIONS)
def test_scalar_reductions_take_the_fused_op(monkeypatch, symmetric, reduction):
    fused = _Counter(monkeypatch, "launch_fused")
    recomputing = _Counter(monkeypatch, "launch_backward")
    query = embeddings(6, 8, device=DEVICE).requires_grad_()
    key = embeddings(6, 8, device=DEVICE).requires_grad_()
    loss = kdk.info_nce_loss(query, key, symmetric=symmetric, reduction=reduction, backend="triton")
    loss.sum().backward()
    if reduction == "none":
        assert type(loss.grad_fn).__name__ != FUSED_NODE
        assert (fused.calls, recomputing.calls) == (0, 2 if symmetric else 1)
    else:
        assert type(loss.grad_fn).__name__ == FUSED_NODE
        assert (fused.calls, recomputing.calls) == (1, 0)


def test_no_gradient_no_fused_op(monkeypatch):
    fused = _Counter(monkeypatch, "launch_fused")
    query, key = embeddings(6, 8, device=DEVICE), embeddings(6, 8, device=DEVICE)
    frozen = kdk.info_nce_loss(query, key, backend="triton")
    assert frozen.grad_fn is None and fused.calls == 0
    torch.testing.assert_close(frozen, kdk.info_nce_loss(query, key, backend="torch"))


def test_backward_twice_scales_by_grad_output():
    query = embeddings(5, 8, device=DEVICE).requires_grad_()
    key = embeddings(5, 8, device=DEVICE).requires_grad_()
    loss = kdk.info_nce_loss(query, key, symmetric=True, backend="triton")
    first = torch.autograd.grad(loss, (query, key), retain_graph=True)
    second = torch.autograd.grad(3 * loss, (query, key))
    for once, thrice in zip(first, second, strict=True):
        torch.testing.assert_close(thrice, 3 * once)


def test_opcheck():
    query, key = embeddings(5, 16, device=DEVICE), embeddings(7, 16, device=DEVICE)
    temperature = torch.tensor(0.1, device=DEVICE)
    weights = torch.full((5,), 0.2, device=DEVICE)
    labels = torch.tensor([0, 6, 2, 2, 4], device=DEVICE)
    for cosine in (True, False):
        for symmetric, used in ((False, labels), (True, torch.arange(5, device=DEVICE))):
            args = (query, key, used, temperature, cosine, weights, symmetric)
            torch.library.opcheck(info_nce_triton.info_nce_fused_triton, args)


@pytest.mark.parametrize(
    ("weights", "keys", "symmetric", "message"),
    [
        (torch.ones(4), 5, False, "row_weight must be"),
        (torch.ones(5, 1), 5, False, "row_weight must be"),
        (torch.ones(5), 4, True, "symmetric needs M >= N"),
    ],
    ids=["short_weights", "2d_weights", "symmetric_few_keys"],
)
def test_op_rejects_bad_arguments(weights, keys, symmetric, message):
    query, key = embeddings(5, 8, device=DEVICE), embeddings(keys, 8, device=DEVICE)
    labels = torch.zeros(5, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        info_nce_triton.info_nce_fused_triton(
            query,
            key,
            labels,
            torch.tensor(0.1, device=DEVICE),
            True,
            weights.to(DEVICE),
            symmetric,
        )


def test_op_refuses_differentiation():
    query = embeddings(5, 8, device=DEVICE).requires_grad_()
    losses, *_ = info_nce_triton.info_nce_fused_triton(
        query,
        embeddings(5, 8, device=DEVICE),
        torch.arange(5, device=DEVICE),
        torch.tensor(0.1, device=DEVICE),
        True,
        torch.ones(5, device=DEVICE),
        False,
    )
    with pytest.raises(RuntimeError, match="cannot be differentiated"):
        losses.sum().backward()
