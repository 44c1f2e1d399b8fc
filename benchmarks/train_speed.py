"""Training throughput of the Ray Train job (1 worker) against the single-process `ssm.training.fit`.

Both train the same model on the same images with the same TrainConfig, one after the other in this
process, and both report images/s per epoch measured over the training loop alone (no start-up, decoding,
validation or checkpointing). The rate compared is the median over the steady-state epochs (all but the
first). The Ray worker gets all of this machine's CPUs, as `fit` does.

    python benchmarks/train_speed.py                      # bottle, W=16, 128 px, 4 epochs
    python benchmarks/train_speed.py --images 64 --epochs 3  # a quicker look on a busy machine

The last line printed is one JSON object: {"ray_images_per_s", "local_images_per_s", "ratio"}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssm.data import ImageDataset, load_layout  # noqa: E402
from ssm.model import ModelConfig  # noqa: E402
from ssm.training import TrainConfig, fit, split_train_val  # noqa: E402


def steady(history: list[dict]) -> float:
    return statistics.median(h["images_per_s"] for h in history[1:])


def subset(paths: list[str], root: Path) -> str:
    for folder in ("train/good", "test/good"):
        (root / folder).mkdir(parents=True)
    for i, path in enumerate(paths):
        (root / "train/good" / f"{i:04d}{Path(path).suffix}").symlink_to(os.path.abspath(path))
    (root / "test/good" / Path(paths[0]).name).symlink_to(os.path.abspath(paths[0]))
    return str(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mvtec_bottle"))
    parser.add_argument("--layout", default="mvtec")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=None, help="use only the first N normal training images")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is warm-up and not counted")

    import ray

    from jobs.train import train

    model = ModelConfig(width=args.width, img_size=args.img_size)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size)
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        data, layout = args.data, args.layout
        if args.images:  # the same subset for both: a small MVTec-layout folder of links
            data, layout = subset(load_layout(data, layout).train[: args.images], Path(tmp) / "data"), "mvtec"
        paths = load_layout(data, layout).train
        train_paths, val_paths = split_train_val(paths, cfg.val_fraction, cfg.seed)
        print(f"{len(train_paths)} training images from {data}; W={args.width}, {args.img_size} px, "
              f"batch {args.batch_size}, {args.epochs} epochs, {cpus} CPUs", flush=True)

        local = fit(ImageDataset(train_paths, args.img_size), ImageDataset(val_paths, args.img_size),
                    Path(tmp) / "local", model, cfg, progress=False,
                    on_epoch=lambda r: print(f"  local epoch {r['epoch']}: {r['images_per_s']:.1f} img/s", flush=True))

        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            distributed = train(data, str(Path(tmp) / "ray"), layout=layout, model_config=model, cfg=cfg,
                                workers=1, cpus_per_worker=cpus,
                                on_epoch=lambda r: print(f"  ray epoch {r['epoch']}: {r['images_per_s']:.1f} img/s",
                                                         flush=True))
        finally:
            ray.shutdown()

    ray_rate, local_rate = steady(distributed.history), steady(local.history)
    print(f"steady-state training throughput: Ray Train (1 worker) {ray_rate:.1f} img/s, "
          f"ssm.training.fit {local_rate:.1f} img/s, ratio {ray_rate / local_rate:.2f}")
    print(json.dumps({"ray_images_per_s": round(ray_rate, 2), "local_images_per_s": round(local_rate, 2),
                      "ratio": round(ray_rate / local_rate, 3)}))


if __name__ == "__main__":
    main()
