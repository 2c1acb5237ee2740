"""TinyBERT attention-map MSE, forward + backward: fused kernels against TinyBERT's own loop.

    python -m benchmarks.attention_mse            # 4 of 12 layers, B=32, H=12, L=128, fp32, CPU
    python -m benchmarks.attention_mse --device cuda --dtype bfloat16 --length 512

Inputs are BERT-like pre-softmax scores, padding keys masked with -10000 (a quarter of each
sequence is padding). The student's 4 layers are matched to teacher layers 2, 5, 8, 11
(``kdk.layer_map(4, 12)``). Baseline: TinyBERT's loop, ``torch.where(att <= -1e2, 0, att)`` on
both sides then ``MSELoss``, summed over layers. Ratios come from one run on one machine.
"""

from __future__ import annotations

import argparse

import torch

import kd_kernels as kdk
from benchmarks._harness import (
    OpSuite,
    add_common_arguments,
    competitors,
    markdown_table,
    measure_each,
    report,
    suite_implementations,
)
from benchmarks._peers import textbrewer_losses


def tinybert_loop(students: list[torch.Tensor], teachers: list[torch.Tensor]) -> torch.Tensor:
    loss_mse = torch.nn.MSELoss()
    att_loss = 0.0
    for student, teacher in zip(students, teachers, strict=True):
        student = torch.where(student <= -1e2, torch.zeros_like(student), student)
        teacher = torch.where(teacher <= -1e2, torch.zeros_like(teacher), teacher)
        att_loss = att_loss + loss_mse(student, teacher)
    return att_loss


def bert_like_scores(layers, batch, heads, length, dtype, device, generator):
    real = torch.arange(length)[None, :] < (length - length // 4)
    padding = (~real).float()[:, None, None, :] * -10000.0
    return [
        (torch.randn(batch, heads, length, length, generator=generator) * 2 + padding).to(
            device, dtype
        )
        for _ in range(layers)
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--teacher-layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(loop)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.length)
    students = bert_like_scores(args.student_layers, *shape, dtype, args.device, generator)
    teacher_layers = bert_like_scores(args.teacher_layers, *shape, dtype, args.device, generator)
    mapping = kdk.layer_map(args.student_layers, args.teacher_layers)
    teachers = [teacher_layers[i] for i in mapping.attention]
    for student in students:
        student.requires_grad_(True)

    impls = competitors(SUITE, args.device, args.compile)
    results = measure_each(impls, (students, teachers), students, args)

    table = markdown_table(results, baseline="TinyBERT loop")
    shape = f"{args.student_layers}x{args.batch}x{args.heads}x{args.length}"
    layers = {"attention": list(mapping.attention)}
    name = f"attention_mse_{shape}_{args.dtype}"
    return report("attention_mse fwd+bwd", name, args, results, table, layer_map=layers)


# The suite (python -m benchmarks): 1-12 matched layers, L = 128-512.
def _suite_cases(device: str, quick: bool) -> list:
    if quick:
        shapes = [(1, 2, 2, 32), (4, 2, 2, 32)]
    elif device == "cpu":
        shapes = [(1, 32, 12, 128), (4, 32, 12, 128), (12, 32, 12, 128), (4, 8, 12, 512)]
    else:
        shapes = [(1, 32, 12, 128), (4, 32, 12, 128), (12, 32, 12, 128), (4, 32, 12, 512)]

    def make(layers, batch, heads, length):
        def inputs(dtype, device):
            generator = torch.Generator().manual_seed(0)
            shape = (batch, heads, length)
            students = bert_like_scores(layers, *shape, dtype, device, generator)
            teachers = bert_like_scores(layers, *shape, dtype, device, generator)
            return [s.requires_grad_() for s in students], teachers

        return inputs

    return [
        (f"{n} layers B={b} H={h} L={length}", n * b * h * length * length, make(n, b, h, length))
        for n, b, h, length in shapes
    ]


def _suite_implementations(device: str, quick: bool) -> tuple[dict, dict]:
    def textbrewer():
        att_mse_loss = textbrewer_losses().att_mse_loss
        return lambda students, teachers: sum(
            att_mse_loss(s, t) for s, t in zip(students, teachers, strict=True)
        )

    return suite_implementations(
        device,
        quick,
        "TinyBERT loop",
        tinybert_loop,
        {"TextBrewer att_mse_loss": textbrewer},
        lambda backend: lambda s, t: kdk.attention_mse_loss(s, t, backend=backend),
    )


SUITE = OpSuite(
    op="attention_mse",
    cases=_suite_cases,
    implementations=_suite_implementations,
    differentiable=lambda inputs: inputs[0],
    # Ideal fwd+bwd: read every student and teacher map once, write the gradient once.
    traffic_bytes=lambda inputs: 3 * sum(s.numel() * s.element_size() for s in inputs[0]),
)


if __name__ == "__main__":
    main()
