"""Runs a test's worker function on several CPU processes (gloo) cheaply.

Spawning a fresh interpreter per rank re-imports torch (and transformers) in every rank, on
cores the ranks share: seconds each. A forkserver imports them once, in a clean process that
has run no torch op (so no OpenMP state is forked), and forks every rank from it.
"""

import multiprocessing

import torch.multiprocessing as mp


def run_ranks(worker, nprocs: int, args: tuple, preload: tuple[str, ...] = ()) -> None:
    """``worker(rank, *args)`` on ``nprocs`` processes; raises if one of them fails.

    ``preload``: modules (the test module, transformers) the forkserver imports up front; it
    is started once per test session, so only the first caller's list counts.
    """
    multiprocessing.set_forkserver_preload(["torch", "kd_kernels", *preload])
    mp.start_processes(worker, args=args, nprocs=nprocs, start_method="forkserver")
