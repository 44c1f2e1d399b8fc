"""Images as they come: native resolution and aspect ratio, trained on crops and scored as tiles.

A 2-pixel crack in a 500 x 1250 part vanishes when the image is squashed to one small square. With tiling
(`ModelConfig.tiled`), an image is only resized by a factor (`ModelConfig.scale`, 1 = native), keeping its
aspect ratio; training sees one random T x T crop per image per epoch (T = `ModelConfig.img_size`), and
scoring cuts the image into overlapping T x T tiles, scores all of them as one batch of ordinary images
(`Scorer.score`: the method is unchanged at the tile's size), and stitches their heatmaps back into one map
of the image's size. The stitch weights each tile's map by a window that fades towards the tile's border,
where the inpainting had the least context, so seams do not show.

    >>> import torch
    >>> origins = tile_origins(300, 128, 64)        # evenly spread, the last tile ends at the border
    >>> origins
    [0, 57, 115, 172]
    >>> x = torch.rand(1, 200, 300)
    >>> tiles, grid = cut_tiles(x, 128, 0.5)         # (N, 1, 128, 128) and the tiles' origins
    >>> torch.allclose(stitch(tiles[:, 0], grid, (200, 300)), x[0])
    True
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of `tile` px covering `length` px with at most `stride` between starts."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def pad_to(x: torch.Tensor, tile: int) -> torch.Tensor:
    """x (..., H, W) padded at the bottom and right to at least tile x tile (edge pixels repeated)."""
    h, w = x.shape[-2:]
    ph, pw = max(0, tile - h), max(0, tile - w)
    if not (ph or pw):
        return x
    flat = x.reshape(-1, 1, h, w).float()  # replicate padding is defined for floats only
    padded = F.pad(flat, (0, pw, 0, ph), mode="replicate").to(x.dtype)
    return padded.reshape(*x.shape[:-2], h + ph, w + pw)


def cut_tiles(image: torch.Tensor, tile: int, overlap: float = 0.5) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """One image (C, H, W) -> its tiles (N, C, tile, tile) and their (top, left) origins (see tile_grid)."""
    grid = tile_grid(tuple(image.shape[-2:]), tile, overlap)
    x = pad_to(image, tile)
    return torch.stack([x[:, t : t + tile, l : l + tile] for t, l in grid]), grid


def _window(tile: int, device) -> torch.Tensor:
    """(tile, tile) stitching weights: 1 in the middle half, falling linearly towards the border (never 0)."""
    ramp = max(1, tile // 4)
    i = torch.arange(tile, device=device, dtype=torch.float32)
    edge = torch.minimum(i + 1, tile - i).clamp(max=ramp) / ramp
    return edge[:, None] * edge[None, :]


class Stitcher:
    """Accumulates tile maps (tile, tile) at their origins into one (H, W) map: the window-weighted mean
    where tiles overlap."""

    def __init__(self, size: tuple[int, int], tile: int, device=None):
        self.size, self.tile = size, tile
        hp, wp = max(size[0], tile), max(size[1], tile)
        self.weight = _window(tile, device)
        self.total = torch.zeros(hp, wp, device=device, dtype=torch.float32)
        self.norm = torch.zeros_like(self.total)

    def add(self, tile_map: torch.Tensor, origin: tuple[int, int]) -> None:
        t, l = origin
        self.total[t : t + self.tile, l : l + self.tile] += tile_map.float() * self.weight
        self.norm[t : t + self.tile, l : l + self.tile] += self.weight

    def result(self) -> torch.Tensor:
        h, w = self.size
        return (self.total / self.norm)[:h, :w]


def stitch(maps: torch.Tensor, grid: Sequence[tuple[int, int]], size: tuple[int, int]) -> torch.Tensor:
    """Tile maps (N, tile, tile) at their origins -> one (H, W) map (see Stitcher)."""
    stitcher = Stitcher(size, maps.shape[-1], maps.device)
    for m, origin in zip(maps, grid):
        stitcher.add(m, origin)
    return stitcher.result()


def tile_grid(size: tuple[int, int], tile: int, overlap: float = 0.5) -> list[tuple[int, int]]:
    """(top, left) origins of the tiles covering an image of `size` (H, W), padded to at least one tile,
    neighbours overlapping by at least `overlap` of a tile."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile overlap must be in [0, 1), got {overlap}")
    stride = max(1, int(tile * (1.0 - overlap)))
    h, w = max(size[0], tile), max(size[1], tile)
    return [(t, l) for t in tile_origins(h, tile, stride) for l in tile_origins(w, tile, stride)]


def random_crop(image: torch.Tensor, tile: int, rng: random.Random) -> torch.Tensor:
    """A tile x tile crop of image (C, H, W) at a position drawn from `rng` (padded when smaller)."""
    x = pad_to(image, tile)
    top = rng.randrange(x.shape[-2] - tile + 1)
    left = rng.randrange(x.shape[-1] - tile + 1)
    return x[:, top : top + tile, left : left + tile]
