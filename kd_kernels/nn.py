"""nn.Module wrappers around kd_kernels.functional, one per loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kd_kernels import functional
from kd_kernels.fused_linear import fused_linear_kd_loss

__all__ = [
    "AttentionMSELoss",
    "FusedLinearKDLoss",
    "HiddenMSELoss",
    "InfoNCELoss",
    "KDLoss",
]


class KDLoss(torch.nn.Module):
    """Module form of :func:`kd_kernels.kd_loss`; options are fixed at construction.

    ``forward(student_logits, teacher_logits, mask=None, labels=None, normalizer=None)``:
    ``normalizer`` varies per step (the counted tokens of all micro-batches), so it is a
    forward argument.
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
        normalizer: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return functional.kd_loss(
            student_logits,
            teacher_logits,
            mask=mask,
            labels=labels,
            normalizer=normalizer,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


class AttentionMSELoss(torch.nn.Module):
    """Module form of :func:`kd_kernels.attention_mse_loss`.

    ``forward(student_attn, teacher_attn, attention_mask=None)``: tensors (B, H, L, L) or
    equal-length sequences of them (one per matched layer).
    """

    def __init__(
        self, threshold: float | None = -100.0, layer_reduction: str = "sum", backend: str = "auto"
    ) -> None:
        super().__init__()
        self.options = dict(threshold=threshold, layer_reduction=layer_reduction, backend=backend)

    def forward(
        self,
        student_attn: torch.Tensor | Sequence[torch.Tensor],
        teacher_attn: torch.Tensor | Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return functional.attention_mse_loss(
            student_attn, teacher_attn, attention_mask=attention_mask, **self.options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


class HiddenMSELoss(torch.nn.Module):
    """Module form of :func:`kd_kernels.hidden_mse_loss`.

    ``forward(student_hidden, teacher_hidden, attention_mask=None)``: tensors (B, L, D) or
    equal-length sequences of them.
    """

    def __init__(self, layer_reduction: str = "sum", backend: str = "auto") -> None:
        super().__init__()
        self.options = dict(layer_reduction=layer_reduction, backend=backend)

    def forward(
        self,
        student_hidden: torch.Tensor | Sequence[torch.Tensor],
        teacher_hidden: torch.Tensor | Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return functional.hidden_mse_loss(
            student_hidden, teacher_hidden, attention_mask=attention_mask, **self.options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


class InfoNCELoss(torch.nn.Module):
    """Module form of :func:`kd_kernels.info_nce_loss`.

    ``learnable_temperature=True`` makes the temperature an ``nn.Parameter`` (trained in log
    space, as CLIP trains its logit scale, so it stays positive).
    ``forward(query, key, labels=None)``.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        similarity: str = "cosine",
        symmetric: bool = False,
        reduction: str = "mean",
        gather_distributed: bool = False,
        learnable_temperature: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.options = dict(
            similarity=similarity,
            symmetric=symmetric,
            reduction=reduction,
            gather_distributed=gather_distributed,
            backend=backend,
        )
        self.temperature = temperature
        if learnable_temperature:
            self.log_temperature = torch.nn.Parameter(torch.tensor(float(temperature)).log())

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        temperature = self.temperature
        if hasattr(self, "log_temperature"):
            temperature = self.log_temperature.exp()
        return functional.info_nce_loss(
            query, key, temperature=temperature, labels=labels, **self.options
        )

    def extra_repr(self) -> str:
        options = {"temperature": self.temperature, **self.options}
        return ", ".join(f"{key}={value!r}" for key, value in options.items())


class FusedLinearKDLoss(torch.nn.Module):
    """Module form of :func:`kd_kernels.fused_linear_kd_loss`; options fixed at construction.

    ``forward(student_hidden, student_weight, teacher_logits=None, *, student_bias=None,
    teacher_hidden=None, teacher_weight=None, teacher_bias=None, teacher_topk=None, mask=None,
    labels=None, normalizer=None)``; pass an LM head's ``weight`` and ``bias`` as the student's.
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
        topk_remainder: str = "renormalize",
        chunk_size: int | tuple[int, int | None] | None = None,
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
            topk_remainder=topk_remainder,
            chunk_size=chunk_size,
            backend=backend,
        )

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        **tensors: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        return fused_linear_kd_loss(
            student_hidden, student_weight, teacher_logits, **tensors, **self.options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
