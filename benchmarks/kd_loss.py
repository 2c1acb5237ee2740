"""kd_loss forward + backward against eager PyTorch written the usual way.

    python -m benchmarks.kd_loss                      # N=4096, C=32000, fp32, on the CPU
    python -m benchmarks.kd_loss --device cuda --dtype bfloat16 --rows 8192 --classes 128256

Eager baseline (t = 2): ``F.kl_div(F.log_softmax(s / t), F.softmax(p / t), "batchmean") * t * t``;
TextBrewer's kd_ce_loss and, on a GPU, Liger's KLDiv and JSD where they install.
Ratios (speed-up, memory) come from one run on one machine; absolute times only on a GPU.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import kd_kernels as kdk
from benchmarks._harness import (
    OpSuite,
    SkipPeer,
    add_common_arguments,
    competitors,
    markdown_table,
    measure_each,
    report,
    suite_implementations,
)
from benchmarks._peers import textbrewer_losses


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(eager)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(args.rows, args.classes, generator=generator).to(args.device, dtype)
    teacher = torch.randn(args.rows, args.classes, generator=generator).to(args.device, dtype)
    student.requires_grad_(True)

    impls = competitors(SUITE, args.device, args.compile)
    results = measure_each(impls, (student, teacher), [student], args)

    table = markdown_table(results, baseline="eager")
    name = f"kd_loss_{args.rows}x{args.classes}_{args.dtype}"
    return report("kd_loss fwd+bwd", name, args, results, table)


# The suite (python -m benchmarks): GLUE heads, where launches and syncs dominate, up to LLM
# vocabularies.
SUITE_TEMPERATURE = 2.0


def _suite_cases(device: str, quick: bool) -> list:
    if quick:
        sizes = [(32, 2), (256, 1000)]
    elif device == "cpu":
        sizes = [(32, 2), (256, 3), (1024, 32000), (4096, 32000), (2048, 128256)]
    else:
        sizes = [(32, 2), (256, 3), (4096, 32000), (8192, 128256), (16384, 128256), (4096, 256000)]
        # Few long rows (each row split over several programs) and GPT-2's odd vocabulary
        # (rows read from their 16-byte boundary).
        sizes += [(8, 262144), (8, 50257), (4096, 50257)]

    def make(rows, classes):
        def inputs(dtype, device):
            generator = torch.Generator().manual_seed(0)
            student = torch.randn(rows, classes, generator=generator) * 3
            teacher = torch.randn(rows, classes, generator=generator) * 3
            return student.to(device, dtype).requires_grad_(), teacher.to(device, dtype)

        return inputs

    return [(f"N={n} C={c}", n * c, make(n, c)) for n, c in sizes]


def _suite_implementations(device: str, quick: bool) -> tuple[dict, dict]:
    t = SUITE_TEMPERATURE

    def textbrewer():
        kd_ce_loss = textbrewer_losses().kd_ce_loss
        return lambda s, p: kd_ce_loss(s, p, t)

    return suite_implementations(
        device,
        quick,
        "eager",
        lambda s, p: eager_kd_loss(s, p, t),
        {
            "TextBrewer kd_ce_loss": textbrewer,
            "Liger KLDiv": lambda: _liger(device, "kl"),
            "Liger JSD": lambda: _liger(device, "jsd"),
        },
        lambda backend: lambda s, p: kdk.kd_loss(s, p, temperature=t, backend=backend),
    )


def _liger(device: str, kind: str):
    if device != "cuda":
        raise SkipPeer("Triton kernels: on the CPU they would time the Triton interpreter")
    from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss

    t = SUITE_TEMPERATURE
    if kind == "jsd":
        jsd = LigerJSD(beta=0.5)
        return lambda s, p: jsd(F.log_softmax(s / t, dim=-1), F.log_softmax(p / t, dim=-1))
    kl_div = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def liger_kl(student, teacher):
        log_p_s = F.log_softmax(student.float() / t, dim=-1)
        return kl_div(log_p_s, F.log_softmax(teacher.float() / t, dim=-1)) * t * t

    return liger_kl


SUITE = OpSuite(
    op="kd_loss",
    cases=_suite_cases,
    implementations=_suite_implementations,
    differentiable=lambda inputs: [inputs[0]],
    # Ideal fwd+bwd: read student and teacher once, write the gradient once.
    traffic_bytes=lambda inputs: 3 * inputs[0].numel() * inputs[0].element_size(),
)


if __name__ == "__main__":
    main()
