"""Which backends this machine can run, and which one a call uses.

Backends: "torch" (reference.py, anywhere), "cpu" (C++ kernels in kd_kernels._C),
"cuda" (CUDA kernels in kd_kernels._C, when built with nvcc), "triton" (GPU, or CPU tensors
under TRITON_INTERPRET=1). "auto" picks the fastest one for the tensors' device.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")

try:  # the C++ extension is optional: a source checkout without a build still imports
    from kd_kernels import _C  # noqa: F401

    HAS_EXTENSION = True
except ImportError:
    HAS_EXTENSION = False

HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_cuda_kernels() -> bool:
    """True when kd_kernels._C was built with its CUDA kernels."""
    return HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
        "kd_kernels::kd_loss_forward", "CUDA"
    )


def available_backends() -> list[str]:
    """The backends that can run on this machine, fastest first for its best device."""
    found = []
    if HAS_TRITON and (torch.cuda.is_available() or triton_interpreting()):
        found.append("triton")
    if has_cuda_kernels() and torch.cuda.is_available():
        found.append("cuda")
    if HAS_EXTENSION:
        found.append("cpu")
    found.append("torch")
    return found


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for tensors on ``device``: raises ValueError if it cannot run."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    on_gpu = device.type == "cuda"
    if requested == "auto":
        if dtype == torch.float64:
            return "cpu" if (not on_gpu and HAS_EXTENSION) else "torch"
        if on_gpu:
            if HAS_TRITON:
                return "triton"
            return "cuda" if has_cuda_kernels() else "torch"
        return "cpu" if HAS_EXTENSION else "torch"
    if requested == "torch":
        return requested
    if requested == "cpu":
        if not HAS_EXTENSION:
            raise ValueError("backend='cpu' needs the C++ extension kd_kernels._C, not built here")
        if on_gpu:
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        return requested
    if requested == "cuda":
        if not has_cuda_kernels():
            raise ValueError("backend='cuda': kd_kernels._C was built without CUDA kernels")
        if not on_gpu:
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if requested == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' needs the triton package")
        if not on_gpu and not triton_interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}"
            )
    if dtype == torch.float64:
        raise TypeError(
            f"backend={requested!r} supports float32, float16 and bfloat16; float64 runs on "
            "the 'cpu' and 'torch' backends"
        )
    return requested
