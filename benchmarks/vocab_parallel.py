"""Vocabulary-parallel fused_linear_kd_loss on P processes against the single-process fused
loss: time and peak extra memory per rank, forward + backward.

    python -m benchmarks.vocab_parallel                    # CPU, gloo: P = 2, V = 128256
    python -m benchmarks.vocab_parallel --device cuda --world 2 --hidden 4096 --rows 4096

Inputs as in benchmarks.fused_linear_kd: student hidden states (N, H) and LM head (V, H),
trained; the teacher's hidden states and head (V, H), frozen; t = 2, kl. The single process
holds the whole heads; rank r of the group holds rows [r V/P, (r+1) V/P) of both heads and
the same hidden states (``process_group=``), and gets the gradients of its rows and the full
hidden-state gradient (all-reduced). Every process runs one thread on CPU, so that a rank and
the single process compute on equal hardware (what P devices give); the CPU ranks share the
machine's cores and memory bus. A third line runs the vocabulary-parallel code on a 1-process
group (the whole vocabulary): its own cost, without that sharing. Times are medians over
repeats; on the CPU, ratios from one run are what to quote, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kd_kernels as kdk
from benchmarks._harness import add_common_arguments, loss_step, markdown_table, measure, report
from benchmarks.fused_linear_kd import make_inputs

TEMPERATURE = 2.0


def _loss(process_group=None):
    def loss(h, weight, teacher_h, teacher_weight):
        return kdk.fused_linear_kd_loss(
            h,
            weight,
            teacher_hidden=teacher_h,
            teacher_weight=teacher_weight,
            temperature=TEMPERATURE,
            process_group=process_group,
        )

    return loss


def _rank_inputs(args: argparse.Namespace, rank: int, world: int, device: str) -> tuple:
    """This rank's inputs: the hidden states whole, the rows of both heads it holds."""
    dtype = getattr(torch, args.dtype)
    h, weight, teacher_h, teacher_weight = make_inputs(args.rows, args.vocab, args.hidden)(
        dtype, "cpu"
    )
    rows = slice(rank * args.vocab // world, (rank + 1) * args.vocab // world)
    weight = weight.detach()[rows].clone().to(device).requires_grad_()
    return (
        h.detach().to(device).requires_grad_(),
        weight,
        teacher_h.to(device),
        teacher_weight[rows].clone().to(device),
    )


def _worker(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    device = "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    inputs = _rank_inputs(args, rank, world, device)
    step = loss_step(_loss(dist.group.WORLD), inputs, [inputs[0], inputs[1]])
    name = f"vocab-parallel, rank {rank} of {world}"
    result = measure(name, step, args.device, args.warmup, args.repeats)
    torch.save(vars(result), os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--world", type=int, default=2)
    add_common_arguments(parser, repeats=5, warmup=1)
    args = parser.parse_args(argv)
    if args.vocab % args.world:
        parser.error(f"--vocab {args.vocab} must split evenly over --world {args.world}")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    inputs = _rank_inputs(args, 0, 1, args.device)
    single = measure(
        "single process",
        loss_step(_loss(), inputs, [inputs[0], inputs[1]]),
        args.device,
        args.warmup,
        args.repeats,
    )
    # The same vocabulary-parallel code on a 1-process group: its own cost (the elementwise
    # math in eager float32 PyTorch) without the sharing of cores by concurrent ranks.
    with tempfile.TemporaryDirectory() as out:
        store = os.path.join(out, "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        one_rank = measure(
            "vocab-parallel code, P=1",
            loss_step(_loss(dist.group.WORLD), inputs, [inputs[0], inputs[1]]),
            args.device,
            args.warmup,
            args.repeats,
        )
        dist.destroy_process_group()
    del inputs
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        store = os.path.join(out, "store")
        mp.start_processes(
            _worker, args=(args.world, store, args, out), nprocs=args.world, start_method="spawn"
        )
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(args.world)]
    from benchmarks._harness import Measurement

    results = [single, one_rank, *(Measurement(**r) for r in ranks)]
    heading = (
        f"### N={args.rows} V={args.vocab} H={args.hidden} {args.dtype}, "
        f"P={args.world} ({'gloo' if args.device == 'cpu' else 'nccl'})"
    )
    table = f"{heading}\n\n" + markdown_table(results, "single process")
    name = f"vocab_parallel_P{args.world}_V{args.vocab}_H{args.hidden}_{args.dtype}"
    return report(
        "vocab-parallel fused_linear_kd fwd+bwd", name, args, [vars(r) for r in results], table
    )


if __name__ == "__main__":
    main()
