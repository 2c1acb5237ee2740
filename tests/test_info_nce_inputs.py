"""info_nce_loss on bad and edge-case input."""

import pytest
import torch
from conftest import cpu_backends, device_for
from info_nce_checks import embeddings

import kd_kernels as kdk

ALL_BACKENDS = [*cpu_backends(), "torch"]


def pair(n=4, m=4, d=8):
    return embeddings(n, d), embeddings(m, d)


BAD_CASES = [
    ("query_1d", lambda: (torch.randn(8), torch.randn(4, 8), {}), ValueError, r"\(N, D\)"),
    ("dim_mismatch", lambda: (torch.randn(4, 8), torch.randn(4, 7), {}), ValueError, "one D"),
    ("dtype_mix", lambda: (torch.randn(4, 8), torch.randn(4, 8).double(), {}), TypeError, "dtype"),
    ("int_query", lambda: (torch.ones(4, 8, dtype=torch.long), torch.randn(4, 8), {}),
     TypeError, "float"),
    ("not_tensor", lambda: ([[1.0]], torch.randn(4, 8), {}), TypeError, "torch.Tensor"),
    ("empty_query", lambda: (torch.randn(0, 8), torch.randn(4, 8), {}), ValueError, "N, M, D >= 1"),
    ("empty_dim", lambda: (torch.randn(4, 0), torch.randn(4, 0), {}), ValueError, "N, M, D >= 1"),
    ("too_few_keys", lambda: (*pair(5, 3), {}), ValueError, "M >= N"),
    ("label_high", lambda: (*pair(3, 5), {"labels": torch.tensor([0, 5, 1])}), ValueError,
     r"\[0, 5\)"),
    ("label_negative", lambda: (*pair(3, 5), {"labels": torch.tensor([0, -1, 1])}), ValueError,
     r"\[0, 5\)"),
    ("label_shape", lambda: (*pair(3, 5), {"labels": torch.tensor([0, 1])}), ValueError, "labels"),
    ("label_float", lambda: (*pair(3, 5), {"labels": torch.tensor([0.0, 1.0, 2.0])}), TypeError,
     "integer"),
    ("symmetric_labels", lambda: (*pair(), {"symmetric": True, "labels": torch.arange(4)}),
     ValueError, "symmetric"),
    ("temperature_zero", lambda: (*pair(), {"temperature": 0.0}), ValueError, "> 0"),
    ("temperature_negative_tensor", lambda: (*pair(), {"temperature": torch.tensor(-0.1)}),
     ValueError, "> 0"),
    ("temperature_nan", lambda: (*pair(), {"temperature": float("nan")}), ValueError, "> 0"),
    ("temperature_vector", lambda: (*pair(), {"temperature": torch.tensor([0.1, 0.2])}),
     TypeError, "0-dim"),
    ("similarity", lambda: (*pair(), {"similarity": "euclidean"}), ValueError, "similarity"),
    ("reduction", lambda: (*pair(), {"reduction": "batchmean"}), ValueError, "reduction"),
    ("no_process_group", lambda: (*pair(), {"gather_distributed": True}), ValueError,
     "process group"),
    ("device_mix", lambda: (torch.randn(4, 8), torch.randn(4, 8, device="meta"), {}), ValueError,
     "one device"),
]  # fmt: skip


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    ("build", "error", "message"),
    [case[1:] for case in BAD_CASES],
    ids=[case[0] for case in BAD_CASES],
)
def test_bad_input(backend, build, error, message):
    query, key, options = build()
    with pytest.raises(error, match=message):
        kdk.info_nce_loss(query, key, backend=backend, **options)


def test_triton_refuses_fp64():
    if "triton" not in kdk.available_backends():
        pytest.skip("no triton backend on this machine")
    query = embeddings(3, 4, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        kdk.info_nce_loss(query, query, backend="triton")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_embedding_poisons_only_what_it_touches(backend):
    """A NaN key row enters every query's log-sum-exp: all losses are NaN, as in the reference;
    a NaN query row makes only its own (one-way) loss NaN."""
    device = device_for(backend)
    query, key = embeddings(4, 8, device=device), embeddings(4, 8, device=device)
    query[2, 3] = float("nan")
    losses = kdk.info_nce_loss(query, key, reduction="none", backend=backend)
    assert torch.isnan(losses[2]) and bool(torch.isfinite(losses[[0, 1, 3]]).all())
    key[1, 0] = float("nan")
    losses = kdk.info_nce_loss(query, key, reduction="none", backend=backend)
    assert bool(torch.isnan(losses).all())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_single_pair_has_zero_loss(backend):
    device = device_for(backend)
    query = embeddings(1, 5, device=device).requires_grad_()
    key = embeddings(1, 5, device=device).requires_grad_()
    loss = kdk.info_nce_loss(query, key, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    torch.testing.assert_close(query.grad, torch.zeros_like(query), atol=1e-6, rtol=0)
