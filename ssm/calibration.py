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


def _spread(values: np.ndarray) -> float:
    return float(max(values.std(), 1e-3 * abs(values.mean()), 1e-8))


def calibrate(
    scorer: Scorer,
    batches: Iterable[torch.Tensor],
    pixel_quantile: float = 0.99,
    image_quantile: float = 0.99,
) -> Calibration:
    """Measure the calibration on batches of held-out normal images; sets it on the scorer.

    A batch is a (B, C, H, W) tensor, or a list of (C, H, W) images of any size for a tiled model: each goes
    through `Scorer.score_images`, as scoring will. The batches are read twice (tau first, then the refined
    scores), so pass a list or a re-iterable.
    """
    batches = list(batches)
    if not batches or sum(len(b) for b in batches) == 0:
        raise ValueError("calibration needs at least one held-out normal image")
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

    max_loc, max_scale = float(hmax.mean()), _spread(hmax)
    mse_loc, mse_scale = float(err.mean()), _spread(err)
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
