"""info_nce_loss reduced by mean or sum on the cpu backend: loss and gradient in one walk
(the ``info_nce_fused`` op behind ``_ops.InfoNCEGradInForward``) against the reference, over
shapes x dtype x similarity x symmetric x reduction, across block boundaries, and for when the
path is (not) taken."""

import pytest
import torch
from conftest import DTYPES, cpu_backends
from info_nce_checks import assert_matches_reference, assert_shape_matches_reference, embeddings

import kd_kernels as kdk
from kd_kernels import reference

BACKENDS = [b for b in cpu_backends() if b == "cpu"]
SHAPES = [(1, 1, 1), (5, 5, 16), (7, 12, 257), (33, 70, 40), (130, 130, 8)]
FUSED_NODE = "InfoNCEGradInForwardBackward"


def _fused_loss(query, key, **options):
    query = query.detach().clone().requires_grad_()
    key = key.detach().clone().requires_grad_()
    return kdk.info_nce_loss(query, key, backend="cpu", **options), query, key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("similarity", reference.INFO_NCE_SIMILARITIES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(backend, dtype, similarity, symmetric, reduction, shape):
    assert_shape_matches_reference(
        backend, shape, dtype, "cpu", similarity, symmetric=symmetric, reduction=reduction
    )


# Blocks hold 2^22 similarities; the symmetric loss keeps up to 2^24 of them between its passes.
@pytest.mark.parametrize(
    ("shape", "symmetric"),
    [((2100, 2100, 8), False), ((2100, 2500, 8), True), ((4200, 4200, 4), True)],
    ids=["one_way_2_blocks", "symmetric_kept", "symmetric_5_blocks_recomputed"],
)
def test_across_blocks(shape, symmetric):
    rows, keys, dim = shape
    query, key = embeddings(rows, dim, torch.float64), embeddings(keys, dim, torch.float64)
    assert_matches_reference("cpu", query, key, temperature=0.1, symmetric=symmetric)


@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
def test_labels_and_non_contiguous(symmetric):
    query = embeddings(48, 70).t()  # (70, 48) column-major
    key = embeddings(90, 96)[:, ::2]
    labels = None if symmetric else torch.randint(0, 90, (70,))
    assert_matches_reference("cpu", query, key, labels=labels, symmetric=symmetric, reduction="sum")


@pytest.mark.parametrize("similarity", reference.INFO_NCE_SIMILARITIES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["one_way", "symmetric"])
def test_gradcheck_fp64(similarity, symmetric):
    query = embeddings(4, 5, torch.float64).requires_grad_()
    key = embeddings(6, 5, torch.float64).requires_grad_()
    temperature = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def loss(q, k, t):
        return kdk.info_nce_loss(
            q, k, temperature=t, similarity=similarity, symmetric=symmetric, backend="cpu"
        )

    assert type(loss(query, key, temperature).grad_fn).__name__ == FUSED_NODE
    assert torch.autograd.gradcheck(loss, (query, key, temperature))


def test_path_is_taken_only_with_a_scalar_loss_and_a_gradient():
    query, key = embeddings(6, 8), embeddings(6, 8)
    loss, *_ = _fused_loss(query, key)
    assert type(loss.grad_fn).__name__ == FUSED_NODE
    rows, *_ = _fused_loss(query, key, reduction="none")
    assert type(rows.grad_fn).__name__ != FUSED_NODE and rows.shape == (6,)
    with torch.no_grad():
        evaluated, *_ = _fused_loss(query, key)
    assert evaluated.grad_fn is None
    torch.testing.assert_close(evaluated, loss.detach())
    frozen = kdk.info_nce_loss(query, key, backend="cpu")  # nothing requires grad
    assert frozen.grad_fn is None
    torch.testing.assert_close(frozen, loss.detach())


def test_only_temperature_learns():
    query, key = embeddings(6, 8), embeddings(9, 8)
    temperature = torch.tensor(0.2, requires_grad=True)
    loss = kdk.info_nce_loss(query, key, temperature=temperature, backend="cpu")
    assert type(loss.grad_fn).__name__ == FUSED_NODE
    (grad,) = torch.autograd.grad(loss, temperature)
    expected = kdk.info_nce_loss(query, key, temperature=temperature, backend="torch")
    torch.testing.assert_close(grad, torch.autograd.grad(expected, temperature)[0])


def test_backward_twice_scales_by_grad_output():
    query, key = embeddings(5, 8), embeddings(5, 8)
    loss, query, key = _fused_loss(query, key, symmetric=True)
    first = torch.autograd.grad(loss, (query, key), retain_graph=True)
    second = torch.autograd.grad(3 * loss, (query, key))
    for once, thrice in zip(first, second, strict=True):
        torch.testing.assert_close(thrice, 3 * once)


def test_nan_embedding_gives_nan_loss_and_gradient():
    query, key = embeddings(4, 8), embeddings(4, 8)
    query[2, 3] = float("nan")
    loss, query, key = _fused_loss(query, key, symmetric=True)
    expected = kdk.info_nce_loss(query, key, symmetric=True, backend="torch")
    assert bool(torch.isnan(loss)) and bool(torch.isnan(expected))
    grads = torch.autograd.grad(loss, (query, key))
    expected_grads = torch.autograd.grad(expected, (query, key))
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert torch.equal(torch.isnan(grad), torch.isnan(expected_grad))


def test_opcheck():
    # The op returns its own gradients: it runs on detached inputs (inside the autograd.Function).
    query, key = embeddings(5, 16), embeddings(7, 16)
    temperature = torch.tensor(0.1)
    weights = torch.full((5,), 0.2)
    for cosine in (True, False):
        labels = torch.tensor([0, 6, 2, 2, 4])
        args = (query, key, labels, temperature, cosine, weights, False)
        torch.library.opcheck(torch.ops.kd_kernels.info_nce_fused, args)
        symmetric = (query, key, torch.arange(5), temperature, cosine, weights, True)
        torch.library.opcheck(torch.ops.kd_kernels.info_nce_fused, symmetric)


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
    query, key = embeddings(5, 8), embeddings(keys, 8)
    labels = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(ValueError, match=message):
        torch.ops.kd_kernels.info_nce_fused(
            query, key, labels, torch.tensor(0.1), True, weights, symmetric
        )


def test_op_refuses_differentiation():
    query = embeddings(5, 8).requires_grad_()
    losses, *_ = torch.ops.kd_kernels.info_nce_fused(
        query, embeddings(5, 8), torch.arange(5), torch.tensor(0.1), True, torch.ones(5), False
    )
    with pytest.raises(RuntimeError, match="cannot be differentiated"):
        losses.sum().backward()
