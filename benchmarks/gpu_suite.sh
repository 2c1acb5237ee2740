#!/usr/bin/env bash
# The GPU suite in one command (see benchmarks/gpu_suite.py for the stages and the files):
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [--budget-s 540] [--dry-run] [--ops kd_loss info_nce]
#
# On the GPU machine: run from a copy of the repo (no install needed; the CUDA extension is
# built in place in the background). Peers the image lacks may travel as wheels in .whl/.
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" -m benchmarks.gpu_suite "$@"
