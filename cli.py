"""ssm: find and localise defects in images with Self-Supervised Masking, from a laptop to a Ray cluster."""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)


class Layout(str, Enum):
    mvtec = "mvtec"
    oct2017 = "oct2017"
    folder = "folder"


class ExportFormat(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"


class Backend(str, Enum):
    torch = "torch"
    onnxruntime = "onnxruntime"


class PixelResolution(str, Enum):
    ground_truth = "ground-truth"
    model = "model"


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Ray's own logging: its log lines, worker "
                                 "output, Ray Data's progress bars (off by default)."),
):
    """ssm: find and localise defects in images with Self-Supervised Masking, from a laptop to a Ray cluster."""
    from jobs.console import set_verbose

    set_verbose(verbose)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers ('' is the empty list)."""
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        _fail(f"{flag} must be a comma-separated list of positive whole numbers, got {text!r}")
    if any(v < 1 for v in values):
        _fail(f"{flag} must be a comma-separated list of positive whole numbers, got {text!r}")
    return values


def _k_values(text: str) -> tuple[int, ...]:
    values = _int_list(text, "--k-values")
    if not values:
        _fail(f"--k-values must be a comma-separated list of positive cell sizes such as 2,4,8, got {text!r}")
    return values


def _split(data: str, layout: Layout, normal_dir: list[str], abnormal_dir: list[str], mask_dir: Optional[str],
           test_fraction: Optional[float] = None):
    from ssm.data import load_layout

    return load_layout(data, layout.value, normal_dirs=normal_dir, abnormal_dirs=abnormal_dir, mask_dir=mask_dir,
                       test_fraction=test_fraction)


def _check_test_fraction(test_fraction: Optional[float], layout: Layout) -> None:
    if test_fraction is not None and layout is not Layout.folder:
        _fail(f"--test-fraction applies to --layout folder only: the {layout.value} layout has its own test folders")


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
TestFractionOpt = typer.Option(
    None,
    "--test-fraction",
    help="folder layout: the share of the normal images held out for testing, never trained on (default: 0.2 "
    "with --abnormal-dir, one mixed folder set; 0 without, normal folders whose test images are elsewhere).",
)


@app.command()
def train(
    data: str = typer.Argument(..., help="Dataset root (local folder or s3:// prefix)."),
    out: str = typer.Option("runs/ssm", "--out", help="Run directory (local, or s3:// on a multi-node cluster): "
                            "checkpoints, history, the calibrated best checkpoint."),
    layout: Layout = LayoutOpt,
    normal_dir: list[str] = NormalDirOpt,
    abnormal_dir: list[str] = AbnormalDirOpt,
    mask_dir: Optional[str] = MaskDirOpt,
    test_fraction: Optional[float] = TestFractionOpt,
    epochs: int = typer.Option(50, help="Training epochs (paper: 50)."),
    batch_size: int = typer.Option(32, help="Images per optimiser step, across all workers (paper: 32)."),
    img_size: int = typer.Option(128, help="Square image size (paper: 128): every image is resized to it."),
    tile: Optional[int] = typer.Option(
        None, "--tile", help="Keep images at their own resolution and aspect ratio (see --scale): train on random "
        "TILE x TILE crops, score overlapping TILE x TILE tiles stitched into one heatmap. Replaces --img-size."),
    scale: float = typer.Option(1.0, "--scale", help="With --tile: resize every image by this factor first "
                                "(1 = native resolution)."),
    width: int = typer.Option(64, help="UNet width W (paper: 64, about 33 M parameters)."),
    grayscale: bool = typer.Option(False, help="Build a 1-channel model for grayscale data."),
    upsample: str = typer.Option("nearest", help="Decoder upsampling: nearest or transpose."),
    lr: float = typer.Option(1e-4, help="Adam learning rate (paper: 1e-4)."),
    lr_steps: str = typer.Option(
        "15,30,45", "--lr-steps", help="Epochs after which the learning rate is cut by 10x, comma-separated "
        "(paper: 15,30,45); steps at or after --epochs do nothing; '' for none."),
    alpha: float = typer.Option(1.0, help="MSGMS loss weight."),
    beta: float = typer.Option(1.0, help="SSIM loss weight."),
    gamma: float = typer.Option(1.0, help="MSE loss weight."),
    k_values: str = typer.Option("2,4,8", help="Mask cell sizes at 128 px, comma-separated."),
    refine_passes: int = typer.Option(2, help="Scoring passes (1 = no refinement)."),
    ratio: float = typer.Option(0.8, help="Refinement: a cell is normal when more than this fraction is below tau."),
    seed: int = typer.Option(0, help="Seed for the validation split, masks and initialisation."),
    val_fraction: float = typer.Option(
        0.1, "--val-fraction", help="Share of the normal images held out for the validation loss and the "
        "calibration (at least --min-calibration-images of them)."),
    min_calibration_images: Optional[int] = typer.Option(
        None, "--min-calibration-images", help="Refuse to train when fewer held-out normal images are left for "
        "the calibration (default 9: the fewest that give a usable score scale and threshold, see "
        "ssm/calibration.py; lower it only for a rough calibration)."),
    workers: int = typer.Option(1, "--workers", help="Ray Train workers (data-parallel, DDP)."),
    gpus_per_worker: float = typer.Option(0.0, "--gpus-per-worker", help="GPUs per worker (0 = train on CPUs)."),
    cpus_per_worker: Optional[float] = typer.Option(
        None, "--cpus-per-worker", help="CPUs per worker (default: this machine's CPUs shared, or 1 on a cluster)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join (default: start one here)."),
    resume: Optional[str] = typer.Option(
        None, "--resume", help="Continue the stopped run in this run directory (instead of --out) from its latest "
        "checkpoint; pass the run's model flags again."),
    keep: int = typer.Option(3, "--keep", help="Epoch checkpoints kept: the best by validation loss."),
    max_failures: int = typer.Option(3, "--max-failures", help="Worker failures survived (-1: no limit)."),
    in_process: bool = typer.Option(False, "--in-process", help="Train in this process, without Ray."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line last, the run's summary (see README); "
                                 "other text goes to stderr."),
):
    """Train an SSM model on the normal images of DATA, then calibrate it on a held-out normal split."""
    from jobs.console import Progress
    from ssm.calibration import MIN_CALIBRATION_IMAGES
    from ssm.data import DataError
    from ssm.model import ModelConfig
    from ssm.scoring import ScoringConfig
    from ssm.training import TrainConfig

    ks = _k_values(k_values)
    _check_test_fraction(test_fraction, layout)
    if min_calibration_images is None:
        min_calibration_images = MIN_CALIBRATION_IMAGES
    if not 0 < val_fraction < 1:
        _fail(f"--val-fraction must be between 0 and 1 (a share of the normal images), got {val_fraction}")
    if min_calibration_images < 2:
        _fail(f"--min-calibration-images must be at least 2 (one image has no spread), got {min_calibration_images}")
    if min_calibration_images < MIN_CALIBRATION_IMAGES:
        typer.secho(f"warning: --min-calibration-images {min_calibration_images} is below {MIN_CALIBRATION_IMAGES}: the "
                    "score scale and the decision threshold may be far off", fg=typer.colors.YELLOW, err=True)
    if tile is not None and (tile < 16 or tile % 16):
        _fail(f"--tile must be a multiple of 16 pixels (the UNet halves it four times), got {tile}")
    if scale != 1.0 and tile is None:
        _fail("--scale needs --tile: without tiles every image is resized to --img-size x --img-size")
    try:
        model_cfg = ModelConfig(width=width, channels=1 if grayscale else 3, upsample=upsample,
                                img_size=img_size if tile is None else tile, tiled=tile is not None, scale=scale)
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, alpha=alpha, beta=beta, gamma=gamma,
                          k_values=ks, seed=seed, lr_steps=_int_list(lr_steps, "--lr-steps"),
                          val_fraction=val_fraction, min_calibration_images=min_calibration_images)
        scoring = ScoringConfig(k_values=ks, refine_passes=refine_passes, ratio=ratio, seed=seed)
        t0 = time.perf_counter()
        with Progress("train", total=epochs, unit="epochs") as bar:
            on_epoch = lambda row: bar.set(row["epoch"], loss=row["loss"], val=row["val_loss"],  # noqa: E731
                                           img_s=f"{row['images_per_s']:.1f}")
            if in_process:
                result = _train_in_process(data, out, layout, normal_dir, abnormal_dir, mask_dir, test_fraction,
                                           model_cfg, cfg, scoring, on_epoch)
            else:
                from jobs.train import train as train_job

                result = train_job(data, resume or out, layout=layout.value, normal_dirs=normal_dir,
                                   abnormal_dirs=abnormal_dir, mask_dir=mask_dir, test_fraction=test_fraction,
                                   model_config=model_cfg, cfg=cfg,
                                   scoring=scoring, workers=workers, gpus_per_worker=gpus_per_worker,
                                   cpus_per_worker=cpus_per_worker, address=address, keep=keep,
                                   max_failures=max_failures, resume=resume is not None, on_epoch=on_epoch)
    except (DataError, ValueError) as e:
        _fail(str(e))
    resumed_from = getattr(result, "resumed_from", [])
    s3_retries = getattr(result, "s3_retries", 0)  # --in-process returns ssm.training's FitResult: no count kept
    restarts = f"; resumed from epoch {', '.join(map(str, resumed_from))}" if resumed_from else ""
    typer.echo(
        f"trained {epochs} epochs on {result.n_train} images ({result.n_val} normal images held out for validation "
        f"and calibration){'' if in_process else f' with {workers} worker(s)'}"
        f"{restarts}; best epoch {result.best_epoch} (validation loss {result.best_val_loss:.4f})\n"
        f"checkpoint: {result.best}\nimages skipped: {len(result.skipped)}", err=as_json
    )
    for path, why in result.skipped[:10]:
        typer.echo(f"  skipped {why}", err=as_json)
    if s3_retries:
        typer.echo(f"S3 request retries: {s3_retries}", err=as_json)
    _echo_test_split(result.data, as_json)
    if as_json:  # the keys README.md documents
        typer.echo(json.dumps({
            "run_dir": str(result.run_dir), "checkpoint": str(result.best), "epochs": epochs,
            "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
            "threshold": result.calibration.threshold, "n_train": result.n_train, "n_val": result.n_val,
            "images_skipped": len(result.skipped), "s3_retries": s3_retries, "resumed_from": resumed_from,
            "seconds": round(time.perf_counter() - t0, 3)}))


def _echo_test_split(source: Optional[dict], err: bool = False) -> None:
    """Say which normal images a folder-layout run kept for testing (evaluation reads the same rule back)."""
    if source and source["layout"] == "folder":
        held_out = source["n_normal"] - source["n_train"]
        typer.echo(f"normal images held out for testing: {held_out} of {source['n_normal']}" if held_out else
                   f"normal images held out for testing: none (all {source['n_normal']} trained on or validated); "
                   f"evaluate on other folders", err=err)


def _train_in_process(data, out, layout, normal_dir, abnormal_dir, mask_dir, test_fraction, model_cfg, cfg,
                      scoring, on_epoch):
    """The single-process `ssm.training.fit` (no Ray): local data only. Returns its FitResult with the counts
    and source the Ray job's result also carries."""
    from ssm.calibration import check_calibration_size
    from ssm.data import ImageDataset
    from ssm.training import fit, split_train_val

    if "://" in data or "://" in out:
        _fail("--in-process reads and writes local folders only; drop it to use s3:// through the Ray job.")
    split = _split(data, layout, normal_dir, abnormal_dir, mask_dir, test_fraction)
    train_paths, val_paths = split_train_val(split.train, cfg.val_fraction, cfg.seed)
    check_calibration_size(len(val_paths), cfg.min_calibration_images, n_normal=len(split.train),
                           val_fraction=cfg.val_fraction)
    result = fit(ImageDataset.for_model(train_paths, model_cfg, crop="random", seed=cfg.seed),
                 ImageDataset.for_model(val_paths, model_cfg, crop="fixed", seed=cfg.seed), out, model_cfg, cfg,
                 scoring, calibration_data=ImageDataset.for_model(val_paths, model_cfg) if model_cfg.tiled else None,
                 trained_on=split.source, progress=False, on_epoch=on_epoch)
    result.n_train, result.n_val, result.skipped, result.data = len(train_paths), len(val_paths), [], split.source
    return result


@app.command()
def evaluate(
    data: str = typer.Argument(..., help="Dataset root with a test split."),
    checkpoint: str = typer.Option(..., "--checkpoint", help="A checkpoint directory or a training run directory."),
    layout: Layout = LayoutOpt,
    normal_dir: list[str] = NormalDirOpt,
    abnormal_dir: list[str] = AbnormalDirOpt,
    mask_dir: Optional[str] = MaskDirOpt,
    test_fraction: Optional[float] = typer.Option(
        None, "--test-fraction", help="folder layout: test this share of the normal images (1: all), split as "
        "training holds them out, even images the model trained on (default: the part the checkpoint held out "
        "of these folders, or all of folders it never trained on)."),
    batch_size: int = typer.Option(32, help="Images per scoring batch."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    pixel_resolution: PixelResolution = typer.Option(
        PixelResolution.ground_truth, "--pixel-resolution", help="Pixel AUROC and AUPRO on the ground-truth masks "
        "at their own resolution, heatmaps upsampled to them (the MVTec AD protocol), or at the model's scored "
        "resolution, masks resized to the heatmaps (not comparable with published figures)."),
):
    """Score the test split of DATA in float32 (folder layout: never images the checkpoint trained on, unless
    --test-fraction forces them) and print image AUROC, F1-max, pixel AUROC and AUPRO."""
    import torch

    from ssm.checkpoint import CheckpointError, load_checkpoint
    from ssm.data import DataError, evaluation_split
    from ssm.evaluation import evaluate as run_evaluation

    _check_test_fraction(test_fraction, layout)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        ckpt = load_checkpoint(checkpoint, map_location=dev)
        split, tested = evaluation_split(data, layout.value, trained_on=ckpt.meta.get("data"), normal_dirs=normal_dir,
                                         abnormal_dirs=abnormal_dir, mask_dir=mask_dir, test_fraction=test_fraction)
        result = run_evaluation(ckpt, split, batch_size=batch_size, device=dev, progress=not as_json,
                                pixel_resolution=pixel_resolution.value)
    except (DataError, CheckpointError, ValueError) as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps({**result, "tested": tested}))
        return
    for key in ("image_auroc", "f1_max", "pixel_auroc", "aupro"):
        value = result[key]
        typer.echo(f"{key:12s} {'n/a' if value is None else f'{value:.4f}'}")
    typer.echo(f"test images {result['n_test']} ({result['n_anomalous']} anomalous); checkpoint {ckpt.path}")
    typer.echo(tested)
    typer.echo(f"pixel metrics at the {result['pixel_resolution']} resolution; scored in {result['precision']}")


@app.command()
def score(
    inputs: list[str] = typer.Argument(
        ..., help="Images to score: folders (recursive), globs, s3:// prefixes, tar shards (local or s3://), "
        "or .txt/.lst manifests with one path or URI per line."),
    checkpoint: str = typer.Option(..., "--checkpoint", help="A checkpoint or training run directory (local or s3://)."),
    out: str = typer.Option(..., "--out", help="Folder or s3:// prefix for the Parquet output; rerun to resume "
                            "(scores what is missing, retries transient errors). One run per --out at a time."),
    workers: int = typer.Option(1, "--workers", help="Scoring actors, each holding one copy of the model."),
    gpus_per_worker: Optional[float] = typer.Option(
        None, "--gpus-per-worker", help="GPUs per scoring actor (default: 1 when the cluster has GPUs, else 0)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per scoring batch."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join (default: start one here)."),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", help="Decision threshold on the image score, a finite number (default: the "
        "checkpoint's calibrated one)."),
    bf16: bool = typer.Option(
        False, "--bf16", help="Score under bf16 autocast: about 2x faster on GPUs and CPUs with native bf16, "
        "but scores move slightly (float32 by default)."),
    retry_errors: bool = typer.Option(
        False, "--retry-errors", help="Also score again the images whose row has a permanent error (corrupt, not "
        "an image...), e.g. after replacing them; transient errors (unreadable, missing) are always retried."),
    backend: Backend = typer.Option(
        Backend.torch, "--backend", help="What runs the network's forward passes: torch (the checkpoint), or "
        "onnxruntime (then --checkpoint is a local .onnx file from `ssm export`, run on the CPU; masks, "
        "refinement, fusion and tiling stay the same). One --out holds one backend's scores."),
    manifest_stat: bool = typer.Option(
        True, "--manifest-stat/--no-manifest-stat", help="Look at each manifest line on disk while planning (is it "
        "a folder? a symlinked folder?). --no-manifest-stat takes each line as a file unless it ends with / or holds "
        "a glob, and resolves no symlinks: for manifests of millions of lines on slow file systems."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line last, the job's summary (see README); "
                                 "other text goes to stderr."),
):
    """Score every image in INPUTS on Ray and write one Parquet row per image (score, anomaly flag, heatmap)."""
    from jobs.score import score as score_job
    from ssm.checkpoint import CheckpointError
    from ssm.data import DataError

    try:
        summary = score_job(inputs, checkpoint, out, workers=workers, gpus_per_worker=gpus_per_worker,
                            batch_size=batch_size, threshold=threshold, address=address, bf16=bf16,
                            retry_errors=retry_errors, backend=backend.value,
                            manifest_stat=manifest_stat)
    except (DataError, CheckpointError, ValueError) as e:
        _fail(str(e))
    typer.echo(summary.describe(), err=as_json)
    if as_json:
        typer.echo(json.dumps(summary.to_dict()))


@app.command("export")
def export_model(
    checkpoint: str = typer.Argument(..., help="A checkpoint or training run directory (local or s3://)."),
    fmt: ExportFormat = typer.Option(..., "--format", help="onnx (opset 17, for onnxruntime) or torchscript."),
    out: str = typer.Option(..., "--out", help="The file to write (local or s3://): *.onnx, or *.pt / *.ts for "
                            "TorchScript."),
):
    """Write the scoring network (masked images and masks in, reconstructions out; batch axis free, the trained
    image size) with the scoring rules, calibration and checkpoint id in the file's metadata."""
    import tempfile

    from jobs import storage
    from jobs.score import _local_checkpoint
    from ssm.checkpoint import CheckpointError, load_checkpoint
    from ssm.export import ExportError, export_checkpoint

    try:
        ckpt = load_checkpoint(_local_checkpoint(checkpoint))  # s3:// is downloaded (cached) as `ssm score` does
        if not storage.is_remote(out):
            result = export_checkpoint(ckpt, fmt.value, out)
        else:  # written and checked here, then uploaded
            with tempfile.TemporaryDirectory(prefix="ssm-export-") as tmp:
                local = Path(tmp) / out.rstrip("/").rsplit("/", 1)[-1]
                try:
                    result = export_checkpoint(ckpt, fmt.value, local)
                except ExportError as e:  # its message names the file by --out
                    raise ExportError(str(e).replace(str(local), out)) from None
                fs, path = storage.fsspec_for(out)
                try:
                    fs.put_file(str(result.path), path)
                except Exception as e:  # no bucket, no access, storage down: one line naming --out
                    _fail(f"--out {out}: cannot upload the exported file ({type(e).__name__}: {e}).")
                result.path = out
    except (CheckpointError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"exported {result.checkpoint} as {result.format}: {result.path}\n"
               f"reconstruction vs torch on a random batch: max abs difference {result.max_abs_diff:.2g}")
    if ckpt.calibration is None:  # the network alone is still of use elsewhere; ssm's scoring needs the rules
        typer.secho(f"warning: {checkpoint} is not calibrated (no threshold, no heatmap scale): `ssm score "
                    f"--backend onnxruntime` refuses the file; export the best checkpoint of a training run "
                    f"(RUN/best) to score with it.", fg=typer.colors.YELLOW, err=True)


@app.command()
def serve(
    checkpoint: str = typer.Argument(..., help="A checkpoint or training run directory (local or s3://)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="HTTP port."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join (default: start one here)."),
    replicas: int = typer.Option(1, "--replicas", help="Serving replicas, each holding one copy of the model."),
    gpus_per_replica: Optional[float] = typer.Option(
        None, "--gpus-per-replica", help="GPUs per replica (default: 1 when the cluster has GPUs, else 0)."),
    cpus_per_replica: Optional[float] = typer.Option(
        None, "--cpus-per-replica", help="CPUs per replica, also its torch threads (default: 1 with GPUs, else the "
        "cluster's CPUs less one, shared among the replicas)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Most requests scored together in one batch."),
    batch_wait_ms: float = typer.Option(
        10.0, "--batch-wait-ms", help="Longest wait for more requests before a batch that is not full is scored."),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", help="Decision threshold on the image score, a finite number (default: the "
        "checkpoint's calibrated one)."),
    max_bytes: int = typer.Option(64 << 20, "--max-bytes", help="Largest request body accepted, in bytes."),
):
    """Serve CHECKPOINT over HTTP on Ray Serve: POST an image, get its score, decision and heatmap as JSON."""
    import signal
    import time

    from jobs.serve import start, stop
    from ssm.checkpoint import CheckpointError

    try:
        served = start(checkpoint, host=host, port=port, address=address, replicas=replicas,
                       gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica, batch_size=batch_size,
                       batch_wait_ms=batch_wait_ms, threshold=threshold, max_bytes=max_bytes)
    except (CheckpointError, ValueError) as e:
        _fail(str(e))
    info = served.info
    typer.echo(
        f"serving {info['checkpoint']} at {served.url} ({info['replicas']} replica(s), {info['cpus_per_replica']:g} "
        f"CPU and {info['gpus_per_replica']:g} GPU each, batches of up to {batch_size}, threshold "
        f"{info['threshold']:.4g})\n"
        f"  score an image: curl --data-binary @image.png {served.url}\n"
        f"  checkpoint and settings: curl {served.url}\n"
        f"press Ctrl-C to stop"
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it as Ctrl-C does, cleaning up
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("stopping")
    finally:
        stop(served)


@app.command()
def report(
    scores: str = typer.Argument(..., help="A scoring output: Parquet folder (local or s3://)."),
    out: str = typer.Option("report.html", "--out", help="Where to write the HTML report."),
    top: int = typer.Option(24, help="How many of the most anomalous images to show."),
):
    """Write one self-contained HTML page: the most anomalous images with heatmaps, score histogram, counts."""
    from jobs.report import write_report

    try:
        counts = write_report(scores, out, top=top)
    except (OSError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"report: {out} ({counts['images']} images, {counts['errors']} errors, {counts['anomalies']} anomalies)")


class JobKind(str, Enum):
    train = "train"
    score = "score"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    kind: JobKind = typer.Argument(..., help="train or score; the remaining arguments are that command's."),
    address: str = typer.Option(..., "--address", help="The cluster's job API, e.g. http://HEAD:8265."),
    wait: bool = typer.Option(False, "--wait", help="Follow the job's logs until it ends."),
    token_file: Optional[Path] = typer.Option(
        None, "--token-file", help="File holding the Ray auth token (default: RAY_AUTH_TOKEN, then ~/.ray/auth_token)."),
    token: Optional[str] = typer.Option(
        None, "--token", help="Deprecated: a token on the command line is visible to every user of this machine in "
        "the process list; use RAY_AUTH_TOKEN or --token-file."),
):
    """Submit `ssm train ...` or `ssm score ...` to a running Ray cluster through the Ray job API.

    Only the project's code ships with the job (ssm/, jobs/, cli.py, pyproject.toml, cluster.yaml, README.md)."""
    from jobs.submit import SubmitError, follow
    from jobs.submit import submit as submit_job

    if token is not None:
        typer.secho("warning: --token is deprecated: the token is visible to every user of this machine in the "
                    "process list; set RAY_AUTH_TOKEN or pass --token-file instead", fg=typer.colors.YELLOW, err=True)
    try:
        job_id = submit_job(kind.value, list(ctx.args), address, token=token, token_file=token_file)
        typer.echo(f"submitted {kind.value} job {job_id} to {address}")
        if wait:
            status = follow(job_id, address, token=token, echo=typer.echo, token_file=token_file)
            typer.echo(f"job {job_id} {status}")
            if status != "SUCCEEDED":
                raise typer.Exit(1)
    except SubmitError as e:
        _fail(str(e))


@app.command()
def demo(
    out: str = typer.Option("demo_out", "--out", help="Folder for the dataset, run, scores, metrics and report."),
    data: Optional[str] = typer.Option(None, "--data", help="Run on this dataset instead of the generated one."),
    layout: Layout = LayoutOpt,
    normal_dir: list[str] = NormalDirOpt,
    abnormal_dir: list[str] = AbnormalDirOpt,
    mask_dir: Optional[str] = MaskDirOpt,
    texture: str = typer.Option("brick", help="Texture of the generated dataset: brick, grass or gravel."),
    epochs: int = typer.Option(30, help="Training epochs."),
    width: int = typer.Option(16, help="UNet width W."),
    img_size: int = typer.Option(48, help="Square image size."),
    workers: int = typer.Option(1, help="Ray Train workers and scoring actors."),
    address: Optional[str] = typer.Option(None, "--address", help="Join this Ray cluster instead of starting one."),
    seed: int = typer.Option(0, help="Seed of the generated data and of training: same seed, same figures."),
):
    """Build a dataset (or take --data), train on Ray, score through Ray Data, evaluate, write an HTML report."""
    from jobs.demo import run_demo
    from ssm.checkpoint import CheckpointError
    from ssm.data import DataError

    try:
        result = run_demo(out, data=data, layout=layout.value, normal_dirs=normal_dir, abnormal_dirs=abnormal_dir,
                          mask_dir=mask_dir, texture=texture, epochs=epochs, width=width, img_size=img_size,
                          workers=workers, address=address, seed=seed, echo=typer.echo)
    except (DataError, CheckpointError, ValueError) as e:
        _fail(str(e))
    m = result["metrics"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    typer.echo(
        f"\nimage AUROC {fmt(m['image_auroc'])}  F1-max {fmt(m['f1_max'])}  pixel AUROC {fmt(m['pixel_auroc'])}  "
        f"AUPRO {fmt(m['aupro'])}  ({m['n_test']} test images, {m['n_anomalous']} anomalous)\n"
        f"data:       {result['data']}\ncheckpoint: {result['checkpoint']}\nscores:     {result['scores']}\n"
        f"report:     {result['report']}\nmetrics:    {Path(out).resolve() / 'metrics.json'}"
    )


if __name__ == "__main__":
    app()
