"""Try a demo recipe on a generated validation set (its own seed, never the demo's test images).

Generates the demo dataset for `--seed`, trains in this process with `ssm.training.fit` (the loop the Ray
Train job runs, without Ray), scores the test split and prints one JSON line: image AUROC of the fused score
and of each component (heatmap maximum, reconstruction error, first-pass maximum), each per defect kind
against the normals, pixel AUROC and AUPRO at the model's resolution, and the CPU seconds used.

    python benchmarks/demo_recipe.py --seed 100                     # the demo's recipe on validation seed 100
    python benchmarks/demo_recipe.py --seed 100 --k 4,8,16          # larger mask cells in training and scoring
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import numpy as np
import torch

from jobs.demo_data import ANOMALY_KINDS, make_demo_dataset
from ssm.checkpoint import load_checkpoint
from ssm.data import ImageDataset, decode_mask, load_layout
from ssm.metrics import image_auroc, pixel_metrics
from ssm.model import ModelConfig
from ssm.scoring import Scorer, ScoringConfig
from ssm.training import TrainConfig, fit, split_train_val


def per_kind(labels: np.ndarray, kinds: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Image AUROC over all test images and over the normals plus each defect kind."""
    out = {"all": round(image_auroc(labels, scores), 4)}
    for kind in ANOMALY_KINDS:
        sel = (kinds == kind) | (labels == 0)
        out[kind] = round(image_auroc(labels[sel], scores[sel]), 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=100, help="seed of the validation data and of training")
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--n-train", type=int, default=120)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-steps", default="15,25")
    p.add_argument("--k", default="2,4,8", help="mask cell sizes at 128 px, for training and scoring")
    p.add_argument("--texture", default="brick")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--work", default=None, help="folder for the data and the run (default: a temporary one)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    k_values = tuple(int(k) for k in a.k.split(","))

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or tmp
        root = os.path.join(work, f"data_{a.texture}_{a.size}_{a.n_train}_{a.seed}")
        if not os.path.isdir(root):
            make_demo_dataset(root, size=a.size, n_train=a.n_train, texture=a.texture, seed=a.seed)
        split = load_layout(root, "mvtec")
        model_config = ModelConfig(width=a.width, img_size=a.size)
        cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch, lr=a.lr, seed=a.seed, k_values=k_values,
                          lr_steps=tuple(int(s) for s in a.lr_steps.split(",")))
        scoring = ScoringConfig(seed=a.seed, k_values=k_values)
        train, val = split_train_val(list(split.train), cfg.val_fraction, cfg.seed)  # as the Ray Train job does
        result = fit(ImageDataset(train, a.size), ImageDataset(val, a.size), os.path.join(work, "run"),
                     model_config, cfg, scoring, device="cpu", progress=False)
        t_train = time.perf_counter() - t0

        ck = load_checkpoint(result.best)
        scorer = Scorer(ck.build_model("cpu"), scoring, ck.calibration)
        test = split.test
        images = ImageDataset([s.path for s in test], a.size)
        x = torch.stack([images[i] for i in range(len(test))])
        outs = [scorer.score(x[i : i + 16]) for i in range(0, len(x), 16)]
        masks = [decode_mask(s.mask_path, (a.size, a.size)) if s.mask_path else np.zeros((a.size, a.size), bool)
                 for s in test]

    cat = lambda name: torch.cat([getattr(o, name) for o in outs]).numpy()  # noqa: E731
    labels = np.array([s.label for s in test])
    kinds = np.array([os.path.basename(os.path.dirname(s.path)) for s in test])
    first = cat("first_pass")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    row = {
        "args": vars(a), "best_epoch": result.best_epoch,
        "fused": per_kind(labels, kinds, cat("image_scores")),
        "heatmap_max": per_kind(labels, kinds, cat("heatmap_max")),
        "recon_error": per_kind(labels, kinds, cat("recon_error")),
        "first_pass_max": per_kind(labels, kinds, first.reshape(len(first), -1).max(1)),
        **{k: None if v is None else round(v, 4) for k, v in pixel_metrics(masks, list(cat("heatmaps")), upsample=False).items()},
        "train_s": round(t_train, 1), "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
