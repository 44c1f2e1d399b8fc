"""Online serving speed: `ssm serve` under concurrent clients against the same work done in-process.

The served path is the whole application (jobs/serve.py) on a local Ray: CLIENTS threads POST bottle test
images over HTTP on loopback as fast as answers come back; the replica decodes each body, gathers requests
into batches of up to --batch-size, scores them and answers JSON with a base64 heatmap PNG.
The baseline does the same work in this process with the same code and no HTTP, queue or JSON: decode_bytes
on every image, then the scoring job's ScoreBatches (the library Scorer, heatmap PNGs) on batches of
--batch-size, with as many torch threads as the replica has. Rounds alternate the two paths so load from
other processes hits both.

    python benchmarks/serve_speed.py                                  # W = 16, 64 px, untrained, calibrated
    python benchmarks/serve_speed.py --checkpoint RUN/best --images 256 --rounds 3

The last line printed is one JSON object: served_images_per_s (at --clients concurrent clients),
inprocess_images_per_s, ratio (served / in-process, from each path's best round), p50_ms and p99_ms (request
latency over the served rounds), the mean batch the replica scored and the in-process rate at that batch
size (one round), CPU milliseconds per image of the replica and of the in-process path with
their ratio (cpu_ratio: in-process / replica), and the settings. On a machine shared with other work the
wall-clock ratio says more about the share of the CPUs each path got than about the server (the served
path runs more threads: proxy, replica, clients); cpu_ratio is the steadier figure there.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.score import ScoreBatches, decode_bytes  # noqa: E402
from jobs.serve import start, stop  # noqa: E402
from ssm.calibration import calibrate  # noqa: E402
from ssm.checkpoint import save_checkpoint  # noqa: E402
from ssm.data import load_images  # noqa: E402
from ssm.model import ModelConfig, SSMUNet  # noqa: E402
from ssm.scoring import Scorer, ScoringConfig  # noqa: E402

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_bottle"


def make_checkpoint(folder: str, width: int, img_size: int, data: Path) -> str:
    """An untrained model calibrated on 8 normal images: the cost of scoring does not depend on training."""
    torch.manual_seed(0)
    cfg = ModelConfig(width=width, img_size=img_size)
    model = SSMUNet(cfg).eval()
    normals = load_images(sorted((data / "train" / "good").glob("*.png"))[:8], img_size)
    cal = calibrate(Scorer(model, ScoringConfig()), [normals], min_images=2)
    return str(save_checkpoint(Path(folder) / "best", model, cfg, ScoringConfig(), cal))


def inprocess_round(scorer: ScoreBatches, model_config, images: list[bytes], batch_size: int) -> float:
    """Seconds to decode and score every image in batches, as a replica does, without the server."""
    t = time.perf_counter()
    for start_at in range(0, len(images), batch_size):
        chunk = images[start_at : start_at + batch_size]
        decoded = [decode_bytes(data, model_config, "image") for data in chunk]
        pixels = np.empty(len(chunk), dtype=object)
        pixels[:] = [d[0] for d in decoded]
        table = scorer({
            "path": np.array(["image"] * len(chunk)), "member": np.array([""] * len(chunk)), "pixels": pixels,
            "width": np.array([d[1] for d in decoded], np.int32), "height": np.array([d[2] for d in decoded], np.int32),
            "frames": np.array([d[3] for d in decoded], np.int32), "error": np.array([""] * len(chunk)),
        })
        assert table["error"].null_count == len(chunk)
    return time.perf_counter() - t


def served_round(url: str, images: list[bytes], clients: int) -> tuple[float, list[float]]:
    """Seconds for `clients` threads to get every image scored over HTTP, and each request's latency."""
    lock, next_index, latencies, failures = threading.Lock(), [0], [], []

    def client():
        session = requests.Session()
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(images):
                return
            t = time.perf_counter()
            r = session.post(url, data=images[i], timeout=600)
            elapsed = time.perf_counter() - t
            with lock:
                latencies.append(elapsed)
                if r.status_code != 200:
                    failures.append(r.text)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    seconds = time.perf_counter() - t
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return seconds, latencies


def replica(url: str) -> dict:
    """The serving replica's counts (one replica: the benchmark starts one)."""
    return requests.get(url, timeout=60).json()["replica"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="serve this checkpoint (default: an untrained, calibrated one)")
    ap.add_argument("--width", type=int, default=16, help="UNet width of the default checkpoint")
    ap.add_argument("--img-size", type=int, default=64, help="image size of the default checkpoint")
    ap.add_argument("--data", type=Path, default=BOTTLE, help="an MVTec AD category: its test images are sent")
    ap.add_argument("--images", type=int, default=64, help="images scored per round (cycling the test set)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of each path, alternating")
    args = ap.parse_args()

    files = sorted((args.data / "test").glob("*/*.png"))
    images = [files[i % len(files)].read_bytes() for i in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or make_checkpoint(tmp, args.width, args.img_size, args.data)
        served = start(checkpoint, port=free_port(), batch_size=args.batch_size, batch_wait_ms=args.batch_wait_ms)
        try:
            threads = max(1, int(served.info["cpus_per_replica"]))  # what the replica's torch runs on
            scorer = ScoreBatches(os.path.abspath(checkpoint) if "://" not in checkpoint else checkpoint,
                                  served.info["checkpoint"], served.info["threshold"], threads, use_gpu=False)
            model_config = scorer.scorer.model.config
            # Warm both paths: the first batches pay for allocations and oneDNN's kernel choices.
            served_round(served.url, images[: args.batch_size], args.clients)
            inprocess_round(scorer, model_config, images[: args.batch_size], args.batch_size)
            warm_batches = replica(served.url)["batches"]
            inproc, served_s, latencies, inproc_cpu, served_cpu = [], [], [], 0.0, 0.0
            for r in range(args.rounds):
                cpu = time.process_time()
                inproc.append(inprocess_round(scorer, model_config, images, args.batch_size))
                inproc_cpu += time.process_time() - cpu
                cpu = replica(served.url)["cpu_seconds"]
                seconds, lat = served_round(served.url, images, args.clients)
                served_cpu += replica(served.url)["cpu_seconds"] - cpu
                served_s.append(seconds)
                latencies += lat
                print(f"round {r + 1}: in-process {len(images) / inproc[-1]:.2f} images/s, served "
                      f"{len(images) / seconds:.2f} images/s", flush=True)
            counts = replica(served.url)
            batches, mean_batch = counts["batch_sizes"], args.rounds * len(images) / (counts["batches"] - warm_batches)
            # The replica fills its batches only as far as requests arrive: the same work in-process at the batch
            # it actually scored separates the server's overhead from the cost of the batch size itself.
            at_mean = max(1, round(mean_batch))
            inproc_at_mean = len(images) / inprocess_round(scorer, model_config, images, at_mean)
        finally:
            stop(served)
    best_inproc, best_served = len(images) / min(inproc), len(images) / min(served_s)
    ms = np.array(latencies) * 1000
    print(f"served batch sizes (size: batches, warm-up included): {batches}")
    print(json.dumps({
        "served_images_per_s": round(best_served, 3),
        "inprocess_images_per_s": round(best_inproc, 3),
        "ratio": round(best_served / best_inproc, 3),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "ratio_all_rounds": round(sum(inproc) / sum(served_s), 3),
        "served_mean_batch": round(mean_batch, 2),  # images per batch the replica actually scored
        "inprocess_at_served_batch_images_per_s": round(inproc_at_mean, 3),  # in-process, batches of that mean
        # CPU seconds per image: the replica's process against this one's in-process rounds (load moves these
        # far less than wall-clock rates; the HTTP proxy and the clients are not counted)
        "replica_cpu_ms_per_image": round(served_cpu / (args.rounds * len(images)) * 1000, 1),
        "inprocess_cpu_ms_per_image": round(inproc_cpu / (args.rounds * len(images)) * 1000, 1),
        "cpu_ratio": round(inproc_cpu / served_cpu, 3) if served_cpu > 0 else None,
        "clients": args.clients, "batch_size": args.batch_size, "batch_wait_ms": args.batch_wait_ms,
        "images_per_round": len(images), "rounds": args.rounds, "torch_threads": threads,
        "checkpoint": served.info["checkpoint"], "cpu_count": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
