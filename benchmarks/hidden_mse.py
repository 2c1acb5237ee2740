"""TinyBERT hidden-state MSE over matched layers, for the suite (``python -m benchmarks``).

Implementations: a Python loop of ``F.mse_loss`` (TinyBERT's rep_loss), TextBrewer's
``hid_mse_loss`` loop, ``torch.compile`` of the loop, and the fused backends, on (B, L, D)
hidden states of 1-13 matched layers (embeddings + 12).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kd_kernels as kdk
from benchmarks._harness import OpSuite, suite_implementations
from benchmarks._peers import textbrewer_losses


def mse_loop(students: list[torch.Tensor], teachers: list[torch.Tensor]) -> torch.Tensor:
    return sum(F.mse_loss(s, t) for s, t in zip(students, teachers, strict=True))


def _suite_cases(device: str, quick: bool) -> list:
    if quick:
        shapes = [(1, 2, 16, 32), (5, 2, 16, 32)]
    else:
        shapes = [(1, 32, 128, 768), (5, 32, 128, 768), (13, 32, 128, 768)]

    def make(layers, batch, length, width):
        def inputs(dtype, device):
            generator = torch.Generator().manual_seed(0)
            shape = (batch, length, width)
            students = [torch.randn(shape, generator=generator) for _ in range(layers)]
            teachers = [torch.randn(shape, generator=generator) for _ in range(layers)]
            students = [s.to(device, dtype).requires_grad_() for s in students]
            return students, [t.to(device, dtype) for t in teachers]

        return inputs

    return [
        (f"{n} layers B={b} L={length} D={d}", n * b * length * d, make(n, b, length, d))
        for n, b, length, d in shapes
    ]


def _suite_implementations(device: str, quick: bool) -> tuple[dict, dict]:
    def textbrewer():
        hid_mse_loss = textbrewer_losses().hid_mse_loss
        return lambda students, teachers: sum(
            hid_mse_loss(s, t) for s, t in zip(students, teachers, strict=True)
        )

    return suite_implementations(
        device,
        quick,
        "F.mse_loss loop",
        mse_loop,
        {"TextBrewer hid_mse_loss": textbrewer},
        lambda backend: lambda s, t: kdk.hidden_mse_loss(s, t, backend=backend),
    )


SUITE = OpSuite(
    op="hidden_mse",
    cases=_suite_cases,
    implementations=_suite_implementations,
    differentiable=lambda inputs: inputs[0],
    traffic_bytes=lambda inputs: 3 * sum(s.numel() * s.element_size() for s in inputs[0]),
)
