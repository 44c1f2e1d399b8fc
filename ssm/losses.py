"""SSM losses (method page, section 4): gamma*MSE + alpha*MSGMS + beta*(1 - SSIM) + mask loss.

MSGMS also gives the per-pixel anomaly map used for scoring (section 5), so both live here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.filters import filter2d, median_blur
from kornia.metrics import ssim

GMS_C = 0.0026
GMS_SCALES = 4
_PREWITT = torch.tensor([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0], [1.0, 0.0, -1.0]]) / 3.0


def _gradient_magnitude(grey: torch.Tensor) -> torch.Tensor:
    kernels = torch.stack([_PREWITT, _PREWITT.t()]).to(grey)
    gx = filter2d(grey, kernels[0:1])
    gy = filter2d(grey, kernels[1:2])
    return torch.sqrt(gx * gx + gy * gy + 1e-12)


def gms_distance_maps(x: torch.Tensor, y: torch.Tensor, scales: int = GMS_SCALES) -> list[torch.Tensor]:
    """1 - GMS at each scale (the image, then 2x2 average-pooled halvings): a list of (B, 1, h, w) maps."""
    gx, gy = x.mean(1, keepdim=True), y.mean(1, keepdim=True)  # grey = channel mean
    maps = []
    for s in range(scales):
        if s:
            gx, gy = F.avg_pool2d(gx, 2), F.avg_pool2d(gy, 2)
        mx = _gradient_magnitude(median_blur(gx, 3))
        my = _gradient_magnitude(median_blur(gy, 3))
        gms = (2 * mx * my + GMS_C) / (mx * mx + my * my + GMS_C)
        maps.append(1 - gms)
    return maps


def msgms_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    maps = gms_distance_maps(x, y)
    return sum(m.mean() for m in maps) / len(maps)


def msgms_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel MSGMS anomaly map (B, 1, H, W): each scale's 1 - GMS resized (bilinear) and averaged."""
    size = x.shape[-2:]
    maps = gms_distance_maps(x, y)
    total = maps[0]
    for m in maps[1:]:
        total = total + F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return total / len(maps)


def ssim_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # kornia's SSIM: 11x11 Gaussian window, sigma 1.5, C1 = 0.01^2, C2 = 0.03^2
    return 1 - ssim(x, y, window_size=11).mean()


def ssm_loss(
    x: torch.Tensor,
    recon: torch.Tensor,
    mask_pred: torch.Tensor,
    masks: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts.

    x, recon: (B, C, H, W) image and assembled reconstruction; mask_pred, masks: (B, n, H, W) predicted and
    true masks. The mask loss sums the per-mask MSEs over the n masks.
    """
    x, recon = x.float(), recon.float()
    parts = {
        "mse": F.mse_loss(recon, x),
        "msgms": msgms_loss(x, recon),
        "ssim": ssim_loss(x, recon),
        "mask": F.mse_loss(mask_pred.float(), masks.float(), reduction="none").mean(dim=(0, 2, 3)).sum(),
    }
    total = gamma * parts["mse"] + alpha * parts["msgms"] + beta * parts["ssim"] + parts["mask"]
    return total, parts
