"""Evaluation protocol (method page, section 8): image AUROC and F1-max; pixel AUROC and AUPRO against the
ground-truth masks at their own resolution, each heatmap upsampled (bilinear, float32) to its mask's size, as
the MVTec AD evaluation does. Images are decoded and scored exactly as `ssm score` scores them
(`decode_for`, `Scorer.score_images`), so a tiled model is evaluated on its stitched heatmaps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .checkpoint import Checkpoint
from .data import DatasetSplit, Sample, decode_for, decode_mask
from .metrics import f1_max, image_auroc, pixel_metrics
from .scoring import Scorer

# "ground-truth": the standard protocol, comparable with published figures. "model": masks resized (nearest)
# to the scored resolution, as quick checks often do; higher for thin defects, not comparable.
PIXEL_RESOLUTIONS = ("ground-truth", "model")


def score_paths(
    scorer: Scorer, paths: Sequence[str], batch_size: int = 32, progress: bool = True
) -> tuple[np.ndarray, list[np.ndarray], list[tuple[int, int]]]:
    """Image scores (N,), heatmaps at the scored resolution (float32 (h, w) each: img_size x img_size, or the
    scaled image's size for a tiled model) and the images' original (width, height)."""
    from tqdm.auto import tqdm

    config = scorer.model_config
    scores, maps, sizes = [], [], []
    for i in tqdm(range(0, len(paths), batch_size), desc="score", unit="batch", disable=not progress):
        decoded = [decode_for(p, config) for p in paths[i : i + batch_size]]
        out = scorer.score_images([torch.from_numpy(a) for a, _ in decoded])
        scores.append(out.image_scores.cpu().numpy())
        maps += [m.float().cpu().numpy() for m in out.heatmaps]
        sizes += [size for _, size in decoded]
    return np.concatenate(scores), maps, sizes


def pixel_metrics_of(
    samples: Sequence[Sample],
    heatmaps: Sequence,
    image_sizes: Sequence[tuple[int, int]],
    resolution: str = "ground-truth",
) -> dict[str, float | None]:
    """Pixel AUROC and AUPRO of the samples' heatmaps (any resolution each) against their masks.

    "ground-truth": each mask at its own resolution and each heatmap upsampled to it; a sample without a mask
    is normal at its image's original (width, height). "model": masks resized (nearest) to each heatmap.
    """
    if resolution not in PIXEL_RESOLUTIONS:
        raise ValueError(f"pixel resolution must be one of {', '.join(PIXEL_RESOLUTIONS)}, got {resolution!r}")
    if resolution == "model":
        masks = [decode_mask(s.mask_path, tuple(np.shape(h))) if s.mask_path else np.zeros(np.shape(h), bool)
                 for s, h in zip(samples, heatmaps)]
        return pixel_metrics(masks, heatmaps, upsample=False)
    masks = [decode_mask(s.mask_path, None) if s.mask_path else np.zeros((height, width), bool)
             for s, (width, height) in zip(samples, image_sizes)]
    return pixel_metrics(masks, heatmaps)


def evaluate(
    checkpoint: Checkpoint,
    split: DatasetSplit,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    scorer: Scorer | None = None,
    pixel_resolution: str = "ground-truth",
) -> dict:
    """Score the test split with the checkpoint (float32 unless `scorer` says otherwise); metrics as a dict
    (pixel metrics None without masks), with the pixel resolution and the precision they were computed at."""
    if not split.test:
        raise ValueError("the test split is empty: nothing to evaluate")
    if pixel_resolution not in PIXEL_RESOLUTIONS:
        raise ValueError(f"--pixel-resolution must be one of {', '.join(PIXEL_RESOLUTIONS)}, got {pixel_resolution!r}")
    for sample in split.test:  # a bad mask fails here, not after scoring every image
        if sample.mask_path is not None:
            decode_mask(sample.mask_path, None)
    scorer = scorer or checkpoint.scorer(device)
    labels = np.array([s.label for s in split.test])
    scores, maps, sizes = score_paths(scorer, [s.path for s in split.test], batch_size, progress)
    result = {
        "image_auroc": image_auroc(labels, scores) if 0 < labels.sum() < len(labels) else None,
        "f1_max": f1_max(labels, scores) if labels.sum() > 0 else None,
        "pixel_auroc": None,
        "aupro": None,
        "pixel_resolution": pixel_resolution,
        "precision": "bf16" if scorer.amp else "float32",
        "n_test": int(len(labels)),
        "n_anomalous": int(labels.sum()),
    }
    if split.has_masks:
        result.update(pixel_metrics_of(split.test, maps, sizes, pixel_resolution))
    if checkpoint.calibration is not None:
        predicted = scores > checkpoint.calibration.threshold
        result["accuracy_at_threshold"] = float((predicted == labels.astype(bool)).mean())
    return result
