#!/usr/bin/env bash
# One command for a GPU machine with no network: builds the CUDA extension in place, runs the
# GPU tests (every backend against the reference) and the benchmark suite at GPU sizes, and
# leaves at most 6 files in OUT_DIR: build.log, pytest_cuda.log, suite.json, suite.md,
# suite_fwd.png, suite_fwd_bwd.png.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [suite options, e.g. --ops kd_loss info_nce]
#
# Peers that the machine lacks (textbrewer, liger-kernel, inf-cl) may travel as wheels in
# .whl/ (see README): they are installed into /tmp/site first. Environment: PYTHON (default
# python3), TORCH_CUDA_ARCH_LIST (default 9.0), DTYPE (default bfloat16).
set -uo pipefail
out_dir="${1:?usage: bash benchmarks/gpu_suite.sh OUT_DIR [suite options]}"
shift
mkdir -p "$out_dir"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== build (log: $out_dir/build.log)"
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
  "$python" setup.py build_ext --inplace >"$out_dir/build.log" 2>&1
build_status=$?
tail -n 3 "$out_dir/build.log"
if ((build_status != 0)); then
  echo "build failed (exit $build_status); see build.log"
  exit "$build_status"
fi
"$python" -c "import kd_kernels as k; print('backends:', k.available_backends())"

echo "== pytest -m cuda (log: $out_dir/pytest_cuda.log)"
"$python" -m pytest -m cuda -q -p no:cacheprovider --maxfail=50 2>&1 \
  | tee "$out_dir/pytest_cuda.log" | tail -n 25
test_status=${PIPESTATUS[0]}

echo "== benchmark suite"
"$python" -m benchmarks --device cuda --dtype "${DTYPE:-bfloat16}" --out "$out_dir" "$@" \
  2>&1 | grep -v '^\[' | tail -n 200
bench_status=${PIPESTATUS[0]}
echo "== done: tests exit $test_status, suite exit $bench_status"
exit $((test_status != 0 || bench_status != 0))
