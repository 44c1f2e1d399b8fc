"""Evaluation metrics: image AUROC, F1-max, pixel AUROC and AUPRO (the MVTec AD protocol).

Labels and masks: 1 / True = anomalous. Scores and heatmaps: higher = more anomalous.

    >>> image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
"""

from __future__ import annotations

import numpy as np
from skimage.measure import label as label_regions
from sklearn.metrics import precision_recall_curve, roc_auc_score


def _image_inputs(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1).astype(bool)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length: {labels.size} vs {scores.size}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    if labels.all() or not labels.any():
        raise ValueError("need both normal (0) and anomalous (1) labels to compute this metric")
    return labels, scores


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores against image labels."""
    labels, scores = _image_inputs(labels, scores)
    return float(roc_auc_score(labels, scores))


def f1_max(labels, scores) -> float:
    """The best F1 score over all thresholds on `scores`."""
    labels, scores = _image_inputs(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def _pixel_inputs(masks, heatmaps) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks).astype(bool)
    heatmaps = np.asarray(heatmaps, dtype=np.float64)
    if masks.ndim == 2 and heatmaps.ndim == 2:  # a single image
        masks, heatmaps = masks[None], heatmaps[None]
    if masks.shape != heatmaps.shape or masks.ndim != 3:
        raise ValueError(f"masks and heatmaps must both be (N, H, W), got {masks.shape} and {heatmaps.shape}")
    if not np.isfinite(heatmaps).all():
        raise ValueError("heatmaps contain NaN or infinite values")
    return masks, heatmaps


def pixel_auroc(masks: np.ndarray, heatmaps: np.ndarray) -> float:
    """AUROC over all pixels of all images: masks (N, H, W) bool against heatmaps (N, H, W)."""
    masks, heatmaps = _pixel_inputs(masks, heatmaps)
    if masks.all() or not masks.any():
        raise ValueError("pixel AUROC needs both anomalous (mask) and normal pixels")
    return float(roc_auc_score(masks.reshape(-1), heatmaps.reshape(-1)))


def aupro(masks: np.ndarray, heatmaps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit` false-positive rate, divided by `fpr_limit`.

    Regions are the 8-connected components of each image's mask. At a threshold t,
    PRO(t) = mean over all regions of the fraction of the region's pixels scoring >= t, and
    FPR(t) = fraction of all normal pixels (mask False, every image) scoring >= t.
    The curve through every distinct threshold is integrated with the trapezoid rule from FPR 0 up to
    exactly `fpr_limit` (interpolating the last segment), so a perfect heatmap scores 1.0.

    Exact and O(P log P) in the number of pixels P: one sort by score, then cumulative sums of per-pixel
    weights (1 / (n_regions * region_size) for region pixels, 1 / n_normal for normal pixels).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    masks, heatmaps = _pixel_inputs(masks, heatmaps)

    # Give every region a global id (0 = normal pixel), image by image.
    region_ids = np.zeros(masks.shape, dtype=np.int64)
    n_regions = 0
    for i, mask in enumerate(masks):
        ids, n = label_regions(mask, connectivity=2, return_num=True)
        region_ids[i] = np.where(ids > 0, ids + n_regions, 0)
        n_regions += n
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one anomalous region: every mask is empty")
    region_ids = region_ids.reshape(-1)
    region_size = np.bincount(region_ids, minlength=n_regions + 1)
    n_normal = int(region_size[0])
    if n_normal == 0:
        raise ValueError("AUPRO needs normal pixels: every mask pixel is anomalous")

    # Pixels in descending score order; the positives at threshold t are a prefix of this order.
    order = np.argsort(heatmaps.reshape(-1), kind="stable")[::-1]
    scores = heatmaps.reshape(-1)[order]
    ids = region_ids[order]
    is_normal = ids == 0
    overlap_weight = np.where(is_normal, 0.0, 1.0 / (n_regions * region_size[ids]))
    pro = np.cumsum(overlap_weight)
    fpr = np.cumsum(is_normal) / n_normal

    # Tied scores form one threshold: keep only the last pixel of each run of equal scores.
    last_of_tie = np.append(np.flatnonzero(scores[1:] != scores[:-1]), scores.size - 1)
    fpr = np.concatenate(([0.0], fpr[last_of_tie]))
    pro = np.concatenate(([0.0], np.minimum(pro[last_of_tie], 1.0)))

    # Integrate up to fpr_limit, cutting the segment that crosses it.
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[:k] <= fpr_limit < fpr[k]
    x, y = fpr[:k], pro[:k]
    if k < fpr.size:
        t = (fpr_limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
        x = np.append(x, fpr_limit)
        y = np.append(y, pro[k - 1] + t * (pro[k] - pro[k - 1]))
    return float(np.trapezoid(y, x) / fpr_limit)
