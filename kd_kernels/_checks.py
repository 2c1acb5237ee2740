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
    name: str, value: object, row_shape: torch.Size | None, device: torch.device, *, kind: str
) -> None:
    """A per-row tensor (kind="bool": bool; kind="mask": bool, integer or float, non-zero
    counts; kind="int": integer labels) of shape ``row_shape`` (None: any shape)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if kind == "bool" and value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {value.dtype}")
    if kind == "mask" and value.is_complex():
        raise TypeError(f"{name} must be a bool, integer or float tensor, got {value.dtype}")
    if kind == "int" and (
        value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
    ):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if row_shape is not None and value.shape != row_shape:
        raise ValueError(
            f"{name} must have the logits' row shape {tuple(row_shape)}, got {tuple(value.shape)}"
        )
    if value.device != device:
        raise ValueError(f"{name} is on {value.device}, the logits on {device}")


def labels_out_of_range(
    labels: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> bool:
    """True if a label is neither ignore_index nor in [0, num_classes) (one host sync)."""
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad = bad & (labels != ignore_index)
    return bool(bad.any())


def check_layer_pairs(
    student_name: str, teacher_name: str, student: object, teacher: object, ndim: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Matched layers as two equal-length lists of ``ndim``-d tensors of equal shapes pairwise.

    A single tensor is one layer. All layers share the student's dtype and device.
    """
    students, teachers = (
        _as_layer_list(student_name, student),
        _as_layer_list(teacher_name, teacher),
    )
    if len(students) != len(teachers):
        raise ValueError(
            f"{student_name} has {len(students)} layers, {teacher_name} {len(teachers)}; "
            "pass one teacher layer per student layer (see kd_kernels.layer_map)"
        )
    dtype, device = students[0].dtype, students[0].device
    for index, (s, t) in enumerate(zip(students, teachers, strict=True)):
        if s.dim() != ndim:
            raise ValueError(f"{student_name}[{index}] must be {ndim}-d, got {tuple(s.shape)}")
        if s.shape != t.shape:
            raise ValueError(
                f"layer {index}: {student_name} has shape {tuple(s.shape)}, {teacher_name} "
                f"{tuple(t.shape)}; shapes must match pairwise"
            )
        if s.dtype != dtype or t.dtype != dtype:
            raise TypeError(
                f"layer {index}: every layer must have dtype {dtype}, got {s.dtype} and "
                f"{t.dtype}; cast the teacher with .to(student.dtype)"
            )
        if s.device != device or t.device != device:
            raise ValueError(
                f"layer {index}: inputs must be on {device}, got {s.device}, {t.device}"
            )
    return students, teachers


def _as_layer_list(name: str, value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        layers = [value]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        layers = list(value)
    else:
        raise TypeError(
            f"{name} must be a tensor or a sequence of tensors, got {type(value).__name__}"
        )
    if not layers:
        raise ValueError(f"{name} is an empty sequence; pass at least one layer")
    for index, layer in enumerate(layers):
        check_float_tensor(f"{name}[{index}]", layer)
    return layers


def check_token_mask(
    attention_mask: object, layers: list[torch.Tensor], token_dim: int
) -> torch.Tensor:
    """A (B, L) bool, integer or float padding mask (non-zero = real token, as Hugging Face
    and TextBrewer pass it) matching every layer; returned as contiguous bool."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}"
        )
    if attention_mask.is_complex():
        raise TypeError(
            "attention_mask must be bool, integer or float (non-zero = real token), got "
            f"{attention_mask.dtype}"
        )
    for index, layer in enumerate(layers):
        expected = (layer.shape[0], layer.shape[token_dim])
        if tuple(attention_mask.shape) != expected:
            raise ValueError(
                f"attention_mask must be (B, L) = {expected} for layer {index} of shape "
                f"{tuple(layer.shape)}, got {tuple(attention_mask.shape)}"
            )
    if attention_mask.device != layers[0].device:
        raise ValueError(
            f"attention_mask is on {attention_mask.device}, the inputs on {layers[0].device}"
        )
    return (attention_mask != 0).contiguous()


def check_teacher_topk(
    teacher_topk: object,
    row_shape: torch.Size,
    num_classes: int,
    device: torch.device,
    remainder: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse teacher ``(indices, logprobs)``, both (..., k) over the student's rows.

    Returns (int64 indices, logprobs). In eager mode also checks, with one host sync each, that
    indices lie in [0, C) and are distinct per row, and, for ``remainder="spread"`` or
    ``"bucket"``, that the logprobs are log-probabilities (their exp sums to at most 1 per row).
    """
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError(
            "teacher_topk must be a pair (indices, logprobs) of (..., k) tensors, got "
            f"{type(teacher_topk).__name__}"
        )
    indices, logprobs = teacher_topk
    check_row_tensor("teacher_topk indices", indices, None, device, kind="int")
    check_float_tensor("teacher_topk logprobs", logprobs)
    if indices.shape != logprobs.shape or indices.shape[:-1] != row_shape or indices.dim() == 0:
        raise ValueError(
            f"teacher_topk indices and logprobs must both be (..., k) with the student's rows "
            f"{tuple(row_shape)}, got {tuple(indices.shape)} and {tuple(logprobs.shape)}"
        )
    k = indices.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"teacher_topk k must be in [1, C={num_classes}], got k={k}")
    if logprobs.device != device:
        raise ValueError(f"teacher_topk logprobs are on {logprobs.device}, the student on {device}")
    indices = indices.to(torch.int64)
    if not torch.compiler.is_compiling():
        if labels_out_of_range(indices, num_classes):
            raise ValueError(f"teacher_topk indices must lie in [0, {num_classes})")
        ordered = indices.sort(dim=-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise ValueError("teacher_topk indices must be distinct within each row")
        # Stored half-precision log-probabilities may overshoot 1 by their rounding.
        slack = max(1e-3, k * torch.finfo(logprobs.dtype).eps)
        if remainder in ("spread", "bucket") and bool(
            (logprobs.float().exp().sum(-1) > 1.0 + slack).any()
        ):
            raise ValueError(
                "teacher_topk logprobs must be log-probabilities (exp sums to <= 1 per row) "
                f"for topk_remainder={remainder!r}; logits can only be renormalized"
            )
    return indices, logprobs


def normalizer_divisor(
    normalizer: object, reduction: str, num_classes: int, device: torch.device
) -> float | torch.Tensor:
    """What the summed KD loss is divided by when ``normalizer`` is given: the normalizer for
    ``"batchmean"``, normalizer * C for ``"mean"``. A number must be finite and > 0; a tensor
    must be 0-dim (float or integer) and is not value-checked, so that it costs no host sync.
    """
    if reduction not in ("batchmean", "mean"):
        raise ValueError(
            f"normalizer replaces the row count of reduction='batchmean' or 'mean'; got "
            f"reduction={reduction!r}"
        )
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0 or normalizer.is_complex() or normalizer.dtype == torch.bool:
            raise ValueError(
                "normalizer must be a number or a 0-dim float or integer tensor, got a tensor of "
                f"shape {tuple(normalizer.shape)} and dtype {normalizer.dtype}"
            )
        if normalizer.device != device and normalizer.device.type != "cpu":
            raise ValueError(f"normalizer is on {normalizer.device}, the logits on {device}")
        divisor = normalizer.detach().to(device, non_blocking=True)
        return divisor * num_classes if reduction == "mean" else divisor
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
        raise TypeError(
            f"normalizer must be a number or a 0-dim tensor, got {type(normalizer).__name__}"
        )
    if not (normalizer > 0 and math.isfinite(normalizer)):
        raise ValueError(f"normalizer must be a finite number > 0, got {normalizer}")
    return float(normalizer) * (num_classes if reduction == "mean" else 1)


def as_bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A checked row mask as bool: non-zero counts (float 0/1 masks as Hugging Face code holds
    them, integer ones, bool ones unchanged)."""
    return mask if mask is None or mask.dtype == torch.bool else mask != 0
