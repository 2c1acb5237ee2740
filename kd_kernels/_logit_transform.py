"""Final-logit transforms of today's LM heads, applied chunk by chunk in fused_linear_kd_loss:
a logit multiplier (Cohere's ``logit_scale``) and soft-capping z -> cap tanh(z / cap) (Gemma 2
and 3's ``final_logit_softcapping``)."""

from __future__ import annotations

import math

import torch


def check_logit_transform(name: str, value: object) -> float | None:
    """None, or a finite number > 0 (``softcap``, ``logit_scale`` and their teacher twins)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


class LogitTransform:
    """z -> cap * tanh(scale * z / cap); without a cap, scale * z; without a scale, scale 1.

    ``apply`` is out of place and differentiable (the reference); ``apply_`` works in place on
    a chunk's logits; ``derivative`` gives dz'/dz for the chain rule of the chunk loop.
    """

    def __init__(self, softcap: float | None, scale: float | None):
        self.softcap, self.scale = softcap, scale

    @staticmethod
    def of(softcap: float | None, scale: float | None) -> LogitTransform | None:
        return None if softcap is None and scale is None else LogitTransform(softcap, scale)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            z = z * self.scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def derivative(self, raw: torch.Tensor) -> torch.Tensor | float:
        """dz'/dz at the raw logits z: scale, or scale * sech^2(scale * z / cap) in float32
        (sech, not 1 - tanh^2, which cancels where the cap saturates)."""
        scale = 1.0 if self.scale is None else self.scale
        if self.softcap is None:
            return scale
        sech = torch.cosh(raw.float() * (scale / self.softcap)).reciprocal()
        return sech * sech * scale
