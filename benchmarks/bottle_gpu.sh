#!/usr/bin/env bash
# The paper's recipe on one GPU: W = 64, 128 px, 50 epochs, batch 32, Adam lr 1e-4, x0.1 at 15/30/45;
# bf16 autocast on CUDA. Trains on MVTec AD "bottle" through the Ray Train job (1 GPU worker), evaluates,
# and prints the evaluation JSON last. Usage: benchmarks/bottle_gpu.sh [DATA] [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/mvtec_bottle}
RUN=${2:-runs/bottle_gpu}
rm -rf "$RUN"
start=$(date +%s)
ssm train "$DATA" --layout mvtec --out "$RUN" --workers 1 --gpus-per-worker 1 \
    --width 64 --img-size 128 --epochs 50 --batch-size 32 --lr 1e-4
echo "training took $(( $(date +%s) - start )) s" >&2
ssm evaluate "$DATA" --layout mvtec --checkpoint "$RUN" --json --device cuda
