"""kd_loss forward + backward against eager PyTorch written the usual way.

    python -m benchmarks.kd_loss                      # N=4096, C=32000, fp32, on the CPU
    python -m benchmarks.kd_loss --device cuda --dtype bfloat16 --rows 8192 --classes 128256

Eager baseline: ``F.kl_div(F.log_softmax(s / t), F.softmax(p / t), reduction="batchmean") * t * t``.
Ratios (speed-up, memory) come from one run on one machine; absolute times only on a GPU.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import kd_kernels as kdk
from benchmarks._harness import (
    add_common_arguments,
    fused_backends,
    markdown_table,
    measure,
    report,
)


def eager_kd_loss(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    return (
        F.kl_div(
            F.log_softmax(student / t, dim=-1),
            F.softmax(teacher / t, dim=-1),
            reduction="batchmean",
        )
        * t
        * t
    )


def implementations(device: str, with_compile: bool) -> dict:
    impls = {"eager": eager_kd_loss}
    if with_compile:
        impls["torch.compile(eager)"] = torch.compile(eager_kd_loss)
    for backend in fused_backends(device):
        impls[f"kd_kernels[{backend}]"] = lambda s, p, t, backend=backend: kdk.kd_loss(
            s, p, temperature=t, backend=backend
        )
    return impls


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(eager)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(args.rows, args.classes, generator=generator).to(args.device, dtype)
    teacher = torch.randn(args.rows, args.classes, generator=generator).to(args.device, dtype)
    student.requires_grad_(True)

    results = []
    for name, loss_fn in implementations(args.device, args.compile).items():

        def step(loss_fn=loss_fn):
            loss = loss_fn(student, teacher, args.temperature)
            return torch.autograd.grad(loss, student)

        results.append(measure(name, step, args.device, args.warmup, args.repeats))
        print(f"{name}: {results[-1].median_ms:.1f} ms, {results[-1].peak_extra_mib:.0f} MiB")

    table = markdown_table(results, baseline="eager")
    name = f"kd_loss_{args.rows}x{args.classes}_{args.dtype}"
    return report("kd_loss fwd+bwd", name, args, results, table)


if __name__ == "__main__":
    main()
