"""nn.Module wrappers around kd_kernels.functional, one per loss."""

from __future__ import annotations

import torch

from kd_kernels import functional

__all__ = ["KDLoss"]


class KDLoss(torch.nn.Module):
    """Module form of :func:`kd_kernels.kd_loss`; options are fixed at construction.

    ``forward(student_logits, teacher_logits, mask=None, labels=None)``.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        kind: str = "kl",
        reduction: str = "batchmean",
        ignore_index: int = -100,
        hard_weight: float = 0.0,
        soft_weight: float = 1.0,
        beta: float = 0.5,
        scale_t2: bool = True,
        inplace_grad: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.options = dict(
            temperature=temperature,
            kind=kind,
            reduction=reduction,
            ignore_index=ignore_index,
            hard_weight=hard_weight,
            soft_weight=soft_weight,
            beta=beta,
            scale_t2=scale_t2,
            inplace_grad=inplace_grad,
            backend=backend,
        )

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return functional.kd_loss(
            student_logits, teacher_logits, mask=mask, labels=labels, **self.options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
