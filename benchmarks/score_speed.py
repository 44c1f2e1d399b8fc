"""Scoring speed: the library's batched Scorer against the released code's procedure, in one run.

The naive baseline below follows the released code step by step: one image at a time, masks filled cell by
cell in Python loops and copied to the device, one float32 forward per mask (2 passes x 3 scales x 3 masks
= 18 per image), the refinement grid read cell by cell, pass 2 with the normal cells revealed. It takes the
hidden group of each cell from the same per-image hash as ssm.masks, so both paths see the same masks and
compute the same scores (tests/test_speedups.py checks this); only the way of computing differs.

Both paths score the same images with the same model and the same forward passes: early exit is off for the
headline numbers and reported on its own afterwards. Rounds alternate the two paths, so load from other
processes hits both, though not alike: on an oversubscribed CPU the naive path's many small batch-1
operators lose far more (threads wait on each other), so compare on a quiet machine.

    python benchmarks/score_speed.py                       # W = 64, 128 px, CPU: a few minutes on 2 cores
    python benchmarks/score_speed.py --checkpoint RUN/best --device cuda --images 64 --batch-size 32

The last line printed is one JSON object with scorer_images_per_s, naive_images_per_s and ratio (from each
path's best round) and the same over all rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from kornia.filters import gaussian_blur2d

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssm.losses import msgms_map  # noqa: E402
from ssm.masks import cell_sizes, complementary_masks, image_keys  # noqa: E402
from ssm.model import ModelConfig, SSMUNet, forward_flops  # noqa: E402
from ssm.scoring import Scorer, ScoringConfig  # noqa: E402


# --- the naive baseline: the released code's procedure -------------------------------------------------
def naive_masks(key: torch.Tensor, size: int, cell: int, n: int, salt: int) -> np.ndarray:
    """n complementary masks (n, size, size), filled cell by cell in Python like the released code.

    The hidden group of each cell comes from ssm.masks' hash (a size-grid mask with 1-px cells is exactly
    the cell grid), so the masks equal the library's; only the way they are built is the released code's."""
    grid = math.ceil(size / cell)
    group = complementary_masks(key.view(1).cpu(), grid, 1, n, salt)[0].argmin(0).tolist()
    masks = np.ones((n, size, size), np.float32)
    for r in range(grid):
        for c in range(grid):
            masks[group[r][c], r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = 0.0
    return masks


def naive_normal_cells(heat: np.ndarray, tau: float, cell: int, ratio: float) -> list[tuple[int, int]]:
    """Refinement cells (row, col) with more than `ratio` of their pixels below tau, read one by one."""
    size = heat.shape[-1]
    normal = []
    for r in range(math.ceil(size / cell)):
        for c in range(math.ceil(size / cell)):
            block = heat[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
            if (block < tau).mean() > ratio:
                normal.append((r, c))
    return normal


@torch.no_grad()
def naive_score(model, image: torch.Tensor, cfg: ScoringConfig, passes: int = 2) -> tuple[torch.Tensor, float, float]:
    """One image (C, H, W) -> (heatmap (H, W), heatmap maximum, reconstruction error), batch 1, float32."""
    device = next(model.parameters()).device
    x = image[None].to(device, torch.float32)
    size = x.shape[-1]
    f = size / 128
    cells = cell_sizes(size, cfg.k_values)
    rcell, sigma = max(1, round(cfg.refine_cell * f)), cfg.sigma * f
    weights = [k * k / sum(c * c for c in cells) for k in cells]
    key = image_keys(x, cfg.seed)[0]
    first_masks = [naive_masks(key, size, k, cfg.n_masks, salt=i + 1) for i, k in enumerate(cells)]
    masks, heat = first_masks, None
    for p in range(passes):
        if p:  # refinement: the pass-1 masks with the normal cells of the previous map revealed in every mask
            masks = [m.copy() for m in first_masks]
            for r, c in naive_normal_cells(heat[0, 0].cpu().numpy(), cfg.tau, rcell, cfg.ratio):
                for m in masks:
                    m[:, r * rcell : (r + 1) * rcell, c * rcell : (c + 1) * rcell] = 1.0
        combined, err = torch.zeros_like(x[:, :1]), 0.0
        for k_masks, w in zip(masks, weights):
            x_hat = torch.zeros_like(x)
            for mask in k_masks:
                m = torch.from_numpy(mask).to(device)[None, None]
                recon, _ = model(x * m, m)
                x_hat += recon * (1 - m)
            keep = torch.from_numpy(k_masks.prod(0)).to(device)[None, None]  # visible in every mask
            x_hat = x_hat * (1 - keep) + x * keep
            combined += w * msgms_map(x, x_hat)
            err += w * float(((x_hat - x) ** 2).mean())
        ksize = 2 * int(4 * sigma + 0.5) + 1
        heat = gaussian_blur2d(combined, (ksize, ksize), (sigma, sigma))
    return heat[0, 0], float(heat.max()), err


# --- timing ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_naive(model, images, cfg, device) -> float:
    _sync(device)
    t = time.perf_counter()
    for img in images:
        naive_score(model, img, cfg)
    _sync(device)
    return time.perf_counter() - t


def time_scorer(scorer, images, device) -> tuple[float, list[int]]:
    _sync(device)
    t = time.perf_counter()
    out = scorer.score(images)
    _sync(device)
    return time.perf_counter() - t, out.passes


MATMUL_N = 2048


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = MATMUL_N, iters: int = 5) -> float:
    """Measured FLOP/s of an n x n x n matmul in dtype: what the hardware gives a large dense product."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t)


def smooth_images(n: int, size: int, channels: int, seed: int) -> torch.Tensor:
    """Images with structure at several scales (upsampled noise), so maps and refinement behave as on photos."""
    g = torch.Generator().manual_seed(seed)
    x = sum(
        torch.nn.functional.interpolate(torch.rand(n, channels, s, s, generator=g), size=size, mode="bilinear")
        for s in (4, 16, 64)
    )
    return (x / 3).clamp(0, 1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=64, help="UNet width W (paper: 64)")
    p.add_argument("--size", type=int, default=128, help="image size in pixels")
    p.add_argument("--images", type=int, default=9, help="images scored by each path")
    p.add_argument("--batch-size", type=int, default=3, help="images per Scorer.score call (one round)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpoint", help="score with this checkpoint's model and calibration (default: random W)")
    p.add_argument("--compile", action="store_true", help="also torch.compile the scorer's model")
    p.add_argument("--no-early-exit-report", action="store_true", help="skip the separate early-exit run")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.checkpoint:
        from ssm.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint, map_location=device)
        model, mcfg, calibration = ckpt.build_model(device), ckpt.model_config, ckpt.calibration
        args.size, channels = mcfg.img_size, mcfg.channels
        cfg = replace(ckpt.scoring, early_exit=False)
    else:
        mcfg = ModelConfig(width=args.width, img_size=args.size)
        model, calibration, channels = SSMUNet(mcfg).to(device).eval(), None, 3
        cfg = ScoringConfig(early_exit=False)
    images = smooth_images(args.images, args.size, channels, seed=1)

    scorer = Scorer(model, cfg, calibration, compile=args.compile)
    if scorer.tau is None:  # no calibration: tau = 99th percentile of pass-1 pixels on two other images
        held_out = smooth_images(2, args.size, channels, seed=2)
        cfg.tau = float(torch.quantile(scorer.score(held_out, passes=1).first_pass.flatten().float().cpu(), 0.99))
    cfg.tau = scorer.tau
    naive_model = model  # the plain float32 module, NCHW: what the released code runs

    fwd = forward_flops(mcfg, args.size)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, W={mcfg.width}, "
          f"{args.size} px, {args.images} images, scorer batch {args.batch_size}, tau {cfg.tau:.4g}")
    print(f"scorer: amp (bf16) {scorer.amp}, channels_last {scorer.channels_last}, compile {args.compile}, "
          f"early exit off; naive: batch 1, float32, NCHW, one forward per mask")
    print(f"both: {2 * len(cfg.k_values) * cfg.n_masks} forwards per image, {fwd / 1e9:.1f} GFLOP per forward")

    # warm-up (oneDNN / cuDNN primitive selection, weight reorders, compilation) on an image outside the set
    warm = smooth_images(1, args.size, channels, seed=3)
    naive_score(naive_model, warm[0], cfg)
    scorer.score(warm.expand(args.batch_size, -1, -1, -1).contiguous())

    exit_scorer = Scorer(model, replace(cfg, early_exit=True), calibration, compile=args.compile)
    paths = ["naive", "scorer"] + ([] if args.no_early_exit_report else ["early exit"])
    if not args.no_early_exit_report:
        exit_scorer.score(warm.expand(args.batch_size, -1, -1, -1).contiguous())
    rates = {dt: matmul_rate(device, dt) for dt in (torch.float32, torch.bfloat16)}

    seconds = {p: [] for p in paths}
    second_pass = 0
    batches = list(torch.split(images, args.batch_size))
    for i, batch in enumerate(batches):
        for path in paths[i % len(paths) :] + paths[: i % len(paths)]:  # rotate which path goes first
            if path == "naive":
                dt = time_naive(naive_model, batch, cfg, device)
            else:
                dt, ran = time_scorer(scorer if path == "scorer" else exit_scorer, batch, device)
                if path == "scorer":
                    assert ran == [len(batch), len(batch)], ran  # every image ran both passes, as in naive
                else:
                    second_pass += ran[1]
            seconds[path].append(dt)
            print(f"  round {i + 1}/{len(batches)} {path:10s} {len(batch)} images in {dt:7.1f} s", flush=True)
    for dt, rate in {dt: matmul_rate(device, dt) for dt in rates}.items():  # best of before and after
        rates[dt] = max(rates[dt], rate)

    n, sizes = len(images), [len(b) for b in batches]
    forwards = 2 * len(cfg.k_values) * cfg.n_masks
    # images/s of each path from its best round (as timeit does: slower rounds are other processes' load)
    # and over all rounds
    best = {p: max(k / t for k, t in zip(sizes, seconds[p])) for p in paths}
    mean = {p: n / sum(seconds[p]) for p in paths}
    result = {
        "scorer_images_per_s": best["scorer"],
        "naive_images_per_s": best["naive"],
        "ratio": best["scorer"] / best["naive"],
        "ratio_all_rounds": mean["scorer"] / mean["naive"],
        "ratio_per_round": [a / b for a, b in zip(seconds["naive"], seconds["scorer"])],
    }
    for name, dt in (("naive", torch.float32), ("scorer", torch.bfloat16 if scorer.amp else torch.float32)):
        flops = fwd * forwards * best[name]
        print(f"{name:6s}: {best[name]:.3f} images/s best round ({mean[name]:.3f} over all rounds), "
              f"{flops / 1e9:.0f} GFLOP/s = {flops / rates[dt]:.0%} of a {str(dt)[6:]} {MATMUL_N}^3 matmul "
              f"({rates[dt] / 1e9:.0f} GFLOP/s here)")
    rounds = ", ".join(f"{r:.2f}" for r in result["ratio_per_round"])
    print(f"ratio scorer / naive: {result['ratio']:.2f}x best rounds, {result['ratio_all_rounds']:.2f}x over all "
          f"rounds (per round {rounds}); same images, model and {forwards} forwards per image")

    if not args.no_early_exit_report:  # early exit: exact, but how much it saves depends on the images and tau
        result["scorer_early_exit_images_per_s"] = best["early exit"]
        result["pass2_fraction"] = second_pass / n
        print(f"scorer with early exit: {best['early exit']:.3f} images/s best round, {second_pass}/{n} images ran "
              f"pass 2 (depends on the images and tau; not part of the ratio)")
    result.update(fp32_matmul_gflops=rates[torch.float32] / 1e9, bf16_matmul_gflops=rates[torch.bfloat16] / 1e9)
    result.update(width=mcfg.width, size=args.size, images=n, batch_size=args.batch_size, device=str(device),
                  amp=scorer.amp, channels_last=scorer.channels_last, compile=args.compile,
                  forwards_per_image=forwards, threads=torch.get_num_threads())
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
