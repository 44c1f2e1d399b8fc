"""Throughput and memory of the bulk scoring job (jobs/score.py) against the in-process scorer.

On generated images at one size, with one untrained calibrated model (width W) and one batch size:
- inprocess_images_per_s: `Scorer.score` on pre-decoded batches in this process (the ceiling: no decoding,
  no PNG encoding, no writing), on the first --inprocess images, measured right before and right after
  the jobs; the mean of the two stands for the machine's speed while the jobs ran (both are printed).
- pipeline_images_per_s: the whole Ray job on the same images with one scoring actor, from the first
  block to the last file written (Ray's own start-up excluded, the actor's start-up included).
- peak_rss_mb_500 / peak_rss_mb_5000: the largest sum of RSS over this process and every process under
  it (Ray's GCS, raylet, object store, workers and actors) while the job scores 500 and 5,000 images.
  Shared object-store pages count once per process that maps them, so the sum overstates real use a
  little; both runs are counted the same way. Streaming execution should keep the two close. What can
  differ is the number of Ray worker processes a run happens to use (each holds its own torch), so the
  processes at the peak are printed, and the PSS sum (shared pages divided) is reported too.

Both sides run torch with the same number of threads (--threads): on a shared machine a second thread
can cost more than it brings, and the comparison is about the pipeline, not the thread count.
Wall-clock rates swing with whatever else the machine runs, so the comparison is also made per
CPU-second: cpu_ratio sets the in-process scorer's CPU time against that of every process of the job
(driver, Ray daemons, decode and write tasks, the actor); actor_cpu_ratio against the scoring actor's
alone (its start-up included), the part on the critical path when the machine has cores to spare.

    python benchmarks/score_pipeline.py                  # 64 px, W = 8, batch 32, 500 and 5,000 images
    python benchmarks/score_pipeline.py --size 128 --large 2000 --inprocess 200

The last line printed is one JSON object: the five numbers above, ratio, the CPU-time ratios, settings.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

try:
    import psutil
except ImportError:  # Ray ships its own copy and puts it on the path when imported
    import ray  # noqa: F401
    import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.cluster import start_or_join  # noqa: E402
from jobs.score import score  # noqa: E402
from ssm.calibration import calibrate  # noqa: E402
from ssm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from ssm.data import decode_image  # noqa: E402
from ssm.model import ModelConfig, SSMUNet  # noqa: E402
from ssm.scoring import Scorer, ScoringConfig  # noqa: E402


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> list[str]:
    """n smooth random textures as PNG files, a few with a bright defect."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        f = rng.uniform(2, 8, 2)
        img = 0.5 + 0.3 * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy))[..., None] * rng.uniform(0.4, 1, 3)
        if i % 10 == 0:
            cy, cx = rng.uniform(0.2, 0.8, 2)
            img = img + 0.4 * (((yy - cy) ** 2 + (xx - cx) ** 2) < 0.005)[..., None]
        img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
        path = folder / f"{i:05d}.png"
        Image.fromarray((img * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def make_checkpoint(path: Path, paths: list[str], size: int, width: int) -> str:
    torch.manual_seed(0)
    cfg = ModelConfig(width=width, img_size=size)
    model = SSMUNet(cfg).eval()
    normals = torch.stack([torch.from_numpy(decode_image(p, 3, size)[0]) for p in paths[:32]])
    scoring = ScoringConfig()
    cal = calibrate(Scorer(model, scoring), list(normals.split(16)))
    return str(save_checkpoint(path, model, cfg, scoring, cal))


def inprocess_rates(checkpoint: str, paths: list[str], batch_size: int, threads: int) -> tuple[float, float]:
    """Images per second and per CPU-second of `Scorer.score` in this process."""
    torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    scorer = ckpt.scorer("cpu")
    size = ckpt.model_config.img_size
    x = torch.stack([torch.from_numpy(decode_image(p, 3, size)[0]) for p in paths])
    # A full pass first: each new refinement sub-batch shape costs oneDNN a one-off set-up, which a long
    # job amortises; timing the second pass compares against the scorer at its steady speed.
    for batch in x.split(batch_size):
        scorer.score(batch)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for batch in x.split(batch_size):
        scorer.score(batch)
    return len(x) / (time.perf_counter() - t0), len(x) / (time.process_time() - cpu0)


def _name(p: psutil.Process) -> str:
    return (" ".join(p.cmdline()) or p.name())[:48].strip()


def tree_cpu_seconds() -> dict[tuple[int, float], tuple[str, float]]:
    """(name, CPU seconds: user + system) of this process and its descendants, by (pid, start time)."""
    me = psutil.Process()
    seen = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            seen[(p.pid, p.create_time())] = (_name(p), t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return seen


class PeakRSS:
    """Samples this process and all its descendants in a background thread: the peak of their summed RSS,
    and the peak of their summed PSS (shared pages divided among the processes that map them)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self.peak_pss, self._stop = interval, 0, 0, threading.Event()
        self.at_peak: list[tuple[str, int]] = []  # (process, RSS) at the peak, to see where memory goes
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, with_pss: bool) -> None:
        me = psutil.Process()
        seen, pss = [], 0
        for p in [me, *me.children(recursive=True)]:
            try:
                seen.append((_name(p), p.memory_info().rss))
                pss += p.memory_full_info().pss if with_pss else 0
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        total = sum(rss for _, rss in seen)
        self.peak_pss = max(self.peak_pss, pss)
        if total > self.peak:
            self.peak, self.at_peak = total, sorted(seen, key=lambda s: -s[1])

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            self._sample(with_pss=n % 10 == 0)  # PSS reads every mapping of every process: sample it rarely
            n += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(with_pss=True)

    def breakdown(self) -> str:
        return "; ".join(f"{name} {rss / 2**20:.0f}" for name, rss in self.at_peak)


def run_job(
    checkpoint: str, paths: list[str], work: Path, batch_size: int, threads: int
) -> tuple[float, float, float, PeakRSS, float]:
    """Images/s, images per CPU-second of the job and of its scoring actor, the memory peaks and seconds of
    one job on `paths`, in a Ray of its own."""
    import ray

    manifest = work / f"images_{len(paths)}.txt"
    manifest.write_text("\n".join(paths) + "\n")
    with PeakRSS() as rss:
        start_or_join(num_cpus=(os.cpu_count() or 1) + 1, object_store_mb=512)
        try:
            cpu_before = tree_cpu_seconds()
            summary = score([str(manifest)], checkpoint, str(work / f"scores_{len(paths)}"), workers=1,
                            cpus_per_worker=threads, batch_size=batch_size, progress=False)
            cpu_after = tree_cpu_seconds()
        finally:
            ray.shutdown()
    assert summary.scored == len(paths) and summary.errors == 0, summary.describe()
    spent = sorted(((t - cpu_before.get(key, ("", 0.0))[1], name) for key, (name, t) in cpu_after.items()),
                   reverse=True)
    cpu = sum(t for t, _ in spent)
    print(f"  processes at peak RSS (MB): {rss.breakdown()}; peak PSS {rss.peak_pss / 2**20:.0f} MB", flush=True)
    print(f"  CPU seconds while scoring ({cpu:.1f} in all): "
          + "; ".join(f"{name} {t:.1f}" for t, name in spent if t >= 0.05), flush=True)
    actor = sum(t for t, name in spent if "ScoreBatches" in name)
    return summary.images_per_s, len(paths) / cpu, len(paths) / actor, rss, summary.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, help="image and model size in pixels")
    parser.add_argument("--width", type=int, default=8, help="UNet width W")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--large", type=int, default=5000)
    parser.add_argument("--inprocess", type=int, default=500, help="images for the in-process measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in-process and in the actor")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ssm-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        paths = make_images(work / "images", args.large, args.size)
        checkpoint = make_checkpoint(work / "ckpt", paths, args.size, args.width)
        print(f"{len(paths)} images of {args.size} px written in {time.perf_counter() - t0:.1f} s", flush=True)

        baseline = paths[: args.inprocess]
        before, before_cpu = inprocess_rates(checkpoint, baseline, args.batch_size, args.threads)
        print(f"in-process scorer: {before:.1f} images/s, {before_cpu:.1f} images/CPU-s "
              f"({torch.get_num_threads()} torch threads)", flush=True)
        _, _, _, rss_small, small = run_job(checkpoint, paths[: args.small], work, args.batch_size, args.threads)
        print(f"job on {args.small} images: peak RSS {rss_small.peak / 2**20:.0f} MB ({small:.1f} s)", flush=True)
        pipeline, pipeline_cpu, actor_cpu, rss_large, large = run_job(
            checkpoint, paths, work, args.batch_size, args.threads)
        print(f"job on {args.large} images: {pipeline:.1f} images/s, {pipeline_cpu:.1f} images/CPU-s, "
              f"peak RSS {rss_large.peak / 2**20:.0f} MB ({large:.1f} s)", flush=True)
        after, after_cpu = inprocess_rates(checkpoint, baseline, args.batch_size, args.threads)
        print(f"in-process scorer again: {after:.1f} images/s, {after_cpu:.1f} images/CPU-s", flush=True)
        inproc, inproc_cpu = (before + after) / 2, (before_cpu + after_cpu) / 2

    result = {
        "pipeline_images_per_s": round(pipeline, 2),
        "inprocess_images_per_s": round(inproc, 2),
        "ratio": round(pipeline / inproc, 3),
        f"peak_rss_mb_{args.small}": round(rss_small.peak / 2**20, 1),
        f"peak_rss_mb_{args.large}": round(rss_large.peak / 2**20, 1),
        "rss_growth": round(rss_large.peak / rss_small.peak - 1, 3),
        f"peak_pss_mb_{args.small}": round(rss_small.peak_pss / 2**20, 1),
        f"peak_pss_mb_{args.large}": round(rss_large.peak_pss / 2**20, 1),
        "inprocess_before_after": [round(before, 2), round(after, 2)],
        "pipeline_images_per_cpu_s": round(pipeline_cpu, 2),
        "inprocess_images_per_cpu_s": round(inproc_cpu, 2),
        "cpu_ratio": round(pipeline_cpu / inproc_cpu, 3),
        "actor_images_per_cpu_s": round(actor_cpu, 2),
        "actor_cpu_ratio": round(actor_cpu / inproc_cpu, 3),
        "settings": {"size": args.size, "width": args.width, "batch_size": args.batch_size, "workers": 1,
                     "threads": args.threads, "cpus": os.cpu_count()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
