#!/usr/bin/env bash
# Scoring throughput on one GPU (see gpu_score_speed.py); extra arguments are passed on, e.g. --compile.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
exec python benchmarks/gpu_score_speed.py "$@"
