"""Calibration from held-out normal images (method page, section 6), stored in the checkpoint.

Scoring a stream one batch at a time cannot min-max normalise over a test set, so everything a score needs
is measured once on normal images the model did not train on:
- tau: a high quantile of pass-1 pixel scores (the refinement's pixel threshold),
- location and scale of both image-score components (heatmap maximum, reconstruction error) for the fusion,
- a default decision threshold: a high quantile of the fused normal image scores,
- a fixed heatmap display range, so that heatmaps written as 8-bit PNGs compare across images.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .scoring import Scorer

_MAX_PIXEL_SAMPLES = 4_000_000

# The fewest held-out normal images a calibration is measured on. Both estimates it makes need about nine:
# - the fusion divides each score by a sample standard deviation over n images, whose relative standard error
#   is about 1 / sqrt(2 (n - 1)): at most 25 % from n = 9 (with 2 images it is 71 %);
# - the decision threshold is the 99th percentile of the n normal image scores, which below 100 images is
#   (close to) the largest of them; a new normal image scores above the largest of n with probability
#   1 / (n + 1): at most 10 % from n = 9 (33 % with 2 images).
MIN_CALIBRATION_IMAGES = 9


class CalibrationError(ValueError):
    """A calibration that would not mean anything: too few normal images, or scores that do not vary."""


def check_calibration_size(n_images: int, minimum: int = MIN_CALIBRATION_IMAGES, *, n_normal: int | None = None,
                           val_fraction: float | None = None) -> None:
    """Refuse a calibration on fewer than `minimum` normal images; with the training set's size and validation
    fraction, the message says which fraction would hold out enough."""
    if n_images >= minimum:
        return
    advice = "add normal images"
    if n_normal and val_fraction is not None:
        needed = float(np.ceil(minimum / n_normal * 100) / 100)
        if needed <= val_fraction:  # the fraction is enough on paper: unreadable images left the split short
            advice += f", replace the unreadable ones, or raise --val-fraction above {val_fraction:g}"
        elif n_normal - minimum >= 2:
            advice += f" or raise --val-fraction from {val_fraction:g} to {needed:g}"
        else:
            advice += f" (with {n_normal} normal images no split leaves enough for both training and calibration)"
    raise CalibrationError(
        f"calibration needs at least {minimum} held-out normal images and the validation split has {n_images}"
        f"{f' (of {n_normal} normal images, --val-fraction {val_fraction:g})' if n_normal else ''}: {advice}. "
        f"With fewer, the score scale and the decision threshold are guesses (see ssm/calibration.py); "
        f"--min-calibration-images N accepts a rougher calibration."
    )


@dataclass
class Calibration:
    tau: float  # pixel threshold of the refinement
    max_loc: float  # heatmap maximum on normal images: mean and spread
    max_scale: float
    mse_loc: float  # reconstruction error on normal images: mean and spread
    mse_scale: float
    threshold: float  # default decision threshold on the fused image score
    heatmap_vmin: float  # heatmap value shown as 0 in 8-bit heatmaps
    heatmap_vmax: float  # heatmap value shown as 255
    n_images: int  # normal images measured
    pixel_quantile: float = 0.99
    image_quantile: float = 0.99

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _spread(values: np.ndarray, what: str) -> float:
    """The standard deviation that normalises one score component; refused when it is (close to) zero: the
    normal images would all score the same, and every other image far from them by an arbitrary amount."""
    if not np.isfinite(values).all():
        raise CalibrationError(f"calibration: the {what} is NaN or infinite on {int((~np.isfinite(values)).sum())} "
                               f"of {values.size} normal images: the model diverged; retrain with a lower --lr")
    std, mean = float(values.std()), float(values.mean())
    if std <= max(1e-3 * abs(mean), 1e-8):
        raise CalibrationError(
            f"calibration: the {what} barely varies over the {values.size} normal images (mean {mean:.6g}, "
            f"spread {std:.3g}), so it cannot scale scores: the images are (near) duplicates or the model's output "
            f"does not depend on them; use varied normal images, or retrain")
    return std


def calibrate(
    scorer: Scorer,
    batches: Iterable[torch.Tensor],
    pixel_quantile: float = 0.99,
    image_quantile: float = 0.99,
    min_images: int = MIN_CALIBRATION_IMAGES,
) -> Calibration:
    """Measure the calibration on batches of held-out normal images; sets it on the scorer.

    Refuses (CalibrationError) fewer than `min_images` images and a score component that does not vary.

    A batch is a (B, C, H, W) tensor, or a list of (C, H, W) images of any size for a tiled model: each goes
    through `Scorer.score_images`, as scoring will. The batches are read twice (tau first, then the refined
    scores), so pass a list or a re-iterable.
    """
    batches = list(batches)
    n_images = sum(len(b) for b in batches)
    if n_images == 0:
        raise CalibrationError("calibration needs at least one held-out normal image")
    check_calibration_size(n_images, max(min_images, 2))  # one image has no spread at all
    rng = np.random.default_rng(0)
    saved_tau, saved_cal = scorer.config.tau, scorer.calibration
    scorer.calibration = None
    try:
        pixels = [m.flatten().cpu().numpy() for b in batches
                  for m in scorer.score_images(b, passes=1, keep_first_pass=True).first_pass]
        pix = np.concatenate(pixels)
        if pix.size > _MAX_PIXEL_SAMPLES:
            pix = rng.choice(pix, _MAX_PIXEL_SAMPLES, replace=False)
        tau = float(np.quantile(pix, pixel_quantile))

        scorer.config.tau = tau
        hmax, err, heat_q = [], [], []
        for b in batches:
            out = scorer.score_images(b)
            hmax.append(out.heatmap_max.cpu().numpy())
            err.append(out.recon_error.cpu().numpy())
        hmax, err = np.concatenate(hmax), np.concatenate(err)
    finally:
        scorer.config.tau, scorer.calibration = saved_tau, saved_cal

    max_loc, max_scale = float(hmax.mean()), _spread(hmax, "heatmap maximum")
    mse_loc, mse_scale = float(err.mean()), _spread(err, "reconstruction error")
    fused = (hmax - max_loc) / max_scale + (err - mse_loc) / mse_scale
    # Normal maxima sit in the lower half of the display range; anomalies reach the top of it.
    vmax = 2.0 * float(np.quantile(hmax, image_quantile))
    cal = Calibration(
        tau=tau,
        max_loc=max_loc,
        max_scale=max_scale,
        mse_loc=mse_loc,
        mse_scale=mse_scale,
        threshold=float(np.quantile(fused, image_quantile)),
        heatmap_vmin=0.0,
        heatmap_vmax=max(vmax, 2.0 * tau, 1e-6),
        n_images=int(hmax.size),
        pixel_quantile=pixel_quantile,
        image_quantile=image_quantile,
    )
    scorer.calibration = cal
    return cal


def heatmap_to_uint8(heatmaps: torch.Tensor, cal: Calibration) -> torch.Tensor:
    """Heatmaps on the calibration's fixed display scale as uint8 (0 = vmin, 255 = vmax, clipped)."""
    scaled = (heatmaps - cal.heatmap_vmin) / max(cal.heatmap_vmax - cal.heatmap_vmin, 1e-12)
    return (scaled.clamp(0, 1) * 255).round().to(torch.uint8)
