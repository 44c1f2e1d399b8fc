"""Metrics against hand-computed values and independent slow references."""

import time

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ssm.metrics import aupro, f1_max, image_auroc, pixel_auroc, pixel_metrics


# ---------------------------------------------------------------------------------------------------------
# Image level


def test_image_auroc_hand_computed():
    # Pairs (anomalous > normal): 0.35>0.1, 0.8>0.1, 0.8>0.4; 0.35<0.4  ->  3 of 4.
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert image_auroc([0, 1], [0.2, 0.9]) == 1.0
    assert image_auroc([0, 1], [0.9, 0.2]) == 0.0
    assert image_auroc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts half


def test_f1_max_hand_computed():
    # Threshold 0.35 flags {0.4, 0.35, 0.8}: TP 2, FP 1, FN 0 -> P 2/3, R 1, F1 0.8 (best of all thresholds).
    assert f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8)
    assert f1_max([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.8]) == pytest.approx(1.0)
    # Anomalies scored lowest: best is flagging everything, P 0.5, R 1, F1 2/3.
    assert f1_max([1, 1, 0, 0], [0.1, 0.2, 0.7, 0.8]) == pytest.approx(2 / 3)


def test_image_metrics_need_both_classes():
    with pytest.raises(ValueError, match="both"):
        image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="both"):
        f1_max([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="length"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])


# ---------------------------------------------------------------------------------------------------------
# Pixel AUROC


def _pairwise_auroc(masks, heatmaps):
    pos = heatmaps[masks]
    neg = heatmaps[~masks]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


@pytest.mark.parametrize("levels", [None, 5])  # continuous scores, and heavily tied ones
def test_pixel_auroc_matches_pairwise_count(levels):
    rng = np.random.default_rng(1)
    masks = rng.random((3, 12, 10)) < 0.2
    heatmaps = rng.random(masks.shape) + 0.4 * masks
    if levels:
        heatmaps = np.round(heatmaps * levels) / levels
    assert pixel_auroc(masks, heatmaps) == pytest.approx(_pairwise_auroc(masks, heatmaps), abs=1e-12)


def test_pixel_auroc_rejects_masks_without_anomalies():
    with pytest.raises(ValueError, match="anomalous"):
        pixel_auroc(np.zeros((2, 4, 4), bool), np.random.rand(2, 4, 4))
    with pytest.raises(ValueError, match="shape|\\(N, H, W\\)"):
        pixel_auroc(np.zeros((2, 4, 4), bool), np.random.rand(2, 4, 5))


# ---------------------------------------------------------------------------------------------------------
# AUPRO


def _reference_aupro(masks, heatmaps, fpr_limit=0.3):
    """Slow and obvious: a loop over every distinct threshold, a loop over every region. Images may differ in
    shape: each is labelled on its own, then all pixels are laid end to end."""
    sizes = np.cumsum([0] + [m.size for m in masks])
    regions = []  # one boolean map over all pixels per region
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))  # 8-connectivity
        for r in range(1, n + 1):
            region = np.zeros(sizes[-1], bool)
            region[sizes[i] : sizes[i + 1]] = (labelled == r).reshape(-1)
            regions.append(region)
    masks = np.concatenate([m.reshape(-1) for m in masks])
    heatmaps = np.concatenate([h.reshape(-1) for h in heatmaps])
    normal = ~masks

    curve = [(0.0, 0.0)]  # threshold above every score: nothing flagged
    for t in np.unique(heatmaps)[::-1]:
        flagged = heatmaps >= t
        overlaps = []
        for region in regions:
            overlaps.append(flagged[region].sum() / region.sum())
        fpr = flagged[normal].sum() / normal.sum()
        curve.append((fpr, float(np.mean(overlaps))))

    area = 0.0
    for (x0, y0), (x1, y1) in zip(curve[:-1], curve[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def _random_case(seed, shape=(4, 24, 24), tied_levels=None):
    rng = np.random.default_rng(seed)
    masks = np.zeros(shape, bool)
    # A few rectangles of different sizes, some touching diagonally (one 8-connected region), one image clean.
    masks[0, 2:6, 2:6] = True
    masks[0, 6:9, 6:12] = True  # diagonal neighbour of the first: same region under 8-connectivity
    masks[0, 15:22, 14:20] = True
    masks[1, 0:3, 20:24] = True
    masks[2, 10:11, 10:11] = True  # a one-pixel region weighs as much as a large one
    masks[2, 12:20, 3:18] = True
    heatmaps = rng.random(shape) + 0.6 * masks
    if tied_levels:
        heatmaps = np.round(heatmaps * tied_levels) / tied_levels
    return masks, heatmaps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_slow_reference(seed):
    masks, heatmaps = _random_case(seed)
    assert aupro(masks, heatmaps) == pytest.approx(_reference_aupro(masks, heatmaps), abs=1e-9)


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_slow_reference_with_ties_and_other_limits(fpr_limit):
    masks, heatmaps = _random_case(7, tied_levels=12)
    expected = _reference_aupro(masks, heatmaps, fpr_limit)
    assert aupro(masks, heatmaps, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_pixel_metrics_take_images_of_different_sizes():
    # Three images of three shapes, as MVTec AD categories mix them; lists in, the same as the references.
    rng = np.random.default_rng(4)
    masks = [rng.random(shape) < 0.15 for shape in ((9, 14), (20, 7), (12, 12))]
    masks[1][:] = False  # a normal image
    heatmaps = [rng.random(m.shape).astype(np.float32) + 0.5 * m for m in masks]
    flat_masks = np.concatenate([m.reshape(-1) for m in masks])
    flat_maps = np.concatenate([h.reshape(-1) for h in heatmaps])
    assert pixel_auroc(masks, heatmaps) == pytest.approx(_pairwise_auroc(flat_masks, flat_maps), abs=1e-12)
    assert aupro(masks, heatmaps) == pytest.approx(_reference_aupro(masks, heatmaps), abs=1e-9)
    with pytest.raises(ValueError, match="image 2"):
        pixel_auroc(masks, heatmaps[:2] + [heatmaps[2][:, :11]])


def test_pixel_metrics_upsample_each_heatmap_to_its_mask():
    # Heatmaps at a model's 8 x 8 against masks at their own sizes: each map is upsampled bilinearly (pixel
    # centres at half-integers, as PIL and the MVTec AD evaluation resize) to its mask, then scored.
    rng = np.random.default_rng(5)
    masks = [rng.random(shape) < 0.2 for shape in ((24, 40), (16, 16))]
    heatmaps = [rng.random((8, 8)).astype(np.float32) for _ in masks]
    up = [np.asarray(Image.fromarray(h, "F").resize(m.shape[::-1], Image.BILINEAR)) for m, h in zip(masks, heatmaps)]
    got = pixel_metrics(masks, heatmaps)
    assert got["pixel_auroc"] == pytest.approx(pixel_auroc(masks, up), abs=1e-6)
    assert got["aupro"] == pytest.approx(aupro(masks, up), abs=1e-6)
    assert pixel_metrics([np.zeros((4, 4), bool)], [np.ones((2, 2))]) == {"pixel_auroc": None, "aupro": None}
    with pytest.raises(ValueError, match="2 masks but 1 heatmaps"):
        pixel_metrics(masks, heatmaps[:1])


def test_aupro_regions_are_eight_connected():
    # A 2x2 block plus one diagonal pixel is ONE region of 5 pixels: finding only the diagonal pixel gives
    # PRO 1/5 (with 4-connectivity it would be two regions and PRO (0 + 1) / 2).
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 1:3, 1:3] = True
    masks[0, 3, 3] = True
    heatmaps = np.zeros((1, 8, 8))
    heatmaps[0, 3, 3] = 1.0  # found at FPR 0
    # Curve: (0, 0) -> (0, 0.2) -> (1, 1); up to FPR 0.3 the PRO rises from 0.2 to 0.44.
    assert aupro(masks, heatmaps) == pytest.approx((0.2 + 0.44) / 2, abs=1e-12)


def test_aupro_extremes():
    masks, _ = _random_case(3)
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, -masks.astype(float)) == pytest.approx(0.0)
    # One tied threshold: the curve is the diagonal PRO = FPR, whose mean up to 0.3 is 0.15.
    assert aupro(masks, np.zeros(masks.shape)) == pytest.approx(0.15)


def test_aupro_errors():
    with pytest.raises(ValueError, match="region"):
        aupro(np.zeros((2, 8, 8), bool), np.random.rand(2, 8, 8))
    with pytest.raises(ValueError, match="normal pixels"):
        aupro(np.ones((2, 8, 8), bool), np.random.rand(2, 8, 8))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.ones((2, 8, 8), bool), np.random.rand(2, 8, 8), fpr_limit=0.0)
    with pytest.raises(ValueError, match="NaN"):
        aupro(np.eye(8, dtype=bool)[None], np.full((1, 8, 8), np.nan))


def test_aupro_handles_a_test_set_of_pixels_quickly():
    # About 1.5 M pixels (92 images at 128 px), as in one MVTec AD category: an O(P log P) implementation
    # takes well under a second; a loop over thresholds would take minutes.
    rng = np.random.default_rng(0)
    masks = np.zeros((92, 128, 128), bool)
    masks[:, 30:60, 40:70] = True
    masks[::3, 90:100, 10:20] = True
    heatmaps = rng.random(masks.shape).astype(np.float32) + 0.5 * masks
    start = time.perf_counter()
    value = aupro(masks, heatmaps)
    assert time.perf_counter() - start < 10.0
    assert 0.3 < value < 1.0
