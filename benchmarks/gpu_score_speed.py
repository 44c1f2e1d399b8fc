"""Scoring throughput on one GPU, as a fraction of the GPU's measured bf16 matrix rate.

For each batch size the library Scorer (bf16 autocast, channels_last, optionally torch.compile) scores
random-model W = 64 images at 128 px; images/s times the FLOPs each image actually costs (forward_flops x
forwards run: 9 in pass 1 plus 9 for each image that runs pass 2) over the rate of a large bf16 matmul gives
the fraction of the hardware it reaches. The naive baseline of benchmarks/score_speed.py (batch 1, float32,
one forward per mask) runs on a few images of the same GPU for the ratio.

    python benchmarks/gpu_score_speed.py                   # one H200: a few minutes
    python benchmarks/gpu_score_speed.py --compile         # also torch.compile (adds compilation time)
    python benchmarks/gpu_score_speed.py --cuda-graphs     # torch.compile replaying CUDA graphs (not yet measured)
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

from score_speed import matmul_rate, naive_score, smooth_images  # noqa: E402

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


def compiled_for_cuda_graphs(net):
    """The scorer's network under torch.compile(mode="reduce-overhead"), which replays CUDA graphs. A graph's
    outputs live in memory its next replay overwrites, and masked_forward keeps every chunk's output until it
    concatenates them, so each output is cloned at once."""
    graphed = torch.compile(net, mode="reduce-overhead")

    def forward(x, mask):
        torch.compiler.cudagraph_mark_step_begin()
        return tuple(t.clone() for t in graphed(x, mask))

    return forward


def scorer_throughput(device: torch.device, width: int = 64, size: int = 128,
                      batch_sizes: tuple[int, ...] = (32, 64, 128, 256, 512), min_images: int = 1024,
                      max_forward_batch: int = 1024, compile: bool = False, cuda_graphs: bool = False,
                      early_exit: bool = True, naive_images: int = 4, matmul_n: int = 8192,
                      deadline: float | None = None) -> dict:
    """Scorer images/s per batch size, as a fraction of the measured bf16 matmul rate and against the naive
    baseline on the same device. Batch sizes not started by `deadline` (time.monotonic()) are listed as skipped."""
    torch.manual_seed(0)
    results: dict = {"device": str(device), "width": width, "size": size, "compile": compile,
                     "cuda_graphs": cuda_graphs}
    iters = 50 if device.type == "cuda" else 3
    matmul_rate(device, torch.bfloat16, matmul_n, iters=2)  # warm-up: library loading, kernel selection, clocks
    rate = matmul_rate(device, torch.bfloat16, matmul_n, iters)
    results["bf16_matmul_tflops"] = rate / 1e12
    print(f"bf16 matmul {matmul_n}^3: {rate / 1e12:.1f} TFLOP/s")

    mcfg = ModelConfig(width=width, img_size=size)
    model = SSMUNet(mcfg).to(device).eval()
    fwd = forward_flops(mcfg, size)
    cfg = ScoringConfig(early_exit=early_exit, max_forward_batch=max_forward_batch)
    scorer = Scorer(model, cfg, amp=True, channels_last=True, compile=compile and not cuda_graphs)
    if cuda_graphs:
        scorer._compiled = compiled_for_cuda_graphs(scorer.net)
    # tau: 99th percentile of pass-1 pixel scores on held-out images, as a calibration would set it
    held_out = smooth_images(8, size, 3, seed=10_000).to(device)
    cfg.tau = float(torch.quantile(scorer.score(held_out, passes=1).first_pass.flatten().float().cpu(), 0.99))
    print(f"W={width}, {size} px, {fwd / 1e9:.1f} GFLOP per forward ({18 * fwd / 1e12:.2f} TFLOP for "
          f"18 forwards), tau {cfg.tau:.4g}, bf16 autocast + channels_last, compile {compile}, "
          f"CUDA graphs {cuda_graphs}, early exit {cfg.early_exit}")

    print(f"{'batch':>6} {'images/s':>10} {'pass 2':>7} {'TFLOP/s':>8} {'of matmul':>9} {'peak GiB':>8}")
    rows, skipped = [], []
    for batch in batch_sizes:
        if deadline is not None and time.monotonic() > deadline:
            skipped.append(batch)
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            row = {"batch_size": batch, **measure_batch(scorer, batch, size, min_images, device)}
        except torch.cuda.OutOfMemoryError:
            print(f"{batch:>6} out of memory: lower --max-forward-batch")
            skipped.append(batch)
            continue
        forwards = 9 + 9 * row["pass2_fraction"]  # per image: pass 1, and pass 2 where it ran
        row["tflops"] = fwd * forwards * row["images_per_s"] / 1e12
        row["fraction_of_matmul"] = row["tflops"] * 1e12 / rate
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        rows.append(row)
        print(f"{batch:>6} {row['images_per_s']:>10.1f} {row['pass2_fraction']:>7.2f} {row['tflops']:>8.1f} "
              f"{row['fraction_of_matmul']:>9.1%} {row['peak_gib']:>8.1f}", flush=True)
    results["batches"], results["skipped_batch_sizes"] = rows, skipped

    # naive baseline on the same device: batch 1, float32 (PyTorch's default, TF32 convolutions allowed), per mask
    naive_cfg = ScoringConfig(tau=cfg.tau)
    images = smooth_images(naive_images + 1, size, 3, seed=20_000).to(device)
    naive_score(model, images[0], naive_cfg)  # warm-up
    with Timer(device) as t:
        for img in images[1:]:
            naive_score(model, img, naive_cfg)
    naive = naive_images / t.seconds
    results["naive_images_per_s"] = naive
    results["naive_fraction_of_matmul"] = fwd * 18 * naive / rate
    print(f"naive (batch 1, float32, 18 forwards per image): {naive:.2f} images/s, "
          f"{results['naive_fraction_of_matmul']:.2%} of the bf16 matmul rate")
    if rows:
        best = max(rows, key=lambda r: r["images_per_s"])
        results["best_batch_size"] = best["batch_size"]
        results["scorer_images_per_s"] = best["images_per_s"]
        results["fraction_of_matmul"] = best["fraction_of_matmul"]
        results["ratio"] = best["images_per_s"] / naive
        # the same work: the naive baseline always runs 18 forwards, the scorer 9 + 9 x pass-2 fraction
        results["ratio_same_forwards"] = results["ratio"] * (9 + 9 * best["pass2_fraction"]) / 18
        print(f"best: batch {best['batch_size']}, {best['images_per_s']:.1f} images/s = {results['ratio']:.1f}x the "
              f"naive baseline, {results['ratio_same_forwards']:.1f}x per forward pass run "
              f"({best['fraction_of_matmul']:.1%} of the bf16 matmul rate)")
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-sizes", default="32,64,128,256,512", help="images per Scorer.score call")
    p.add_argument("--min-images", type=int, default=1024, help="images timed per batch size (at least 2 calls)")
    p.add_argument("--max-forward-batch", type=int, default=1024, help="masked inputs per UNet forward")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (adds minutes of compilation)")
    p.add_argument("--cuda-graphs", action="store_true", help="torch.compile with CUDA graphs (mode reduce-overhead)")
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
    results = scorer_throughput(device, args.width, args.size, tuple(int(b) for b in args.batch_sizes.split(",")),
                                args.min_images, args.max_forward_batch, args.compile, args.cuda_graphs,
                                not args.no_early_exit, args.naive_images, args.matmul_n)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
