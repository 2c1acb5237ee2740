#!/usr/bin/env bash
# Compile-checks every csrc/cuda/*.cu for sm_80 and sm_90 with the flags torch's BuildExtension
# passes, without a GPU and against the CPU torch wheel (objects are thrown away), and reads
# ptxas -v: registers and spill stores per kernel and architecture; a spill store in an fp32,
# fp16 or bf16 kernel fails (fp64 ones are shown only).
# Usage: PYTHON=/path/to/python scripts/check_cuda.sh   (default: python from PATH)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
PYTHON="${PYTHON:-python}"
max_jobs=2

shopt -s nullglob
sources=(csrc/cuda/*.cu)
if ((${#sources[@]} == 0)); then
  echo "check_cuda: no csrc/cuda/*.cu files to check"
  exit 0
fi

# nvcc from PATH, else the one pip installs with the CUDA 13 wheels (nvidia-cuda-nvcc).
nvcc_bin="$(command -v nvcc || true)"
if [[ -z "$nvcc_bin" ]]; then
  site_packages="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
    2>/dev/null || true)"
  if [[ -n "$site_packages" && -x "$site_packages/nvidia/cu13/bin/nvcc" ]]; then
    nvcc_bin="$site_packages/nvidia/cu13/bin/nvcc"
  fi
fi
if [[ -z "$nvcc_bin" ]]; then
  echo "check_cuda: nvcc not found on PATH nor under site-packages/nvidia/cu13/bin;" \
    "install the CUDA toolkit (or pip install nvidia-cuda-nvcc) to compile-check the kernels" >&2
  exit 1
fi

if ! torch_includes="$("$PYTHON" -c \
  'from torch.utils.cpp_extension import include_paths; print("\n".join(include_paths()))')"; then
  echo "check_cuda: '$PYTHON' cannot import torch.utils.cpp_extension" >&2
  exit 1
fi

work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT

# The CPU wheel lacks this generated header; the stub dir comes after torch's includes so a
# real header (CUDA wheel) still wins.
mkdir -p "$work_dir/stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' \
  >"$work_dir/stub/c10/cuda/impl/cuda_cmake_macros.h"

include_flags=()
while IFS= read -r dir; do
  [[ -n "$dir" ]] && include_flags+=(-I "$dir")
done <<<"$torch_includes"
include_flags+=(-I "$work_dir/stub" -I csrc)

nvcc_flags=(
  -std=c++17 -O2 -Xcompiler -fPIC --expt-relaxed-constexpr
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
  -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
  # torch's own headers use C++20 bit-field initializers; silence only that, so any warning
  # that is printed comes from our code.
  -diag-suppress=3306 -Xcompiler -Wno-c++20-extensions
  -Xptxas -v
)

echo "check_cuda: $("$nvcc_bin" --version | tail -n 1) (${#sources[@]} file(s), sm_80 + sm_90)"

# Each job leaves its log and exit status in work_dir; at most max_jobs run at once.
for i in "${!sources[@]}"; do
  while (($(jobs -rp | wc -l) >= max_jobs)); do wait -n || true; done
  (
    if "$nvcc_bin" "${nvcc_flags[@]}" "${include_flags[@]}" -c "${sources[$i]}" \
      -o "$work_dir/$i.o" >"$work_dir/$i.log" 2>&1; then
      echo 0 >"$work_dir/$i.rc"
    else
      echo 1 >"$work_dir/$i.rc"
    fi
  ) &
done
wait

# ptxas -v lines ("ptxas info ...", "N bytes stack frame, N bytes spill stores, ...") become
# a table; everything else in a log is a compiler message and is shown.
summarise_ptxas() {
  "$PYTHON" - "$1" <<'PY'
import re, subprocess, sys
kernel = arch = None
rows, other = {}, []
for line in open(sys.argv[1], errors="replace"):
    if found := re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line):
        kernel, arch = found.groups()
    elif found := re.search(r"(\d+) bytes spill stores", line):
        rows.setdefault((kernel, arch), {})["spills"] = int(found.group(1))
    elif found := re.search(r"Used (\d+) registers", line):
        rows.setdefault((kernel, arch), {})["registers"] = int(found.group(1))
    elif not line.startswith("ptxas info") and "bytes stack frame" not in line:
        if line.strip():
            other.append(line.rstrip())
names = sorted({k for k, _ in rows})
try:
    demangled = subprocess.run(["c++filt", *names], capture_output=True, text=True).stdout
    pretty = dict(zip(names, demangled.splitlines()))
except OSError:
    pretty = {}
spilled = 0
for (name, arch), row in sorted(rows.items(), key=lambda item: (item[0][1], item[0][0])):
    spills = row.get("spills", 0)
    # fp64 is not a speed path (auto sends float64 to the cpu and torch backends): shown,
    # never failed.
    fp64 = "double" in pretty.get(name, name)
    spilled += spills > 0 and not fp64
    short = pretty.get(name, name).replace("(anonymous namespace)::", "")
    depth, cut = 0, len(short)
    for index, char in enumerate(short):  # drop the argument list, keep template arguments
        depth += (char == "<") - (char == ">")
        if char == "(" and depth == 0:
            cut = index
            break
    short = short[:cut].removeprefix("void ")[:110]
    flag = ("  spills (fp64: allowed)" if fp64 else "  SPILLS") if spills else ""
    print(f"    {arch} reg={row.get('registers', 0):<3} spill={spills:<4} {short}{flag}")
for line in other:
    print(f"    {line}")
sys.exit(1 if spilled else 0)
PY
}

failed=0
for i in "${!sources[@]}"; do
  if [[ "$(cat "$work_dir/$i.rc" 2>/dev/null || echo 1)" == 0 ]]; then
    echo "ok      ${sources[$i]}"
    if ! summarise_ptxas "$work_dir/$i.log"; then
      failed=1
      echo "FAILED  ${sources[$i]}: spill stores (see SPILLS above)"
    fi
  else
    failed=1
    echo "FAILED  ${sources[$i]}"
    sed 's/^/    /' "$work_dir/$i.log"
  fi
done
exit "$failed"
