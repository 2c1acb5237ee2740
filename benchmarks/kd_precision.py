"""kd_loss precision when the student is close to the teacher (issue 17's table).

    python -m benchmarks.kd_precision                        # C = 32000, the issue's table
    python -m benchmarks.kd_precision --classes 2 1000 128000 --rows 2

Student logits of standard deviation ~4 (from a head whose float32 product is exact), teacher =
student + noise * N(0, 1) (K teachers: K such draws), both float32. Each entry is
``loss error / gradient error``, relative to float64 computed from the very same float32 inputs:
|loss - loss64| / |loss64| and max|g - g64| / max|g64|. Columns: eager PyTorch in float32 (the
usual log_softmax composition), kd_kernels' backends (torch = reference.py, cpu, triton under
TRITON_INTERPRET=1 without a GPU), and fused_linear_kd_loss on the cpu backend in row chunks and
in vocabulary chunks (a head whose float32 logits are exact), whose gradient is that of the
hidden states: "head floor" is the error of the exact logit gradient taken through the float32
matmul G @ W, the part of the fused gradient error that no loss formula can remove.
Target (issue 17): loss within 1e-3, gradient within 1e-4 at noise 1e-3.
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kd_kernels as kdk

KINDS = ("kl", "soft_ce", "reverse_kl", "jsd")


def composed_loss(
    student: torch.Tensor, teacher: torch.Tensor, t: float, kind: str, beta: float = 0.5
) -> torch.Tensor:
    """Batchmean loss composed from log_softmax in the student's dtype (teacher (K, N, C):
    mean of probabilities): in float64 the ground truth, in float32 eager PyTorch as users
    write it."""
    teacher = teacher.to(student.dtype)
    log_p_s = torch.log_softmax(student / t, -1)
    log_p_t = torch.logsumexp(torch.log_softmax(teacher / t, -1), 0)
    log_p_t = log_p_t - torch.log(torch.tensor(float(teacher.shape[0]), dtype=student.dtype))
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    if kind == "kl":
        terms = p_t * (log_p_t - log_p_s)
    elif kind == "soft_ce":
        terms = -p_t * log_p_s
    elif kind == "reverse_kl":
        terms = p_s * (log_p_s - log_p_t)
    else:
        log_m = torch.log(beta * p_t + (1 - beta) * p_s)
        terms = beta * p_t * (log_p_t - log_m) + (1 - beta) * p_s * (log_p_s - log_m)
    return (terms.sum(-1) * t * t).mean()


def errors(loss, grad, loss64, grad64) -> tuple[float, float]:
    loss_error = (loss.double() - loss64).abs().item() / max(loss64.abs().item(), 1e-300)
    grad_error = (grad.double() - grad64).abs().max().item() / grad64.abs().max().item()
    return loss_error, grad_error


def exact_head(rows: int, classes: int, hidden: int, generator: torch.Generator):
    """(h, W) with small dyadic entries: h @ W.T is exact in float32 (multiples of 1/128 below
    2^24 / 128), logits of standard deviation about 4, as in the issue."""
    h = torch.randint(-8, 9, (rows, hidden), generator=generator).float() / 8
    w = torch.randint(-24, 25, (classes, hidden), generator=generator).float() / 16
    return h, w


def measure(rows, classes, noise, t, kind, teachers, backends, generator) -> dict:
    beta = 0.5
    hidden = 64
    h, w = exact_head(rows, classes, hidden, generator)
    student = h @ w.T  # exact
    teacher = student + noise * torch.randn(teachers, rows, classes, generator=generator)
    if teachers == 1:
        teacher = teacher[0]
    s64 = student.double().requires_grad_()
    loss64 = composed_loss(s64, teacher.reshape(-1, rows, classes), t, kind, beta)
    (grad64,) = torch.autograd.grad(loss64, s64)
    loss64 = loss64.detach()
    out = {}
    options = dict(temperature=t, kind=kind, beta=beta)
    for backend in backends:
        s = student.clone().requires_grad_()
        if backend == "eager":
            loss = composed_loss(s, teacher.reshape(-1, rows, classes), t, kind, beta)
        elif backend.startswith("fused"):
            hh = h.clone().requires_grad_()
            chunk = rows if backend == "fused rows" else (rows, max(1, classes // 3))
            loss = kdk.fused_linear_kd_loss(
                hh, w, teacher, chunk_size=chunk, backend="cpu", **options
            )
            (grad_h,) = torch.autograd.grad(loss, hh)
            out[backend] = errors(loss, grad_h, loss64, (grad64 @ w.double()))
            continue
        elif backend == "head floor":
            # The exact logit gradient through the float32 head matmul: what no loss can beat.
            grad_h = (grad64.float() * rows) @ w / rows
            out[backend] = errors(loss64, grad_h, loss64, (grad64 @ w.double()))
            continue
        else:
            loss = kdk.kd_loss(s, teacher, backend=backend, **options)
        (grad,) = torch.autograd.grad(loss, s)
        out[backend] = errors(loss, grad, loss64, grad64)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--classes", type=int, nargs="+", default=[32000])
    parser.add_argument("--noise", type=float, nargs="+", default=[1e-2, 1e-3])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 4.0, 20.0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS))
    parser.add_argument("--teachers", type=int, nargs="+", default=[1, 3])
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["eager", "torch", "cpu", "triton", "fused rows", "fused vocab", "head floor"],
    )
    args = parser.parse_args(argv)
    backends = [
        b
        for b in args.backends
        if b in ("eager", "fused rows", "fused vocab", "head floor")
        or b in kdk.available_backends()
    ]
    generator = torch.Generator().manual_seed(0)
    header = "| C | noise | t | kind | K | " + " | ".join(backends) + " |"
    print(header)
    print("|" + " --- |" * 5 + " ---: |" * len(backends))
    results = []
    for classes in args.classes:
        for noise in args.noise:
            for t in args.temperatures:
                for kind in args.kinds:
                    for teachers in args.teachers:
                        if teachers > 1 and kind not in ("kl", "jsd"):
                            continue
                        found = measure(
                            args.rows, classes, noise, t, kind, teachers, backends, generator
                        )
                        cells = " | ".join(f"{a:.1e} / {b:.1e}" for a, b in found.values())
                        print(f"| {classes} | {noise:g} | {t:g} | {kind} | {teachers} | {cells} |")
                        results.append(
                            dict(classes=classes, noise=noise, t=t, kind=kind, teachers=teachers)
                            | {k: v for k, v in found.items()}
                        )
    return results


if __name__ == "__main__":
    main()
