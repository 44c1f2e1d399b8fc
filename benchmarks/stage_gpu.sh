#!/usr/bin/env bash
# Stages what benchmarks/gpu_suite.sh needs on the GPU machine, which has torch, scipy and scikit-image but
# neither kornia, scikit-learn, tqdm nor the datasets, into the ignored folder .gpu/ (carried there as a whole):
#   .gpu/whl/           wheels for CPython 3.12 on x86-64 Linux (the versions installed here): kornia and kornia_rs
#                       (ssm.losses, ssm.scoring), scikit-learn and the packages it imports besides numpy and scipy
#                       (joblib needs cloudpickle) (ssm.metrics), tqdm (ssm.training, ssm.evaluation)
#   .gpu/mvtec_bottle/  MVTec AD bottle: train/good, test, ground_truth and its licence
# Usage: benchmarks/stage_gpu.sh [BOTTLE_DIR]   (default ../shared/data/mvtec_bottle)
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-../shared/data/mvtec_bottle}
for d in train/good test ground_truth; do
    [[ -d "$SRC/$d" ]] || { echo "stage_gpu.sh: $SRC/$d not found: pass the MVTec AD bottle folder" >&2; exit 2; }
done
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .gpu && mkdir -p .gpu/whl .gpu/mvtec_bottle
# --no-deps: torch, numpy and scipy are already there; the rest of what these import is listed
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/whl \
    "kornia==$(version kornia)" "kornia_rs==$(version kornia_rs)" "scikit-learn==$(version scikit-learn)" \
    "joblib==$(version joblib)" "cloudpickle==$(version cloudpickle)" "threadpoolctl==$(version threadpoolctl)" \
    "narwhals==$(version narwhals)" "tqdm==$(version tqdm)"
cp -r "$SRC/train" "$SRC/test" "$SRC/ground_truth" .gpu/mvtec_bottle/
cp "$SRC"/license.txt .gpu/mvtec_bottle/ 2>/dev/null || true
size_mib=$(( $(du -sk .gpu | cut -f1) / 1024 ))
ls .gpu/whl
echo "staged .gpu: ${size_mib} MiB (what travels must stay under 64 MiB with the working tree)"
(( size_mib < 60 )) || { echo "stage_gpu.sh: .gpu is ${size_mib} MiB, over 60 MiB" >&2; exit 1; }
