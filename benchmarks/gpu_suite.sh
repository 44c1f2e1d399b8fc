#!/usr/bin/env bash
# The GPU checks in one process, without Ray (see gpu_suite.py): the paper's recipe on MVTec bottle with the
# standard evaluation, scorer throughput, training throughput; one JSON line last. Time boxes keep it under
# 8 minutes on one GPU.
# Usage: benchmarks/gpu_suite.sh [--data DATA/mvtec_bottle] [--compile] [--cuda-graphs] [--dry-run]
set -euo pipefail
if [[ " $* " != *" --dry-run "* ]]; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
fi
PYTHONUNBUFFERED=1 exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_suite.py" "$@"
