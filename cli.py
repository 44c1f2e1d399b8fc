"""ssm: find and localise defects in images with Self-Supervised Masking, from a laptop to a Ray cluster."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)


class Layout(str, Enum):
    mvtec = "mvtec"
    oct2017 = "oct2017"
    folder = "folder"


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _k_values(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        _fail(f"--k-values must be a comma-separated list of positive cell sizes such as 2,4,8, got {text!r}")
    return values


def _split(data: str, layout: Layout, normal_dir: list[str], abnormal_dir: list[str], mask_dir: Optional[str]):
    from ssm.data import load_layout

    return load_layout(data, layout.value, normal_dirs=normal_dir, abnormal_dirs=abnormal_dir, mask_dir=mask_dir)


# Options shared by the commands that read a dataset layout.
LayoutOpt = typer.Option(Layout.mvtec, "--layout", help="Dataset layout: mvtec, oct2017 or folder.")
NormalDirOpt = typer.Option([], "--normal-dir", help="folder layout: a folder of normal images (repeatable).")
AbnormalDirOpt = typer.Option([], "--abnormal-dir", help="folder layout: a folder of anomalous images (repeatable).")
MaskDirOpt = typer.Option(
    None,
    "--mask-dir",
    help="folder layout: where masks are; the mask of <stem>.<ext> is <stem>.png or <stem>_mask.png "
    "(default: beside each image, where a .png beside a .jpg of the same stem is its mask).",
)


@app.command()
def train(
    data: str = typer.Argument(..., help="Dataset root (local folder or s3:// prefix)."),
    out: str = typer.Option("runs/ssm", "--out", help="Run directory: checkpoints, history, best checkpoint."),
    layout: Layout = LayoutOpt,
    normal_dir: list[str] = NormalDirOpt,
    abnormal_dir: list[str] = AbnormalDirOpt,
    mask_dir: Optional[str] = MaskDirOpt,
    epochs: int = typer.Option(50, help="Training epochs (paper: 50)."),
    batch_size: int = typer.Option(32, help="Images per batch (paper: 32)."),
    img_size: int = typer.Option(128, help="Square image size (paper: 128)."),
    width: int = typer.Option(64, help="UNet width W (paper: 64, about 33 M parameters)."),
    grayscale: bool = typer.Option(False, help="Build a 1-channel model for grayscale data."),
    upsample: str = typer.Option("nearest", help="Decoder upsampling: nearest or transpose."),
    lr: float = typer.Option(1e-4, help="Adam learning rate (paper: 1e-4)."),
    alpha: float = typer.Option(1.0, help="MSGMS loss weight."),
    beta: float = typer.Option(1.0, help="SSIM loss weight."),
    gamma: float = typer.Option(1.0, help="MSE loss weight."),
    k_values: str = typer.Option("2,4,8", help="Mask cell sizes at 128 px, comma-separated."),
    refine_passes: int = typer.Option(2, help="Scoring passes (1 = no refinement)."),
    ratio: float = typer.Option(0.8, help="Refinement: a cell is normal when more than this fraction is below tau."),
    seed: int = typer.Option(0, help="Seed for the validation split, masks and initialisation."),
):
    """Train an SSM model on the normal images of DATA, then calibrate it on a held-out normal split."""
    from ssm.data import DataError, ImageDataset
    from ssm.model import ModelConfig
    from ssm.scoring import ScoringConfig
    from ssm.training import TrainConfig, fit, split_train_val

    ks = _k_values(k_values)
    try:
        model_cfg = ModelConfig(width=width, channels=1 if grayscale else 3, upsample=upsample, img_size=img_size)
        split = _split(data, layout, normal_dir, abnormal_dir, mask_dir)
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, alpha=alpha, beta=beta, gamma=gamma,
                          k_values=ks, seed=seed)
        train_paths, val_paths = split_train_val(split.train, cfg.val_fraction, seed)
        scoring = ScoringConfig(k_values=ks, refine_passes=refine_passes, ratio=ratio, seed=seed)
        result = fit(ImageDataset(train_paths, img_size, model_cfg.channels),
                     ImageDataset(val_paths, img_size, model_cfg.channels), out, model_cfg, cfg, scoring)
    except (DataError, ValueError) as e:
        _fail(str(e))
    typer.echo(
        f"trained {epochs} epochs on {len(train_paths)} images ({len(val_paths)} held out); best epoch "
        f"{result.best_epoch} (validation loss {result.best_val_loss:.4f})\ncheckpoint: {result.best}"
    )


@app.command()
def evaluate(
    data: str = typer.Argument(..., help="Dataset root with a test split."),
    checkpoint: str = typer.Option(..., "--checkpoint", help="A checkpoint directory or a training run directory."),
    layout: Layout = LayoutOpt,
    normal_dir: list[str] = NormalDirOpt,
    abnormal_dir: list[str] = AbnormalDirOpt,
    mask_dir: Optional[str] = MaskDirOpt,
    batch_size: int = typer.Option(32, help="Images per scoring batch."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
):
    """Score the test split of DATA and print image AUROC, F1-max, pixel AUROC and AUPRO."""
    import torch

    from ssm.checkpoint import CheckpointError, load_checkpoint
    from ssm.data import DataError
    from ssm.evaluation import evaluate as run_evaluation

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        ckpt = load_checkpoint(checkpoint, map_location=dev)
        split = _split(data, layout, normal_dir, abnormal_dir, mask_dir)
        result = run_evaluation(ckpt, split, batch_size=batch_size, device=dev, progress=not as_json)
    except (DataError, CheckpointError, ValueError) as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(result))
        return
    for key in ("image_auroc", "f1_max", "pixel_auroc", "aupro"):
        value = result[key]
        typer.echo(f"{key:12s} {'n/a' if value is None else f'{value:.4f}'}")
    typer.echo(f"test images {result['n_test']} ({result['n_anomalous']} anomalous); checkpoint {ckpt.path}")


if __name__ == "__main__":
    app()
