"""info_nce_loss(gather_distributed=True): 2 processes on gloo (CPU) with unequal local
batches give the losses and gradients of the single-process loss on the concatenated batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import cpu_backends

import kd_kernels as kdk

LOCAL_ROWS = (3, 5)  # unequal on purpose: the gather must first exchange sizes
DIM = 12
# (name, hard negatives per rank, symmetric)
CASES = [("one_way_hard_negatives", 2, False), ("symmetric", 0, True)]


def _batches(seed, extra_keys):
    generator = torch.Generator().manual_seed(seed)
    queries = [torch.randn(n, DIM, generator=generator) for n in LOCAL_ROWS]
    keys = [torch.randn(n + extra_keys, DIM, generator=generator) for n in LOCAL_ROWS]
    return queries, keys


def _worker(rank, world_size, store_path, out_dir, backends):
    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size
    )
    results = {}
    for backend in backends:
        for name, extra_keys, symmetric in CASES:
            queries, keys = _batches(0, extra_keys)
            query = queries[rank].clone().requires_grad_()
            key = keys[rank].clone().requires_grad_()
            losses = kdk.info_nce_loss(
                query,
                key,
                symmetric=symmetric,
                reduction="none",
                gather_distributed=True,
                backend=backend,
            )
            losses.sum().backward()
            results[backend, name] = (losses.detach(), query.grad, key.grad)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # Both ranks leave together: a rank that tears gloo down while its peer still talks to it
    # can abort ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("info_nce_distributed")
    backends = [*cpu_backends(), "torch"]
    mp.spawn(_worker, args=(2, str(out_dir / "store"), str(out_dir), backends), nprocs=2, join=True)
    return backends, [torch.load(out_dir / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize(("name", "extra_keys", "symmetric"), CASES, ids=[c[0] for c in CASES])
def test_two_ranks_equal_one_process(distributed_results, name, extra_keys, symmetric):
    backends, per_rank = distributed_results
    queries, keys = _batches(0, extra_keys)
    query = torch.cat(queries).requires_grad_()
    key = torch.cat(keys).requires_grad_()
    # Query i of rank r pairs with key i of rank r: its index among the gathered keys.
    key_offsets = [0, LOCAL_ROWS[0] + extra_keys]
    labels = torch.cat(
        [torch.arange(n) + off for n, off in zip(LOCAL_ROWS, key_offsets, strict=True)]
    )
    losses = kdk.info_nce_loss(
        query,
        key,
        labels=None if symmetric else labels,
        symmetric=symmetric,
        reduction="none",
        backend="torch",
    )
    losses.sum().backward()
    expected_losses = losses.detach().split(LOCAL_ROWS)
    expected_query_grads = query.grad.split(LOCAL_ROWS)
    expected_key_grads = key.grad.split([n + extra_keys for n in LOCAL_ROWS])
    for backend in backends:
        for rank in range(2):
            got_losses, got_query_grad, got_key_grad = per_rank[rank][backend, name]
            torch.testing.assert_close(got_losses, expected_losses[rank], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(
                got_query_grad, expected_query_grads[rank], rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(got_key_grad, expected_key_grads[rank], rtol=1e-4, atol=1e-5)
