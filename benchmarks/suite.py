"""The benchmark suite: every op, every available competitor, fwd and fwd+bwd, one JSON file,
Markdown tables and plots per run (``python -m benchmarks``, console script ``kd-bench``).

    python -m benchmarks --device cpu --quick          # small sizes, a minute (what CI runs)
    python -m benchmarks --device cpu                  # the full CPU sweep
    python -m benchmarks --device cuda --dtype bfloat16 --out /tmp/results

On a GPU each measurement also gets achieved GB/s (memory-bound ops) or TFLOP/s (InfoNCE, the
fused LM head + KD loss) and its fraction of the device's limit, measured in the same run: a
device-to-device copy for bandwidth, a large bf16 matmul for tensor-core throughput.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from dataclasses import asdict

import torch

from benchmarks._harness import (
    OpSuite,
    add_common_arguments,
    loss_step,
    machine_info,
    measure,
    plot_lines,
)

OPS = ("kd_loss", "attention_mse", "hidden_mse", "info_nce", "fused_linear_kd")
MODES = ("fwd", "fwd+bwd")


def load_suites(ops: list[str]) -> list[OpSuite]:
    return [importlib.import_module(f"benchmarks.{op}").SUITE for op in ops]


def device_limits(device: str) -> dict:
    """Measured copy bandwidth (GB/s, read + write) and bf16 matmul throughput (TFLOP/s)."""
    if device != "cuda":
        return {}
    from benchmarks._harness import time_call

    source = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MiB
    target = torch.empty_like(source)
    copy_s = min(time_call(lambda: target.copy_(source), "cuda", 3, 10))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    matmul_s = min(time_call(lambda: a @ a, "cuda", 3, 10))
    return {
        "copy_gb_per_s": 2 * source.numel() / copy_s / 1e9,
        "bf16_matmul_tflop_per_s": 2 * 8192**3 / matmul_s / 1e12,
    }


def run(suites: list[OpSuite], args: argparse.Namespace, on_case=None) -> dict:
    """Measures every (op, case, mode, implementation); ``on_case(payload)`` after each case
    (the CLI saves there, so a run cut short keeps what it measured). ``args.budget_s``:
    cases that would start later are listed as skipped; ``args.cases_per_op``: the first K
    cases of each op (the smallest: every op lists its cases in increasing size)."""
    dtype = getattr(torch, args.dtype)
    limits = device_limits(args.device)
    rows, skipped = [], {}
    started = time.perf_counter()
    budget_s = getattr(args, "budget_s", None)
    cases_per_op = getattr(args, "cases_per_op", None)
    payload = {
        "benchmark": "kd_kernels suite",
        "config": vars(args),
        "machine": machine_info(args.device),
        "device_limits": limits,
        "memory_method": "cuda max_memory_allocated"
        if args.device == "cuda"
        else "torch.profiler raw [memory] events: running sum of CPU allocations and frees",
        "skipped": skipped,
        "results": rows,
    }
    for suite in suites:
        impls, reasons = suite.implementations(args.device, args.quick)
        skipped[suite.op] = reasons
        for name, reason in reasons.items():
            print(f"[{suite.op}] skip {name}: {reason}")
        failed: set[str] = set()
        cases = suite.cases(args.device, args.quick)[:cases_per_op]
        for label, x, make_inputs in cases:
            if budget_s is not None and time.perf_counter() - started > budget_s:
                reasons[f"case {label}"] = f"not run: past the {budget_s:.0f} s budget"
                print(f"[{suite.op}] {label}: not run, past the budget")
                continue
            inputs = make_inputs(dtype, args.device)
            wrt = suite.differentiable(inputs)
            for mode in args.modes:
                for name, fn in impls.items():
                    if (name, mode) in failed:
                        continue
                    if x > getattr(fn, "max_x", float("inf")):  # an N x N implementation
                        continue
                    step = loss_step(fn, inputs, wrt, mode)
                    row = {"op": suite.op, "case": label, "x": x, "mode": mode, "name": name}
                    try:
                        result = measure(name, step, args.device, args.warmup, args.repeats)
                    except torch.OutOfMemoryError:
                        failed.add((name, mode))
                        rows.append({**row, "out_of_memory": True})
                        print(f"[{suite.op}] {label} {mode} {name}: out of memory")
                        continue
                    row.update(asdict(result))
                    row.update(_throughput(suite, inputs, mode, result.median_ms, limits))
                    rows.append(row)
                    print(
                        f"[{suite.op}] {label} {mode} {name}: {result.median_ms:.3f} ms, "
                        f"{result.peak_extra_mib:.1f} MiB"
                    )
            del inputs, wrt
            if on_case is not None:
                on_case(payload)
    return payload


def _throughput(suite: OpSuite, inputs, mode: str, median_ms: float, limits: dict) -> dict:
    """Achieved GB/s or TFLOP/s of an fwd+bwd step, and its fraction of the device's limit."""
    if mode != "fwd+bwd" or not limits:
        return {}
    seconds = median_ms / 1e3
    if suite.traffic_bytes is not None:
        rate = suite.traffic_bytes(inputs) / seconds / 1e9
        return {"gb_per_s": rate, "fraction_of_copy_bandwidth": rate / limits["copy_gb_per_s"]}
    if suite.flops is not None:
        rate = suite.flops(inputs) / seconds / 1e12
        peak = limits["bf16_matmul_tflop_per_s"]
        return {"tflop_per_s": rate, "fraction_of_bf16_matmul": rate / peak}
    return {}


def markdown(payload: dict) -> str:
    """One table per (op, mode, case): time, memory and ratios against the first implementation."""
    out = []
    machine = payload["machine"]
    out.append(
        f"Machine: {machine.get('gpu') or machine['processor']}, torch {machine['torch']}, "
        f"{machine['threads']} threads. Memory: {payload['memory_method']}."
    )
    groups: dict[tuple, list[dict]] = {}
    for row in payload["results"]:
        groups.setdefault((row["op"], row["mode"], row["case"]), []).append(row)
    for (op, mode, case), rows in groups.items():
        measured = [r for r in rows if not r.get("out_of_memory")]
        base = measured[0] if measured else None
        out.append(f"\n### {op}, {mode}, {case}\n")
        out.append("| implementation | median ms | peak extra MiB | speed-up | memory | limit |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            if r.get("out_of_memory"):
                out.append(f"| {r['name']} | out of memory | | | | |")
                continue
            speed = base["median_ms"] / r["median_ms"]
            memory = r["peak_extra_mib"] / base["peak_extra_mib"] if base["peak_extra_mib"] else 0
            limit = r.get("fraction_of_copy_bandwidth", r.get("fraction_of_bf16_matmul"))
            limit_text = f"{limit:.0%}" if limit is not None else ""
            out.append(
                f"| {r['name']} | {r['median_ms']:.3f} | {r['peak_extra_mib']:.1f} | "
                f"{speed:.2f}x | {memory:.2f}x | {limit_text} |"
            )
        out.append(f"\n(ratios against {base['name'] if base else '-'})")
    for op, reasons in payload["skipped"].items():
        for name, reason in reasons.items():
            out.append(f"\n- {op}: {name} skipped: {reason}")
    return "\n".join(out) + "\n"


def plots(payload: dict, folder: str) -> list[str]:
    """One PNG per mode: a row per op, time and peak memory against size, a line per
    implementation (two files, so a GPU run's results fit the few files it may return)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, dict[str, list]]] = {}
    for row in payload["results"]:
        if row.get("out_of_memory"):
            continue
        lines = series.setdefault(row["mode"], {}).setdefault(row["op"], {})
        point = (row["x"], row["median_ms"], row["peak_extra_mib"])
        lines.setdefault(row["name"], []).append(point)
    config, written = payload["config"], []
    for mode, ops in series.items():
        figure, axes = plt.subplots(len(ops), 2, figsize=(12, 3.6 * len(ops)), squeeze=False)
        for (op, lines), (time_axis, memory_axis) in zip(ops.items(), axes, strict=True):
            plot_lines(time_axis, memory_axis, lines)
            for axis, ylabel in ((time_axis, "median ms"), (memory_axis, "peak extra MiB")):
                axis.set_xscale("log")
                axis.set_yscale("log")
                axis.set_xlabel(_X_LABELS.get(op, "size"))
                axis.set_ylabel(ylabel)
                axis.set_title(f"{op}, {mode}", fontsize=9)
                axis.grid(True, alpha=0.3)
            time_axis.legend(fontsize=7)
        figure.suptitle(f"kd_kernels suite on {config['device']}, {config['dtype']}")
        figure.tight_layout()
        path = os.path.join(folder, f"suite_{mode.replace('+', '_')}.png")
        figure.savefig(path, dpi=80)
        plt.close(figure)
        written.append(path)
    return written


_X_LABELS = {
    "kd_loss": "logits N x C",
    "attention_mse": "attention-map entries, all layers",
    "hidden_mse": "hidden-state entries, all layers",
    "info_nce": "batch size N",
    "fused_linear_kd": "batch rows N (V x H head)",
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="kd-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--quick", action="store_true", help="small sizes, no torch.compile")
    parser.add_argument("--out", help="results folder (default benchmarks/results/<device>)")
    parser.add_argument("--budget-s", type=float, help="start no case after this many seconds")
    parser.add_argument("--cases-per-op", type=int, help="only the first (smallest) K cases")
    parser.add_argument("--no-plots", action="store_true", help="JSON and Markdown only")
    add_common_arguments(parser, repeats=5, warmup=1)
    args = parser.parse_args(argv)
    folder = args.out or os.path.join(os.path.dirname(__file__), "results", args.device)
    name = "suite_quick" if args.quick else "suite"

    def save(payload: dict) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{name}.json"), "w") as out:
            json.dump(payload, out, indent=2)
        with open(os.path.join(folder, f"{name}.md"), "w") as out:
            out.write(markdown(payload))

    payload = run(load_suites(args.ops), args, on_case=None if args.no_save else save)
    print(markdown(payload))
    if not args.no_save:
        save(payload)
        if not args.quick and not args.no_plots:
            plots(payload, folder)
        print("wrote", folder)
    return payload


def cli() -> None:
    """Console-script entry (kd-bench): exits 0 instead of printing the payload."""
    main()
