"""The end-to-end demo: dataset -> Ray Train -> Ray Data scoring -> evaluation -> HTML report.

With no data given it builds a small MVTec-AD-layout set from scikit-image's texture photographs
(jobs/demo_data.py); with `data` it runs the same chain on the user's dataset. Evaluation reads the scoring
job's own Parquet output (scores, and heatmaps decoded from their 8-bit PNGs), so the figures describe
exactly what the job wrote.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
from PIL import Image

from ssm.data import load_layout, load_masks
from ssm.metrics import aupro, f1_max, image_auroc, pixel_auroc
from ssm.model import ModelConfig
from ssm.scoring import ScoringConfig
from ssm.training import TrainConfig


def metrics_from_scores(scores_dir: str, samples: Sequence, img_size: int, has_masks: bool) -> dict:
    """Image and pixel metrics of a scoring job's Parquet output against a test split's labels and masks."""
    table = pads.dataset(scores_dir, format="parquet").to_table(columns=["path", "image_score", "heatmap_png", "error"])
    rows = {os.path.abspath(p): i for i, p in enumerate(table.column("path").to_pylist())}
    missing = [s.path for s in samples if os.path.abspath(s.path) not in rows]
    if missing:
        raise RuntimeError(f"{len(missing)} test images have no row in {scores_dir}, e.g. {missing[0]}")
    idx = [rows[os.path.abspath(s.path)] for s in samples]
    errors = table.column("error").to_pylist()
    failed = [samples[k].path for k, i in enumerate(idx) if errors[i] is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} test images failed to score, e.g. {failed[0]}: {errors[rows[os.path.abspath(failed[0])]]}")
    labels = np.array([s.label for s in samples])
    scores = np.array(table.column("image_score").to_pylist(), dtype=np.float64)[idx]
    result = {"image_auroc": image_auroc(labels, scores), "f1_max": f1_max(labels, scores),
              "pixel_auroc": None, "aupro": None, "n_test": len(samples), "n_anomalous": int(labels.sum())}
    if has_masks:
        pngs = table.column("heatmap_png").to_pylist()
        maps = np.stack([np.asarray(Image.open(io.BytesIO(pngs[i])), dtype=np.float32) for i in idx])
        masks = load_masks(samples, img_size)
        result["pixel_auroc"] = pixel_auroc(masks, maps)
        result["aupro"] = aupro(masks, maps)
    return result


def run_demo(
    out: str,
    data: str | None = None,
    layout: str = "mvtec",
    normal_dirs: Sequence[str] = (),
    abnormal_dirs: Sequence[str] = (),
    mask_dir: str | None = None,
    texture: str = "brick",
    n_train: int = 120,
    epochs: int = 30,
    width: int = 16,
    img_size: int = 48,
    batch_size: int = 8,
    lr: float = 2e-3,
    workers: int = 1,
    address: str | None = None,
    seed: int = 0,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run the whole chain under `out`; returns the metrics and where everything is."""
    from jobs.demo_data import make_demo_dataset
    from jobs.report import write_report
    from jobs.score import score
    from jobs.train import train

    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for own in ("run", "scores"):  # the demo's own outputs from an earlier demo in the same folder
        if (out_dir / own).exists():
            shutil.rmtree(out_dir / own)
    if data is None:
        data = str(out_dir / "data")
        # Reused only when made with the same settings (kept beside it), so a run's figures follow its flags.
        made_with = out_dir / "data.json"
        settings = json.dumps({"size": img_size, "texture": texture, "n_train": n_train, "seed": seed})
        if (Path(data) / "train").is_dir() and made_with.is_file() and made_with.read_text() == settings:
            echo(f"[1/5] dataset: reusing {data}")
        else:
            shutil.rmtree(data, ignore_errors=True)
            info = make_demo_dataset(data, size=img_size, n_train=n_train, texture=texture, seed=seed)
            made_with.write_text(settings)
            echo(f"[1/5] dataset: {sum(info['counts'].values())} {texture} images with synthetic defects in {data}")
        layout = "mvtec"
    else:
        echo(f"[1/5] dataset: {data} ({layout} layout)")
    split = load_layout(data, layout, normal_dirs=normal_dirs, abnormal_dirs=abnormal_dirs, mask_dir=mask_dir)

    echo(f"[2/5] training W={width} at {img_size} px for {epochs} epochs on {len(split.train)} normal images (Ray Train)")
    run = train(
        data, str(out_dir / "run"), layout=layout, normal_dirs=normal_dirs, abnormal_dirs=abnormal_dirs,
        mask_dir=mask_dir, model_config=ModelConfig(width=width, img_size=img_size),
        cfg=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, lr_steps=(15, 25), seed=seed),
        scoring=ScoringConfig(seed=seed),
        workers=workers, address=address,
        on_epoch=lambda row: echo(f"      epoch {row['epoch']:3d}  loss {row['loss']:.4f}  val {row['val_loss']:.4f}"),
    )

    manifest = out_dir / "test_images.txt"
    manifest.write_text("".join(f"{os.path.abspath(s.path)}\n" for s in split.test))
    echo(f"[3/5] scoring {len(split.test)} test images (Ray Data)")
    summary = score([str(manifest)], run.best, str(out_dir / "scores"), workers=workers, address=address, progress=False)

    echo("[4/5] evaluating the scoring job's output")
    metrics = metrics_from_scores(str(out_dir / "scores"), split.test, img_size, split.has_masks)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))

    echo("[5/5] writing the report")
    counts = write_report(str(out_dir / "scores"), str(out_dir / "report.html"))
    return {
        "metrics": metrics,
        "data": data,
        "checkpoint": run.best,
        "scores": str(out_dir / "scores"),
        "report": str(out_dir / "report.html"),
        "scored": summary.scored,
        "anomalies": counts.get("anomalies"),
    }
