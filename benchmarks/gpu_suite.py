"""The GPU checks in one process, without Ray: the paper's recipe on MVTec bottle, scorer throughput and
training throughput, each in its own time box, and one JSON line last.

1. recipe: ssm.training.fit with W = 64, 128 px, 50 epochs, batch 32, Adam 1e-4 stepped x0.1 at 15/30/45
   (TrainConfig's defaults), bf16 autocast on CUDA; then ssm.evaluation.evaluate at ground-truth resolution.
   If the time box ends first, training stops after that epoch, the best checkpoint so far is calibrated as
   fit calibrates it and evaluated, and the JSON says "complete": false.
2. scorer: gpu_score_speed.scorer_throughput (images/s per batch size, the fraction of a bf16 matmul measured
   in the same run, the ratio to score_speed.py's naive batch-1 float32 procedure on the same device).
3. training throughput: training_step + Adam on images already on the device, at batch 32 and then doubling
   until out of memory (or the time box); images/s of each.

A part that fails records {"error": ...} and the others still run.

    python benchmarks/gpu_suite.py --data DATA/mvtec_bottle     # one GPU; time boxes keep it under 8 minutes
    python benchmarks/gpu_suite.py --dry-run                    # CPU, tiny settings and generated images
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_score_speed import Timer, scorer_throughput  # noqa: E402
from score_speed import smooth_images  # noqa: E402

from ssm.calibration import calibrate  # noqa: E402
from ssm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from ssm.data import ImageDataset, load_layout  # noqa: E402
from ssm.model import ModelConfig, SSMUNet  # noqa: E402
from ssm.training import TrainConfig, fit, image_batches, make_optimizer, split_train_val, training_step  # noqa: E402


class TimeUp(Exception):
    """Raised from fit's epoch callback when the recipe's time box is spent."""


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def recipe(data: str, out: Path, device: torch.device, width: int, size: int, cfg: TrainConfig, box_s: float,
           eval_batch: int) -> dict:
    """Train in this process on DATA (MVTec layout), evaluate the best checkpoint; metrics and timings."""
    from ssm.evaluation import evaluate  # scikit-learn, through ssm.metrics: missing, it fails this part only

    split = load_layout(data, "mvtec")
    train_paths, val_paths = split_train_val(split.train, cfg.val_fraction, cfg.seed)
    mcfg = ModelConfig(width=width, img_size=size)
    t0 = time.monotonic()
    epochs_run = []

    def on_epoch(row: dict) -> None:
        epochs_run.append(row)
        print(f"  epoch {row['epoch']}/{cfg.epochs}: loss {row['loss']:.4f}, val {row['val_loss']:.4f}, "
              f"{row['images_per_s']:.0f} img/s, {time.monotonic() - t0:.0f} s", flush=True)
        if time.monotonic() - t0 > box_s and row["epoch"] < cfg.epochs:
            raise TimeUp

    val = ImageDataset(val_paths, size)
    complete = True
    try:
        fit(ImageDataset(train_paths, size), val, out, mcfg, cfg, device=device, progress=False,
            on_epoch=on_epoch, trained_on=split.source)
        ckpt = load_checkpoint(out / "best", map_location=device)
    except TimeUp:  # the best checkpoint so far, calibrated as fit would have calibrated it
        complete = False
        ckpt = load_checkpoint(out / "best", map_location=device)
        cal = calibrate(ckpt.scorer(device), image_batches(val, cfg.batch_size), min_images=cfg.min_calibration_images)
        save_checkpoint(out / "best", ckpt.build_model(device), mcfg, ckpt.scoring, cal, ckpt.meta)
        ckpt = replace(ckpt, calibration=cal)
    train_s = time.monotonic() - t0
    t1 = time.monotonic()
    metrics = evaluate(ckpt, split, batch_size=eval_batch, device=device, progress=False)
    return {
        **{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "precision",
                                   "pixel_resolution", "n_test")},
        "train_s": train_s, "eval_s": time.monotonic() - t1, "complete": complete,
        "epochs_run": len(epochs_run), "epochs": cfg.epochs, "best_epoch": int(ckpt.meta.get("epoch", 0)),
        "n_train": len(train_paths), "n_val": len(val_paths),
        "train_images_per_s": float(np.median([r["images_per_s"] for r in epochs_run[1:] or epochs_run])),
    }


def train_rate(model, opt, x: torch.Tensor, cfg: TrainConfig, steps: int, device: torch.device) -> float:
    """images/s of full training steps (forward, loss, backward, Adam) on x, after one warm-up step."""
    def step():
        loss, _ = training_step(model, x, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    with Timer(device) as t:
        for _ in range(steps):
            step()
    return len(x) * steps / t.seconds


def train_throughput(device: torch.device, width: int, size: int, cfg: TrainConfig, first: int, largest: int,
                     steps: int, deadline: float) -> dict:
    """Training images/s at batch `first`, then doubling up to `largest` until out of memory (or another error
    after the first batch) or the deadline; "stopped" says which."""
    torch.manual_seed(cfg.seed)
    model = SSMUNet(ModelConfig(width=width, img_size=size)).to(device).to(memory_format=torch.channels_last)
    opt, _ = make_optimizer(model, cfg)
    base = smooth_images(first, size, 3, seed=0).to(device)  # larger batches repeat it, built on the device
    rows, stopped, batch = [], "largest batch tried", first
    while batch <= largest:
        if time.monotonic() > deadline:
            stopped = "time box"
            break
        x = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            x = base.repeat(batch // first, 1, 1, 1)
            rows.append({"batch_size": batch, "images_per_s": train_rate(model, opt, x, cfg, steps, device),
                         "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0})
            print(f"  train batch {batch}: {rows[-1]['images_per_s']:.1f} img/s", flush=True)
        except torch.cuda.OutOfMemoryError:
            stopped = f"out of memory at batch {batch}"
            break
        except RuntimeError as e:  # past memory, huge batches can hit kernels' size limits (32-bit indexing)
            if not rows:
                raise
            stopped = f"batch {batch}: {type(e).__name__}: {str(e)[:200]}"
            break
        finally:
            del x
            opt.zero_grad(set_to_none=True)
        _free(device)  # not after a failure: a faulted CUDA context would raise here and lose the rows measured
        batch *= 2
    best = max(rows, key=lambda r: r["batch_size"]) if rows else None
    return {
        "rows": rows, "stopped": stopped, "first_batch": first,
        "first_batch_images_per_s": rows[0]["images_per_s"] if rows and rows[0]["batch_size"] == first else None,
        "largest_batch": best["batch_size"] if best else None,
        "largest_batch_images_per_s": best["images_per_s"] if best else None,
    }


def tiny_mvtec(root: Path, n_train: int = 6, size: int = 48) -> str:
    """A small MVTec-layout folder of generated PNGs: train/good, test/good, test/crack with masks."""
    from PIL import Image

    images = (smooth_images(n_train + 4, size, 3, seed=7) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for folder in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (root / folder).mkdir(parents=True)
    for i in range(n_train):
        Image.fromarray(images[i]).save(root / "train/good" / f"{i:03d}.png")
    for i in range(2):
        Image.fromarray(images[n_train + i]).save(root / "test/good" / f"{i:03d}.png")
        cracked = images[n_train + 2 + i].copy()
        mask = np.zeros((size, size), np.uint8)
        mask[8 + 4 * i : 20 + 4 * i, 10:30] = 255
        cracked[mask > 0] = 0
        Image.fromarray(cracked).save(root / "test/crack" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "ground_truth/crack" / f"{i:03d}_mask.png")
    return str(root)


def part(results: dict, name: str, fn) -> None:
    """Run one part; its dict, or {"error": ...} with the traceback printed, goes into results[name]."""
    t0 = time.monotonic()
    print(f"--- {name}", flush=True)
    try:
        results[name] = fn()
    except Exception as e:  # one part's failure must not cost the others
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {e}"}
    results[name]["part_s"] = time.monotonic() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".gpu" / "mvtec_bottle"),
                   help="MVTec AD bottle folder (default: .gpu/mvtec_bottle, staged by benchmarks/stage_gpu.sh)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", help="run folder for the recipe's checkpoints (default: a temporary folder)")
    p.add_argument("--epochs", type=int, help="training epochs of the recipe (default 50; 1 with --dry-run)")
    p.add_argument("--recipe-box-s", type=float, default=180,
                   help="time box of part 1 (training stops after the epoch that passes it; evaluation follows)")
    p.add_argument("--scorer-box-s", type=float, default=70, help="no new scorer batch size is started after it")
    p.add_argument("--train-box-s", type=float, default=50, help="no larger training batch is tried after it")
    p.add_argument("--compile", action="store_true", help="torch.compile the scorer (off: not yet measured)")
    p.add_argument("--cuda-graphs", action="store_true", help="CUDA graphs on the scorer (off: not yet measured)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, W=4, 32 px, 1 epoch, batches 2..4, generated images unless --data is given")
    args = p.parse_args(argv)
    start = time.monotonic()
    dry = args.dry_run
    device = torch.device("cpu" if dry else args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --dry-run to check the suite on the CPU")
        torch.backends.cudnn.benchmark = True
    width, size = (4, 32) if dry else (64, 128)
    cfg = TrainConfig(epochs=args.epochs or (1 if dry else 50), batch_size=2 if dry else 32)
    if dry:  # a handful of images: hold out half for validation and calibrate on them
        cfg = replace(cfg, val_fraction=0.5, min_calibration_images=2)
        torch.set_num_threads(1)  # tiny tensors: more threads only wait on each other on a busy machine
    results: dict = {
        "suite": "gpu", "dry_run": dry, "device": str(device), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "compile": args.compile, "cuda_graphs": args.cuda_graphs, "width": width, "size": size,
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = args.data
            if dry and "--data" not in (argv if argv is not None else sys.argv[1:]):
                data = tiny_mvtec(Path(tmp) / "data")
            out = Path(args.out) if args.out else Path(tmp) / "recipe"
            part(results, "recipe", lambda: recipe(data, out, device, width, size, cfg, args.recipe_box_s,
                                                   eval_batch=4 if dry else 32))
            _free(device)
            part(results, "scorer", lambda: scorer_throughput(
                device, width, size, (2, 4) if dry else (32, 64, 128, 256, 512), min_images=4 if dry else 1024,
                compile=args.compile, cuda_graphs=args.cuda_graphs, naive_images=1 if dry else 4,
                matmul_n=128 if dry else 8192, deadline=time.monotonic() + args.scorer_box_s))
            _free(device)
            part(results, "train_throughput", lambda: train_throughput(
                device, width, size, cfg, first=cfg.batch_size, largest=4 if dry else 1 << 16,
                steps=1 if dry else 5, deadline=time.monotonic() + args.train_box_s))
    except Exception as e:  # outside any part (the generated data, the folder's cleanup): recorded, exit status 1
        traceback.print_exc()
        results["error"] = f"{type(e).__name__}: {e}"
    finally:  # the JSON line comes last whatever happened; a value JSON cannot hold is written as its str
        results["total_s"] = time.monotonic() - start
        sys.stderr.flush()
        print(json.dumps(results, default=str), flush=True)
    return results


if __name__ == "__main__":
    sys.exit(1 if "error" in main() else 0)
