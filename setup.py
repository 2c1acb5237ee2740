"""Builds kd_kernels._C: C++ CPU kernels always, CUDA kernels when nvcc and a CUDA torch exist.

Install with ``pip install --no-build-isolation -e .`` (an isolated build env would pull a
CUDA build of torch). Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS,
KD_KERNELS_NO_NATIVE=1 to build the CPU kernels without AVX2/FMA/F16C.
"""

import glob
import os
import platform
import sys

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cpu_vector_flags() -> list:
    """AVX2+FMA+F16C build of ATen's Vectorized (Sleef exp/log) when the build machine has them."""
    if os.environ.get("KD_KERNELS_NO_NATIVE") == "1" or platform.machine() not in (
        "x86_64",
        "AMD64",
    ):
        return []
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return []
    if all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c")):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def openmp_flags() -> list[str]:
    """OpenMP for at::parallel_for, on the compilers that take -fopenmp (gcc, clang on Linux)."""
    if os.environ.get("KD_KERNELS_NO_OPENMP") == "1" or sys.platform != "linux":
        return []
    return ["-fopenmp"]


def extension():
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -fopenmp: at::parallel_for is an inline template that only forks threads when the
    # including file is compiled with OpenMP; without it every CPU kernel ran on one thread.
    # The extension then needs libgomp.so.1, which torch already loaded (the same soname).
    cxx_flags = ["-O3", "-g0", "-std=c++17", *cpu_vector_flags(), *openmp_flags()]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if torch.version.cuda and cpp_extension.CUDA_HOME and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "kd_kernels._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=openmp_flags(),
        )
    print("kd_kernels: building CPU kernels only (no CUDA build of torch or no CUDA_HOME)")
    return cpp_extension.CppExtension(
        "kd_kernels._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=openmp_flags(),
    )


setup(
    # benchmarks ships so that the kd-bench console script runs outside the checkout too.
    packages=["kd_kernels", "kd_kernels.triton", "kd_trainers", "benchmarks"],
    package_dir={"kd_kernels": "kd_kernels", "kd_trainers": "python/kd_trainers"},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
