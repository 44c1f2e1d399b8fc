"""Tiled scoring speed: is a large image scored by batched tiles as fast per pixel as a batch of whole images?

Both paths use the same model and scorer settings (float32, early exit off, a fixed tau so every pass runs on
every input): the plain path scores a batch of T x T images, the tiled path scores large non-square images
cut into overlapping T x T tiles (batched together, then stitched). Rounds alternate the two paths.

    python benchmarks/tile_speed.py                    # W = 16, T = 128, images of 512 x 1024, CPU
    python benchmarks/tile_speed.py --width 64 --device cuda --height 2048 --width-px 2448

The last line printed is one JSON object: plain_pixels_per_s (input pixels of whole T x T images),
tiled_tile_pixels_per_s (tile pixels, so the same unit of work), ratio = tiled / plain (target ~1), and
tiled_image_pixels_per_s (pixels of the large images: lower by the tiles' overlap, reported as
overlap_factor = tile pixels / image pixels).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssm.model import ModelConfig, SSMUNet  # noqa: E402
from ssm.scoring import Scorer, ScoringConfig  # noqa: E402
from ssm.tiling import tile_grid  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=16, help="UNet width W")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--height", type=int, default=512, help="large image height (px)")
    ap.add_argument("--width-px", type=int, default=1024, help="large image width (px)")
    ap.add_argument("--images", type=int, default=2, help="large images per tiled round")
    ap.add_argument("--batch-size", type=int, default=32, help="whole T x T images per plain round")
    ap.add_argument("--overlap", type=float, default=ScoringConfig.tile_overlap)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = ScoringConfig(tau=0.05, early_exit=False, tile_overlap=args.overlap)
    plain = Scorer(SSMUNet(ModelConfig(width=args.width, img_size=args.tile)).to(device).eval(), cfg, amp=False)
    tiled = Scorer(SSMUNet(ModelConfig(width=args.width, img_size=args.tile, tiled=True)).to(device).eval(), cfg, amp=False)
    tiled.net.load_state_dict(plain.net.state_dict())

    g = torch.Generator().manual_seed(0)
    whole = torch.rand(args.batch_size, 3, args.tile, args.tile, generator=g).to(device)
    large = [torch.rand(3, args.height, args.width_px, generator=g).to(device) for _ in range(args.images)]
    n_tiles = sum(len(tile_grid(tuple(x.shape[-2:]), args.tile, args.overlap)) for x in large)
    tile_px = n_tiles * args.tile**2
    image_px = sum(x.shape[-2] * x.shape[-1] for x in large)
    print(f"W={args.width}, T={args.tile}: plain batch {args.batch_size} x {args.tile}^2; tiled {args.images} images of "
          f"{args.height} x {args.width_px} = {n_tiles} tiles (overlap {args.overlap}: {tile_px / image_px:.2f} tile "
          f"pixels per image pixel)", flush=True)

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(lambda: plain.score(whole[:2]))  # warm-up
    timed(lambda: tiled.score_images(large[:1]))
    plain_rates, tiled_rates = [], []
    for r in range(args.rounds):
        tp = timed(lambda: plain.score(whole))
        tt = timed(lambda: tiled.score_images(large))
        plain_rates.append(whole.shape[0] * args.tile**2 / tp)
        tiled_rates.append(tile_px / tt)
        print(f"round {r + 1}: plain {plain_rates[-1] / 1e6:.3f} Mpx/s, tiled {tiled_rates[-1] / 1e6:.3f} Mpx/s "
              f"(tile pixels), ratio {tiled_rates[-1] / plain_rates[-1]:.3f}", flush=True)
    best_plain, best_tiled = max(plain_rates), max(tiled_rates)
    print(json.dumps({
        "plain_pixels_per_s": round(best_plain), "tiled_tile_pixels_per_s": round(best_tiled),
        "ratio": round(best_tiled / best_plain, 3), "tiled_image_pixels_per_s": round(best_tiled * image_px / tile_px),
        "overlap_factor": round(tile_px / image_px, 3), "tiles": n_tiles, "width": args.width, "tile": args.tile,
    }))


if __name__ == "__main__":
    main()
