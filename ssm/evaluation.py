"""Evaluation protocol (method page, section 8): image AUROC and F1-max; pixel AUROC and AUPRO with masks."""

from __future__ import annotations

import numpy as np
import torch

from .checkpoint import Checkpoint
from .data import DatasetSplit, load_images, load_masks
from .metrics import aupro, f1_max, image_auroc, pixel_auroc
from .scoring import Scorer


def score_paths(
    scorer: Scorer, paths: list[str], size: int, channels: int, batch_size: int = 32, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores (N,) and heatmaps (N, S, S) for image files, scored in batches."""
    from tqdm.auto import tqdm

    scores, maps = [], []
    for i in tqdm(range(0, len(paths), batch_size), desc="score", unit="batch", disable=not progress):
        x = load_images(paths[i : i + batch_size], size, channels)
        out = scorer.score(x)
        scores.append(out.image_scores.cpu().numpy())
        maps.append(out.heatmaps.cpu().numpy().astype(np.float32))
    return np.concatenate(scores), np.concatenate(maps)


def evaluate(
    checkpoint: Checkpoint,
    split: DatasetSplit,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    scorer: Scorer | None = None,
) -> dict:
    """Score the test split with the checkpoint; metrics as a dict (pixel metrics None without masks)."""
    if not split.test:
        raise ValueError("the test split is empty: nothing to evaluate")
    cfg = checkpoint.model_config
    scorer = scorer or checkpoint.scorer(device)
    labels = np.array([s.label for s in split.test])
    scores, maps = score_paths(scorer, [s.path for s in split.test], cfg.img_size, cfg.channels, batch_size, progress)
    result = {
        "image_auroc": image_auroc(labels, scores) if 0 < labels.sum() < len(labels) else None,
        "f1_max": f1_max(labels, scores) if labels.sum() > 0 else None,
        "pixel_auroc": None,
        "aupro": None,
        "n_test": int(len(labels)),
        "n_anomalous": int(labels.sum()),
    }
    if split.has_masks:
        masks = load_masks(split.test, cfg.img_size)
        if masks.any() and (~masks).any():
            result["pixel_auroc"] = pixel_auroc(masks, maps)
            result["aupro"] = aupro(masks, maps)
    if checkpoint.calibration is not None:
        predicted = scores > checkpoint.calibration.threshold
        result["accuracy_at_threshold"] = float((predicted == labels.astype(bool)).mean())
    return result
