"""Complementary multi-scale random masks (method page, section 2), built on the model's device.

For a cell size k the image is a grid of N x N cells. Each image gets its own random permutation of the
cells, cut into n nearly equal groups; mask j hides group j (0 there, 1 elsewhere). Every cell is hidden in
exactly one of the n masks.

The randomness comes from a per-image integer key run through an integer hash, not from a global RNG
stream: the masks of an image then depend only on its key, never on its neighbours in the batch. Training
draws random keys; scoring derives the key from the image content and a seed, so an image gets the same
masks (and the same score) alone or inside any batch.

>>> import torch
>>> m = complementary_masks(torch.tensor([1, 2]), size=128, cell=8, n=3)
>>> m.shape, bool((m.sum(1) == 2).all())   # each pixel hidden in exactly one of the 3 masks
(torch.Size([2, 3, 128, 128]), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_M31 = 0x7FFFFFFF
_REFERENCE_SIZE = 128  # the paper's cell sizes {2, 4, 8} are in pixels at 128 x 128


def cell_sizes(img_size: int, k_values: Sequence[int] = (2, 4, 8)) -> list[int]:
    """Cell sizes in pixels at img_size, scaled so a cell covers the same fraction of the image as at 128 px."""
    return [max(1, round(k * img_size / _REFERENCE_SIZE)) for k in k_values]


def _mix(h: torch.Tensor) -> torch.Tensor:
    """Integer hash of non-negative int64 values below 2**31 (products stay below 2**58, no overflow)."""
    h = ((h ^ (h >> 16)) * 0x045D9F3B) & _M31
    h = ((h ^ (h >> 16)) * 0x045D9F3B) & _M31
    return h ^ (h >> 16)


def random_keys(batch: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None):
    """Fresh random mask keys for training."""
    return torch.randint(0, _M31, (batch,), device=device, generator=generator, dtype=torch.int64)


_weights_cache: dict[tuple[int, str], torch.Tensor] = {}


def image_keys(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A per-image key from its content (8-bit quantised pixels) and a seed: a pure function of the image."""
    b = images.shape[0]
    flat = (images.detach().float().reshape(b, -1).clamp(0, 1) * 255).round().to(torch.int64)
    d = flat.shape[1]
    key = (d, str(images.device))
    if key not in _weights_cache:
        _weights_cache[key] = _mix(torch.arange(d, device=images.device, dtype=torch.int64)) & 0x7FFF
    h = (flat * _weights_cache[key]).sum(1) & _M31
    return _mix(h ^ _mix(torch.full_like(h, seed & _M31)))


def complementary_masks(keys: torch.Tensor, size: int, cell: int, n: int = 3, salt: int = 0) -> torch.Tensor:
    """Masks (B, n, size, size) float, 1 = visible, 0 = hidden, one complementary set per key.

    `salt` separates the scales (and anything else) drawn from the same key.
    """
    if n < 1:
        raise ValueError(f"the number of masks must be >= 1, got {n}")
    grid = math.ceil(size / cell)
    cells = grid * grid
    idx = torch.arange(cells, device=keys.device, dtype=torch.int64)
    seeds = _mix((keys.to(torch.int64) & _M31) ^ ((salt * 0x9E3779B1) & _M31))
    noise = _mix(_mix(seeds[:, None] ^ idx[None, :]) ^ (idx[None, :] * 0x2545F491 & _M31))
    order = torch.argsort(noise, dim=1, stable=True)  # a random permutation of the cells per image
    rank = torch.empty_like(order).scatter_(1, order, idx.expand_as(order))
    group = rank * n // cells  # cut the permutation into n nearly equal groups
    hidden = group[:, None, :] == torch.arange(n, device=keys.device)[None, :, None]
    masks = (~hidden).to(torch.float32).view(-1, n, grid, grid)
    masks = masks.repeat_interleave(cell, dim=-1).repeat_interleave(cell, dim=-2)
    return masks[..., :size, :size]


def multiscale_masks(keys: torch.Tensor, size: int, cells: Sequence[int], n: int = 3) -> torch.Tensor:
    """Masks for every scale at once: (B, S, n, size, size)."""
    return torch.stack([complementary_masks(keys, size, c, n, salt=i + 1) for i, c in enumerate(cells)], 1)
