"""The InfoNCE reference (the spec) against gradcheck and sentence-transformers'
MultipleNegativesRankingLoss, one-way and symmetric (scale = 1 / t)."""

import pytest
import torch
from conftest import cpu_backends
from info_nce_checks import embeddings

import kd_kernels as kdk
from kd_kernels import reference

ALL_BACKENDS = [*cpu_backends(), "torch"]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck_fp64(backend, similarity, symmetric):
    if backend not in ALL_BACKENDS:
        pytest.fail("the cpu backend (C++ extension) must be built for the test suite")
    query = embeddings(4, 5, torch.float64).requires_grad_()
    key = embeddings(6, 5, torch.float64).requires_grad_()
    temperature = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def loss(q, k, t):
        return kdk.info_nce_loss(
            q,
            k,
            temperature=t,
            similarity=similarity,
            symmetric=symmetric,
            reduction="none",
            backend=backend,
        )

    assert torch.autograd.gradcheck(loss, (query, key, temperature))


def _ranking_loss():
    losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    return losses.MultipleNegativesRankingLoss


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("hard_negatives", [False, True])
def test_equals_multiple_negatives_ranking_loss(backend, hard_negatives):
    ranking_loss = _ranking_loss()
    anchors, positives = embeddings(16, 32), embeddings(16, 32)
    candidates = [positives] + ([embeddings(16, 32)] if hard_negatives else [])
    temperature = 0.05
    expected = ranking_loss(
        torch.nn.Identity(), scale=1 / temperature
    ).compute_loss_from_embeddings([anchors, *candidates], None)
    loss = kdk.info_nce_loss(
        anchors, torch.cat(candidates), temperature=temperature, backend=backend
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    spec = reference.info_nce_loss(anchors, torch.cat(candidates), temperature=temperature)
    torch.testing.assert_close(spec, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_equals_symmetric_ranking_loss(backend):
    # MultipleNegativesSymmetricRankingLoss, in the form sentence-transformers now recommends.
    symmetric_loss = _ranking_loss()(
        torch.nn.Identity(),
        scale=20.0,
        directions=("query_to_doc", "doc_to_query"),
        partition_mode="per_direction",
    )
    anchors, positives = embeddings(12, 24), embeddings(12, 24)
    expected = symmetric_loss.compute_loss_from_embeddings([anchors, positives], None)
    loss = kdk.info_nce_loss(anchors, positives, temperature=0.05, symmetric=True, backend=backend)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    spec = reference.info_nce_loss(anchors, positives, temperature=0.05, symmetric=True)
    torch.testing.assert_close(spec, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_equals_cross_entropy_on_the_full_matrix(backend):
    """The eager formulation users write: CE(normalize(q) @ normalize(k).T / t, labels)."""
    query, key = embeddings(9, 16), embeddings(13, 16)
    labels = torch.randint(0, 13, (9,))
    logits = (
        torch.nn.functional.normalize(query, dim=-1)
        @ torch.nn.functional.normalize(key, dim=-1).T
        / 0.07
    )
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    loss = kdk.info_nce_loss(
        query, key, temperature=0.07, labels=labels, reduction="sum", backend=backend
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
