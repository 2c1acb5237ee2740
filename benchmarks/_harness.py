"""Shared timing and memory measurement for every benchmark.

Timing: median and interquartile range over repeats after warm-up; CUDA events on GPU,
time.perf_counter on CPU. Peak extra memory: on GPU torch.cuda.max_memory_allocated above the
allocation before the call; on CPU the running sum of tensor allocations and frees that
torch.profiler(profile_memory=True) records during the call (tensor memory only: a kernel's
private scratch outside torch's allocator is not seen).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass
class OpSuite:
    """One op's part of the benchmark suite (``python -m benchmarks``).

    cases(device, quick): [(label, x, make_inputs)], x the size the plots put on their axis.
    implementations(device, quick): ({name: fn(*inputs) -> loss}, {name: why it is skipped}).
    differentiable(inputs): the inputs that get gradients in fwd+bwd.
    traffic_bytes(inputs): the bytes an ideal fwd+bwd moves (memory-bound ops; GB/s on GPU),
    flops(inputs): or its floating-point work (compute-bound ops; TFLOP/s on GPU).
    """

    op: str
    cases: Callable
    implementations: Callable
    differentiable: Callable
    traffic_bytes: Callable | None = None
    flops: Callable | None = None


@dataclass
class Measurement:
    name: str
    median_ms: float
    iqr_ms: float
    peak_extra_mib: float
    repeats: int


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    if len(ordered) < 4:
        return ordered[0], statistics.median(ordered), ordered[-1]
    q1, median, q3 = statistics.quantiles(ordered, n=4)
    return q1, median, q3


def time_call(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return times


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Every CPU allocation (+bytes) and free (-bytes) with its time, also those made inside an
    # op (a custom op calling aten ops): their time-ordered running sum is the allocation
    # timeline, and its maximum the peak above what was allocated before the call.
    changes = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    )
    running = peak = 0
    for _, change in changes:
        running += change
        peak = max(peak, running)
    return peak


def measure(
    name: str, fn: Callable[[], object], device: str, warmup: int = 2, repeats: int = 5
) -> Measurement:
    times = time_call(fn, device, warmup, repeats)
    q1, median, q3 = _quartiles(times)
    peak = peak_extra_bytes(fn, device)
    return Measurement(name, median * 1e3, (q3 - q1) * 1e3, peak / 2**20, repeats)


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def write_results(name: str, device: str, payload: dict, table: str) -> str:
    """Writes benchmarks/results/<device>/<name>.json and .md; returns the JSON path."""
    folder = os.path.join(os.path.dirname(__file__), "results", device)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as out:
        json.dump(payload, out, indent=2, default=lambda o: asdict(o))
    with open(os.path.join(folder, f"{name}.md"), "w") as out:
        out.write(table + "\n")
    return path


def plot_lines(time_axis: object, memory_axis: object, lines: dict[str, list[tuple]]) -> None:
    """A line per implementation on matplotlib time and memory axes; points are
    (x, median ms, peak extra MiB), plotted in x order, memory floored at 1e-3 MiB so that a
    zero stays on a log axis."""
    for name, points in lines.items():
        points = sorted(points)
        xs = [p[0] for p in points]
        time_axis.plot(xs, [p[1] for p in points], marker="o", label=name)
        memory_axis.plot(xs, [max(p[2], 1e-3) for p in points], marker="o", label=name)


def markdown_table(rows: list[Measurement], baseline: str) -> str:
    base = next(r for r in rows if r.name == baseline)
    lines = [
        f"| implementation | median ms | IQR ms | peak extra MiB | speed-up vs {baseline} "
        f"| memory vs {baseline} |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        memory_ratio = r.peak_extra_mib / base.peak_extra_mib if base.peak_extra_mib else 0.0
        lines.append(
            f"| {r.name} | {r.median_ms:.2f} | {r.iqr_ms:.2f} | {r.peak_extra_mib:.1f} "
            f"| {base.median_ms / r.median_ms:.2f}x | {memory_ratio:.2f}x |"
        )
    return "\n".join(lines)


def add_common_arguments(
    parser: argparse.ArgumentParser, repeats: int = 5, warmup: int = 2
) -> None:
    """--dtype, --device, --repeats, --warmup and --no-save, shared by every benchmark."""
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--no-save", action="store_true", help="print only, write no results")


def report(
    benchmark: str, name: str, args: argparse.Namespace, results: list, table: str, **extra
) -> dict:
    """Prints the table and, unless --no-save, writes the run (machine, config, every
    measurement, how memory was measured) to benchmarks/results/<device>/<name>.json/.md."""
    print(table)
    payload = {
        "benchmark": benchmark,
        "config": vars(args),
        "machine": machine_info(args.device),
        "memory_method": "cuda max_memory_allocated"
        if args.device == "cuda"
        else "torch.profiler raw [memory] events: running sum of CPU allocations and frees",
        "results": results,
        **extra,
    }
    if not args.no_save:
        print("wrote", write_results(name, args.device, payload, table))
    return payload


def fused_backends(device: str) -> list[str]:
    """The kd_kernels backends that run on ``device`` here (the reference excluded)."""
    import kd_kernels

    on_cpu = device == "cpu"
    return [
        backend
        for backend in kd_kernels.available_backends()
        if backend != "torch" and (backend == "cpu") == on_cpu
    ]


class SkipPeer(Exception):
    """Raised by a competitor's loader when it cannot run here; the message says why."""


def suite_implementations(
    device: str,
    quick: bool,
    eager_name: str,
    eager: Callable,
    peers: dict[str, Callable[[], Callable]],
    fused: Callable[[str], Callable],
) -> tuple[dict, dict]:
    """An op's competitors for the suite: ({name: fn}, {name: why it is skipped}).

    In order: the eager formulation, ``torch.compile`` of it (not in --quick, where compiling
    would dominate), the public peers (name -> loader returning the callable; a loader raising
    ImportError or SkipPeer is skipped with its message), and kd_kernels on every backend that
    runs on ``device`` (``fused(backend)`` returns its callable).
    """
    impls, skipped = {eager_name: eager}, {}
    compiled_name = f"torch.compile({eager_name})"
    if quick:
        skipped[compiled_name] = "not in --quick (compilation dominates small runs)"
    else:
        impls[compiled_name] = torch.compile(eager)
    for name, load in peers.items():
        try:
            impls[name] = load()
        except (ImportError, SkipPeer) as error:
            skipped[name] = str(error)
    for backend in fused_backends(device):
        impls[f"kd_kernels[{backend}]"] = fused(backend)
    return impls, skipped


def loss_step(fn: Callable, inputs: tuple, wrt: list, mode: str = "fwd+bwd") -> Callable:
    """A call of ``fn(*inputs)``: forward only under no_grad, or forward and the gradients
    with respect to ``wrt``."""
    if mode == "fwd":

        def forward_only():
            with torch.no_grad():
                return fn(*inputs)

        return forward_only

    def forward_backward():
        return torch.autograd.grad(fn(*inputs), wrt)

    return forward_backward


def competitors(suite: OpSuite, device: str, with_compile: bool) -> dict:
    """A single-op benchmark's implementations: the suite's, torch.compile only when asked
    for; prints why each missing one is skipped."""
    impls, skipped = suite.implementations(device, not with_compile)
    for name, reason in skipped.items():
        print(f"skip {name}: {reason}")
    return impls


def measure_at_size(
    name: str, step: Callable, size: int, args: argparse.Namespace, rows: list, failed: set
) -> Measurement | None:
    """Measures one implementation at one size N of a sweep: appends its row (or an
    out-of-memory row, adding ``name`` to ``failed`` so larger N skip it) to ``rows``."""
    try:
        result = measure(name, step, args.device, args.warmup, args.repeats)
    except torch.OutOfMemoryError:
        failed.add(name)
        print(f"N={size} {name}: out of memory")
        rows.append({"n": size, "name": name, "out_of_memory": True})
        return None
    rows.append({"n": size, **vars(result)})
    print(f"N={size} {name}: {result.median_ms:.1f} ms, {result.peak_extra_mib:.0f} MiB")
    return result


def measure_each(impls: dict, inputs: tuple, wrt: list, args: argparse.Namespace) -> list:
    """fwd+bwd of every implementation on the same inputs, printed as it goes."""
    results = []
    for name, fn in impls.items():
        step = loss_step(fn, inputs, wrt)
        results.append(measure(name, step, args.device, args.warmup, args.repeats))
        print(f"{name}: {results[-1].median_ms:.1f} ms, {results[-1].peak_extra_mib:.0f} MiB")
    return results
