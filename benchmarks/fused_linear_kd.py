"""fused_linear_kd_loss forward + backward: peak extra memory and time against the rows N.

    python -m benchmarks.fused_linear_kd              # CPU: N = 128 .. 1024, V = 128256, H = 256
    python -m benchmarks.fused_linear_kd --device cuda --dtype bfloat16 --hidden 4096 \\
        --rows 1024 4096 8192 16384

Inputs: student hidden states (N, H) and LM head (V, H), both trained; a teacher's hidden states
(N, H) and head (V, H), frozen. Eager baseline (t = 2), the unfused path as users write it:
``s = h @ W.T``, ``p = th @ tW.T`` under no_grad, then
``F.kl_div(F.log_softmax(s / t), F.softmax(p / t), "batchmean") * t * t``; kd_kernels' kd_loss
on the same materialised logits (the loss kernel alone, without the head fusion); on a GPU,
Liger's FusedLinearJSD where it installs, against kd_kernels' fused head with kind="jsd". Each
N is a fresh measurement of every implementation; one that runs out of memory is recorded as
such and not run at larger N. Writes a plot of time and peak memory against N next to the JSON.
Ratios (speed-up, memory) come from one run on one machine; absolute times only on a GPU.
"""

from __future__ import annotations

import argparse
import os

import torch

import kd_kernels as kdk
from benchmarks._harness import (
    OpSuite,
    SkipPeer,
    add_common_arguments,
    competitors,
    loss_step,
    markdown_table,
    measure_at_size,
    plot_lines,
    report,
    suite_implementations,
)
from benchmarks.kd_loss import eager_kd_loss

TEMPERATURE = 2.0


def make_inputs(rows: int, vocab: int, hidden: int):
    """inputs(dtype, device) -> (student_hidden, student_weight, teacher_hidden,
    teacher_weight), seeded, logits of standard deviation about 3."""

    def inputs(dtype, device):
        generator = torch.Generator().manual_seed(0)
        scale = hidden**-0.5 * 3

        def randn(*shape, factor=1.0):
            return (torch.randn(*shape, generator=generator) * factor).to(device, dtype)

        student_hidden = randn(rows, hidden).requires_grad_()
        student_weight = randn(vocab, hidden, factor=scale).requires_grad_()
        teacher_hidden = randn(rows, hidden)
        teacher_weight = randn(vocab, hidden, factor=scale)
        return student_hidden, student_weight, teacher_hidden, teacher_weight

    return inputs


def eager(h, weight, teacher_h, teacher_weight):
    student = h @ weight.T
    with torch.no_grad():
        teacher = teacher_h @ teacher_weight.T
    return eager_kd_loss(student, teacher, TEMPERATURE)


def unfused_kd_loss(h, weight, teacher_h, teacher_weight):
    student = h @ weight.T
    with torch.no_grad():
        teacher = teacher_h @ teacher_weight.T
    return kdk.kd_loss(student, teacher, temperature=TEMPERATURE)


def _liger(device: str):
    if device != "cuda":
        raise SkipPeer("Triton kernels: on the CPU they would time the Triton interpreter")
    from liger_kernel.transformers import LigerFusedLinearJSD

    jsd = LigerFusedLinearJSD(jsd_beta=0.5, temperature=TEMPERATURE)
    return lambda h, weight, teacher_h, teacher_weight: jsd(h, weight, teacher_h, teacher_weight)


def fused_loss(backend: str = "auto", kind: str = "kl"):
    """kd_kernels' fused head + loss on the benchmark's inputs (beta 0.5 for jsd)."""
    return lambda h, weight, teacher_h, teacher_weight: kdk.fused_linear_kd_loss(
        h,
        weight,
        teacher_hidden=teacher_h,
        teacher_weight=teacher_weight,
        temperature=TEMPERATURE,
        kind=kind,
        beta=0.5,
        backend=backend,
    )


def _fused_jsd(device: str):
    if device != "cuda":
        raise SkipPeer("compared with Liger's JSD, which runs on GPU only")
    return fused_loss(kind="jsd")


def _suite_implementations(device: str, quick: bool) -> tuple[dict, dict]:
    return suite_implementations(
        device,
        quick,
        "eager",
        eager,
        {
            "kd_kernels kd_loss (unfused logits)": lambda: unfused_kd_loss,
            "Liger FusedLinearJSD": lambda: _liger(device),
            "kd_kernels fused_linear (jsd)": lambda: _fused_jsd(device),
        },
        fused_loss,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(eager)")
    add_common_arguments(parser, repeats=3, warmup=1)
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    impls = competitors(SUITE, args.device, args.compile)
    failed: set[str] = set()
    rows, tables = [], []
    for size in args.rows:
        inputs = make_inputs(size, args.vocab, args.hidden)(dtype, args.device)
        wrt = SUITE.differentiable(inputs)
        results = []
        for name, loss_fn in impls.items():
            if name in failed:
                continue
            step = loss_step(loss_fn, inputs, wrt)
            result = measure_at_size(name, step, size, args, rows, failed)
            if result is not None:
                results.append(result)
        del inputs, wrt
        if not results:
            continue
        baseline = "eager" if any(r.name == "eager" for r in results) else results[0].name
        heading = f"### N={size} V={args.vocab} H={args.hidden}"
        tables.append(f"{heading}\n\n" + markdown_table(results, baseline))
    table = "\n\n".join(tables)
    name = f"fused_linear_kd_V{args.vocab}_H{args.hidden}_{args.dtype}"
    payload = report("fused_linear_kd fwd+bwd", name, args, rows, table)
    if not args.no_save:
        folder = os.path.join(os.path.dirname(__file__), "results", args.device)
        print("wrote", plot(rows, args, os.path.join(folder, f"{name}.png")))
    return payload


def plot(rows: list[dict], args: argparse.Namespace, path: str) -> str:
    """Time and peak extra memory against N, a line per implementation, log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple]] = {}
    for row in rows:
        if not row.get("out_of_memory"):
            lines.setdefault(row["name"], []).append(
                (row["n"], row["median_ms"], row["peak_extra_mib"])
            )
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, 4))
    plot_lines(time_axis, memory_axis, lines)
    for axis, ylabel in ((time_axis, "median ms, fwd+bwd"), (memory_axis, "peak extra MiB")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("rows N")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
    time_axis.legend(fontsize=7)
    figure.suptitle(
        f"fused_linear_kd, V={args.vocab}, H={args.hidden}, {args.dtype} on {args.device}"
    )
    figure.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


# The suite (python -m benchmarks): an LLM vocabulary (Llama 3, 128256) against the rows N.
def _suite_cases(device: str, quick: bool) -> list:
    if quick:
        return [("N=64 V=4096 H=64", 64, make_inputs(64, 4096, 64))]
    if device == "cpu":
        sizes, vocab, hidden = (128, 256, 512, 1024), 128256, 256
    else:
        sizes, vocab, hidden = (1024, 4096, 8192, 16384), 128256, 4096
    return [(f"N={n} V={vocab} H={hidden}", n, make_inputs(n, vocab, hidden)) for n in sizes]


def _flops(inputs) -> int:
    """fwd+bwd matmuls: student and teacher logits, the hidden and the weight gradients."""
    student_hidden, student_weight, teacher_hidden, _ = inputs
    rows, hidden = student_hidden.shape
    vocab, teacher_size = student_weight.shape[0], teacher_hidden.shape[1]
    return 2 * rows * vocab * (3 * hidden + teacher_size)


SUITE = OpSuite(
    op="fused_linear_kd",
    cases=_suite_cases,
    implementations=_suite_implementations,
    differentiable=lambda inputs: [inputs[0], inputs[1]],
    flops=_flops,
)


if __name__ == "__main__":
    main()
