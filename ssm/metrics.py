"""Evaluation metrics: image AUROC, F1-max, pixel AUROC and AUPRO (the MVTec AD protocol).

Labels and masks: 1 / True = anomalous. Scores and heatmaps: higher = more anomalous.

    >>> image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
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


def _pixel_inputs(masks, heatmaps, upsample: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
    """Masks as a list of bool (H_i, W_i) arrays and all heatmap pixels as one flat float array, in order.

    `masks` and `heatmaps`: (N, H, W) arrays, one (H, W) image, or sequences of 2-D arrays whose shapes may
    differ from image to image. Each heatmap must have its mask's shape, or with `upsample` it is resized to
    it (bilinear, float32). The flat copy is float32 unless a heatmap is float64: the only full-size copy.
    """
    def images(a) -> list:
        if isinstance(a, (list, tuple)):
            return list(a)
        a = np.asarray(a)
        return list(a) if a.ndim == 3 else [a]

    masks, heatmaps = images(masks), images(heatmaps)
    if len(masks) != len(heatmaps):
        raise ValueError(f"got {len(masks)} masks but {len(heatmaps)} heatmaps")
    masks = [np.asarray(m).astype(bool, copy=False) for m in masks]
    for i, (m, h) in enumerate(zip(masks, heatmaps)):
        if m.ndim != 2 or np.ndim(h) != 2 or (np.shape(h) != m.shape and not upsample):
            raise ValueError(
                f"masks and heatmaps must both be (N, H, W) or lists of (H, W) arrays of equal shapes; image {i} "
                f"has a mask of shape {m.shape} and a heatmap of shape {np.shape(h)}"
            )
    if not masks:
        raise ValueError("no images: pixel metrics need at least one mask and heatmap")
    wide = any(isinstance(h, np.ndarray) and h.dtype == np.float64 for h in heatmaps)
    flat = np.empty(sum(m.size for m in masks), dtype=np.float64 if wide else np.float32)
    start = 0
    for m, h in zip(masks, heatmaps):
        flat[start : start + m.size] = (upsample_to(h, m.shape) if upsample else np.asarray(h)).reshape(-1)
        start += m.size
    if not np.isfinite(flat).all():
        raise ValueError("heatmaps contain NaN or infinite values")
    return masks, flat


def upsample_to(heatmap, shape: tuple[int, int]) -> np.ndarray:
    """One (h, w) heatmap (numpy or torch, any real dtype) resized to `shape` = (H, W): bilinear with
    half-pixel centres (align_corners=False, antialiased when shrinking), in float32."""
    if isinstance(heatmap, torch.Tensor):
        t = heatmap.detach().to("cpu", torch.float32)
    else:
        t = torch.from_numpy(np.array(heatmap, dtype=np.float32))  # a float32 copy: the map is small
    if tuple(t.shape) != tuple(shape):
        t = F.interpolate(t[None, None], size=tuple(shape), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    return t.numpy()


def pixel_metrics(masks, heatmaps, upsample: bool = True) -> dict[str, float | None]:
    """Pixel AUROC and AUPRO of heatmaps against ground-truth masks, the MVTec AD protocol: each heatmap
    upsampled (bilinear, float32) to its own mask's resolution, masks and maps given as lists of 2-D arrays of
    any sizes. Both are None when no pixel is anomalous, or every pixel is."""
    masks, flat = _pixel_inputs(masks, heatmaps, upsample)
    positives = sum(int(m.sum()) for m in masks)
    if positives == 0 or positives == flat.size:
        return {"pixel_auroc": None, "aupro": None}
    return {"pixel_auroc": _pixel_auroc(masks, flat), "aupro": _aupro(masks, flat)}


def pixel_auroc(masks, heatmaps) -> float:
    """AUROC over all pixels of all images: masks (N, H, W) bool against heatmaps (N, H, W), or lists of
    (H_i, W_i) masks and heatmaps of matching shapes."""
    return _pixel_auroc(*_pixel_inputs(masks, heatmaps))


def _pixel_auroc(masks: list[np.ndarray], scores: np.ndarray) -> float:
    truth = np.concatenate([m.reshape(-1) for m in masks])
    if truth.all() or not truth.any():
        raise ValueError("pixel AUROC needs both anomalous (mask) and normal pixels")
    return float(roc_auc_score(truth, scores))


def aupro(masks, heatmaps, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit` false-positive rate, divided by `fpr_limit`.

    Masks and heatmaps as for `pixel_auroc`. Regions are the 8-connected components of each image's mask.
    At a threshold t, PRO(t) = mean over all regions of the fraction of the region's pixels scoring >= t, and
    FPR(t) = fraction of all normal pixels (mask False, every image) scoring >= t.
    The curve through every distinct threshold is integrated with the trapezoid rule from FPR 0 up to
    exactly `fpr_limit` (interpolating the last segment), so a perfect heatmap scores 1.0.

    Exact and O(P log P) in the number of pixels P: one sort by score, then cumulative sums of per-pixel
    weights (1 / (n_regions * region_size) for region pixels, 1 / n_normal for normal pixels).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return _aupro(*_pixel_inputs(masks, heatmaps), fpr_limit)


def _aupro(masks: list[np.ndarray], heatmaps: np.ndarray, fpr_limit: float = 0.3) -> float:
    # Give every region a global id (0 = normal pixel), image by image.
    region_ids = np.zeros(heatmaps.size, dtype=np.int32)
    n_regions, start = 0, 0
    for mask in masks:
        ids, n = label_regions(mask, connectivity=2, return_num=True)
        region_ids[start : start + mask.size] = np.where(ids > 0, ids + n_regions, 0).reshape(-1)
        n_regions, start = n_regions + n, start + mask.size
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one anomalous region: every mask is empty")
    region_size = np.bincount(region_ids, minlength=n_regions + 1)
    n_normal = int(region_size[0])
    if n_normal == 0:
        raise ValueError("AUPRO needs normal pixels: every mask pixel is anomalous")

    # Pixels in descending score order; the positives at threshold t are a prefix of this order.
    order = np.argsort(heatmaps, kind="stable")[::-1]
    scores = heatmaps[order]
    ids = region_ids[order]
    del order, region_ids
    overlap_weight = 1.0 / (n_regions * region_size)
    overlap_weight[0] = 0.0
    pro = np.cumsum(overlap_weight[ids])
    fpr = np.cumsum(ids == 0, dtype=np.int64)

    # Tied scores form one threshold: keep only the last pixel of each run of equal scores.
    last_of_tie = np.append(np.flatnonzero(scores[1:] != scores[:-1]), scores.size - 1)
    fpr = np.concatenate(([0.0], fpr[last_of_tie] / n_normal))
    pro = np.concatenate(([0.0], np.minimum(pro[last_of_tie], 1.0)))

    # Integrate up to fpr_limit, cutting the segment that crosses it.
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[:k] <= fpr_limit < fpr[k]
    x, y = fpr[:k], pro[:k]
    if k < fpr.size:
        t = (fpr_limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
        x = np.append(x, fpr_limit)
        y = np.append(y, pro[k - 1] + t * (pro[k] - pro[k - 1]))
    return float(np.trapezoid(y, x) / fpr_limit)
