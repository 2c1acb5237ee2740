"""Argument checks shared by every loss: each error names the argument and what it saw."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def check_float_tensor(name: str, value: object) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a float tensor (fp32, fp16, bf16), got {value.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        seen = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"inputs must be on one device, got {seen}")


def check_temperature(temperature: object) -> None:
    if isinstance(temperature, torch.Tensor):
        raise TypeError("temperature must be a Python float for this loss, got a tensor")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_row_tensor(
    name: str, value: object, row_shape: torch.Size, device: torch.device, *, kind: str
) -> None:
    """A per-row tensor (mask: kind="bool", labels: kind="int") of shape ``row_shape``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if kind == "bool" and value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {value.dtype}")
    if kind == "int" and (
        value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
    ):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if value.shape != row_shape:
        raise ValueError(
            f"{name} must have the logits' row shape {tuple(row_shape)}, got {tuple(value.shape)}"
        )
    if value.device != device:
        raise ValueError(f"{name} is on {value.device}, the logits on {device}")


def labels_out_of_range(labels: torch.Tensor, num_classes: int, ignore_index: int) -> bool:
    """True if a label is neither ignore_index nor in [0, num_classes) (one host sync)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    return bool(bad.any())
