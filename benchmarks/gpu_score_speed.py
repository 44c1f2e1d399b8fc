"""Scoring throughput on one GPU, as a fraction of the GPU's measured bf16 matrix rate.

For each batch size the library Scorer (bf16 autocast, channels_last, optionally torch.compile) scores
random-model W = 64 images at 128 px; images/s times the FLOPs each image actually costs (forward_flops x
forwards run: 9 in pass 1 plus 9 for each image that runs pass 2) over the rate of a large bf16 matmul gives
the fraction of the hardware it reaches. The naive baseline of benchmarks/score_speed.py (batch 1, float32,
one forward per mask) runs on a few images of the same GPU for the ratio.

    python benchmarks/gpu_score_speed.py                   # one H200: a few minutes
    python benchmarks/gpu_score_speed.py --compile         # also torch.compile (adds compilation time)
    python benchmarks/gpu_score_speed.py --device cpu --smoke   # tiny settings, to check the script runs

The last line printed is one JSON object with every measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from score_speed import naive_score, smooth_images  # noqa: E402

from ssm.model import ModelConfig, SSMUNet, forward_flops  # noqa: E402
from ssm.scoring import Scorer, ScoringConfig  # noqa: E402


class Timer:
    """Wall time of a block; on CUDA measured with events between synchronisations."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.end.record()
            torch.cuda.synchronize(self.device)
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def matmul_rate(device: torch.device, n: int, iters: int) -> float:
    """Measured bf16 FLOP/s of an n x n x n matmul, after warm-up."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(10):  # warm-up: kernel selection, clocks
        a @ b
    with Timer(device) as t:
        for _ in range(iters):
            a @ b
    return 2 * n**3 * iters / t.seconds


def measure_batch(scorer: Scorer, batch: int, size: int, min_images: int, device: torch.device) -> dict:
    """images/s of Scorer.score at this batch size, after one warm-up call (autotuning, compilation)."""
    images = smooth_images(batch, size, 3, seed=batch).to(device)
    scorer.score(images)  # warm-up
    calls = max(2, -(-min_images // batch))
    second = 0
    with Timer(device) as t:
        for _ in range(calls):
            second += scorer.score(images).passes[1]
    return {"images_per_s": batch * calls / t.seconds, "pass2_fraction": second / (batch * calls)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-sizes", default="32,64,128,256,512", help="images per Scorer.score call")
    p.add_argument("--min-images", type=int, default=1024, help="images timed per batch size (at least 2 calls)")
    p.add_argument("--max-forward-batch", type=int, default=1024, help="masked inputs per UNet forward")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (adds minutes of compilation)")
    p.add_argument("--no-early-exit", action="store_true", help="run pass 2 for every image")
    p.add_argument("--naive-images", type=int, default=4, help="images for the naive baseline")
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--smoke", action="store_true", help="tiny settings: W=8, 64 px, batches 2,4; checks the script")
    args = p.parse_args(argv)
    if args.smoke:
        args.width, args.size, args.batch_sizes = 8, 64, "2,4"
        args.min_images, args.naive_images, args.matmul_n = 4, 1, 256
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --device cpu --smoke to check the script on a CPU")
        torch.backends.cudnn.benchmark = True  # fixed shapes per batch size: let cuDNN pick its fastest kernels
        print(f"GPU {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    torch.manual_seed(0)

    results: dict = {"device": str(device), "width": args.width, "size": args.size, "compile": args.compile}
    rate = matmul_rate(device, args.matmul_n, iters=50 if device.type == "cuda" else 3)
    results["bf16_matmul_tflops"] = rate / 1e12
    print(f"bf16 matmul {args.matmul_n}^3: {rate / 1e12:.1f} TFLOP/s")

    mcfg = ModelConfig(width=args.width, img_size=args.size)
    model = SSMUNet(mcfg).to(device).eval()
    fwd = forward_flops(mcfg, args.size)
    cfg = ScoringConfig(early_exit=not args.no_early_exit, max_forward_batch=args.max_forward_batch)
    scorer = Scorer(model, cfg, amp=True, channels_last=True, compile=args.compile)
    # tau: 99th percentile of pass-1 pixel scores on held-out images, as a calibration would set it
    held_out = smooth_images(8, args.size, 3, seed=10_000).to(device)
    cfg.tau = float(torch.quantile(scorer.score(held_out, passes=1).first_pass.flatten().float().cpu(), 0.99))
    print(f"W={args.width}, {args.size} px, {fwd / 1e9:.1f} GFLOP per forward ({18 * fwd / 1e12:.2f} TFLOP for "
          f"18 forwards), tau {cfg.tau:.4g}, "
          f"bf16 autocast + channels_last, compile {args.compile}, early exit {cfg.early_exit}")

    print(f"{'batch':>6} {'images/s':>10} {'pass 2':>7} {'TFLOP/s':>8} {'of matmul':>9} {'peak GiB':>8}")
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            row = {"batch_size": batch, **measure_batch(scorer, batch, args.size, args.min_images, device)}
        except torch.cuda.OutOfMemoryError:
            print(f"{batch:>6} out of memory: lower --max-forward-batch")
            continue
        forwards = 9 + 9 * row["pass2_fraction"]  # per image: pass 1, and pass 2 where it ran
        row["tflops"] = fwd * forwards * row["images_per_s"] / 1e12
        row["fraction_of_matmul"] = row["tflops"] * 1e12 / rate
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        rows.append(row)
        print(f"{batch:>6} {row['images_per_s']:>10.1f} {row['pass2_fraction']:>7.2f} {row['tflops']:>8.1f} "
              f"{row['fraction_of_matmul']:>9.1%} {row['peak_gib']:>8.1f}", flush=True)
    results["batches"] = rows

    # naive baseline on the same GPU: batch 1, float32 (PyTorch's default, TF32 convolutions allowed), per mask
    naive_cfg = ScoringConfig(tau=cfg.tau)
    images = smooth_images(args.naive_images + 1, args.size, 3, seed=20_000).to(device)
    naive_score(model, images[0], naive_cfg)  # warm-up
    with Timer(device) as t:
        for img in images[1:]:
            naive_score(model, img, naive_cfg)
    naive = args.naive_images / t.seconds
    results["naive_images_per_s"] = naive
    results["naive_fraction_of_matmul"] = fwd * 18 * naive / rate
    print(f"naive (batch 1, float32, 18 forwards per image): {naive:.2f} images/s, "
          f"{results['naive_fraction_of_matmul']:.2%} of the bf16 matmul rate")
    if rows:
        best = max(rows, key=lambda r: r["images_per_s"])
        results["best_batch_size"] = best["batch_size"]
        results["scorer_images_per_s"] = best["images_per_s"]
        results["ratio"] = best["images_per_s"] / naive
        # the same work: the naive baseline always runs 18 forwards, the scorer 9 + 9 x pass-2 fraction
        results["ratio_same_forwards"] = results["ratio"] * (9 + 9 * best["pass2_fraction"]) / 18
        print(f"best: batch {best['batch_size']}, {best['images_per_s']:.1f} images/s = {results['ratio']:.1f}x the "
              f"naive baseline, {results['ratio_same_forwards']:.1f}x per forward pass run "
              f"({best['fraction_of_matmul']:.1%} of the bf16 matmul rate)")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
