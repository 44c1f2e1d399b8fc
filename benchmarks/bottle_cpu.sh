#!/usr/bin/env bash
# Accuracy on real data on a CPU: train on MVTec AD "bottle", evaluate, print the evaluation JSON last.
#
# CPU recipe (fits 20 minutes on 2 cores): W = 16, 64 px, 40 epochs, batch 16, Adam lr 1e-3 with the
# paper's three x0.1 steps moved to epochs 12/24/36 (30/60/90 % of the run, as at 15/30/45 of 50). The paper's recipe (W = 64, 128 px, 50 epochs, lr 1e-4) is
# benchmarks/bottle_gpu.sh. Usage: benchmarks/bottle_cpu.sh [DATA] [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/mvtec_bottle}
RUN=${2:-runs/bottle_cpu}
rm -rf "$RUN"
start=$(date +%s)
ssm train "$DATA" --layout mvtec --out "$RUN" --workers 1 \
    --width 16 --img-size 64 --epochs 40 --batch-size 16 --lr 1e-3 --lr-steps 12,24,36
trained=$(date +%s)
echo "training took $((trained - start)) s" >&2
ssm evaluate "$DATA" --layout mvtec --checkpoint "$RUN" --json
echo "train + evaluate took $(( $(date +%s) - start )) s" >&2
