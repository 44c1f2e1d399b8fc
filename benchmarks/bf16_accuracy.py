"""How much does bf16 autocast scoring (`Scorer(..., amp=True)`, `ssm score --bf16`) move the metrics?

One checkpoint scores bottle's test split twice, in float32 (the default) and under bf16 autocast; both go
through the evaluation's own path (ssm.evaluation: decode_for, Scorer.score_images, pixel metrics at the
ground-truth masks' resolution), so the only difference is the precision.

    python benchmarks/bf16_accuracy.py --checkpoint runs/bottle           # a run directory from `ssm train`
    python benchmarks/bf16_accuracy.py                                     # trains W = 16 at 64 px first

Without --checkpoint it first trains a small model in process (`ssm train --in-process`, W = 16, 64 px,
--epochs epochs) into --work. The last line printed is one JSON object: image and pixel AUROC (and AUPRO) in
each precision, their deltas (bf16 - float32), the largest change of an image score relative to the spread of
the float32 scores, the heatmaps' relative L2 change, and whether this CPU has native bf16.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssm.checkpoint import load_checkpoint  # noqa: E402
from ssm.data import load_layout  # noqa: E402
from ssm.evaluation import pixel_metrics_of, score_paths  # noqa: E402
from ssm.metrics import image_auroc  # noqa: E402
from ssm.scoring import cpu_has_bf16  # noqa: E402

BOTTLE = "/work/shared/data/mvtec_bottle"


def train_small(data: str, out: str, epochs: int) -> str:
    """`ssm train --in-process` with a small model; returns the run directory."""
    cmd = [sys.executable, str(ROOT / "cli.py"), "train", data, "--out", out, "--width", "16", "--img-size", "64",
           "--epochs", str(epochs), "--lr", "2e-3", "--lr-steps", str(max(1, epochs * 2 // 3)), "--in-process"]
    print("training:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a checkpoint or run directory from `ssm train` (default: train one)")
    ap.add_argument("--data", default=BOTTLE, help="an MVTec AD category folder")
    ap.add_argument("--epochs", type=int, default=6, help="epochs when training the small model")
    ap.add_argument("--work", default=None, help="where to train the small model (default: a temporary folder)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = train_small(args.data, str(Path(args.work or tempfile.mkdtemp()) / "run"), args.epochs)
    ckpt = load_checkpoint(checkpoint, map_location=args.device)
    split = load_layout(args.data, "mvtec")
    labels = np.array([s.label for s in split.test])
    paths = [s.path for s in split.test]
    print(f"checkpoint {ckpt.path}: W={ckpt.model_config.width}, {ckpt.model_config.img_size} px; "
          f"{len(paths)} test images; native bf16: {cpu_has_bf16()}", flush=True)

    results, scores, maps = {}, {}, {}
    for precision, amp in (("float32", False), ("bf16", True)):
        scorer = ckpt.scorer(args.device, amp=amp)
        scores[precision], maps[precision], sizes = score_paths(scorer, paths, args.batch_size, progress=False)
        results[precision] = {"image_auroc": image_auroc(labels, scores[precision]),
                              **pixel_metrics_of(split.test, maps[precision], sizes)}
        print(f"{precision:8s} " + "  ".join(f"{k} {v:.4f}" for k, v in results[precision].items()), flush=True)

    f32, b16 = results["float32"], results["bf16"]
    moved = float(np.abs(scores["bf16"] - scores["float32"]).max())
    spread = float(scores["float32"].max() - scores["float32"].min())
    heat_rel = float(np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(maps["bf16"], maps["float32"]))
                             / sum((b**2).sum() for b in maps["float32"])))
    print(json.dumps({
        "image_auroc_float32": round(f32["image_auroc"], 5), "image_auroc_bf16": round(b16["image_auroc"], 5),
        "delta_image_auroc": round(b16["image_auroc"] - f32["image_auroc"], 5),
        "pixel_auroc_float32": round(f32["pixel_auroc"], 5), "pixel_auroc_bf16": round(b16["pixel_auroc"], 5),
        "delta_pixel_auroc": round(b16["pixel_auroc"] - f32["pixel_auroc"], 5),
        "delta_aupro": round(b16["aupro"] - f32["aupro"], 5),
        "max_image_score_change_over_spread": round(moved / spread, 5),
        "heatmap_rel_l2": round(heat_rel, 5), "pixel_resolution": "ground-truth", "native_bf16": cpu_has_bf16(),
        "checkpoint": ckpt.path, "width": ckpt.model_config.width, "img_size": ckpt.model_config.img_size,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
