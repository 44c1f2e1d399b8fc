"""Distributed SSM training on Ray Train: thin glue around `ssm.training` (method page, section 4).

The data flow, one line per stage:

    image files (local folder or s3:// prefix, any layout `ssm.data.load_layout` reads)
      -> Ray Data CPU tasks: bytes -> `ssm.data.decode_for` -> uint8 (C, S, S), or for a tiled model the whole
         image at its scaled size; unreadable files are flagged and counted, never fatal; a 10 % normal
         validation split is held out (`split_train_val`)
      -> TorchTrainer workers under DDP: each streams its shard (a tiled model: one random S x S crop of each
         image per epoch) and runs `ssm.training.training_step`
      -> every epoch: losses, validation loss and images/s (all workers) reported, a checkpoint saved
      -> at the end: the checkpoint with the lowest validation loss, calibrated on the held-out split in a
         Ray task with one worker's resources (a GPU when training used GPUs), written to RUN/best

The run directory RUN (a local folder or an s3:// prefix):

    RUN/job.json        the settings the run started with; --resume checks the model against them
    RUN/train/          Ray Train's folder: epoch_NNNN/ (model.pt + ssm.json, the library's checkpoint, and
                        train_state.pt: optimizer, scheduler, epoch, history), the best `keep` by validation
                        loss plus the latest, and Ray's checkpoint_manager_snapshot.json
    RUN/best/           the calibrated best checkpoint: `ssm evaluate --checkpoint RUN` and scoring read it
    RUN/history.json    one row per epoch

A worker that dies is replaced (FailureConfig.max_failures) and the group resumes from the latest checkpoint;
`train(..., resume=True)` continues a stopped run the same way. Example:

    >>> result = train("../shared/data/mvtec_bottle", "runs/bottle", model_config=ModelConfig(width=16),
    ...                cfg=TrainConfig(epochs=5), workers=2)
    >>> result.best_epoch, result.best_val_loss, result.best
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from ray.train import UserCallback

from jobs.cluster import start_or_join, submitted_job
from jobs.storage import RetryCount, configure_ray_data, filesystem_for, fsspec_for, is_remote, join
from ssm.calibration import Calibration, CalibrationError, calibrate, check_calibration_size
from ssm.checkpoint import load_checkpoint, save_checkpoint
from ssm.data import DataError, DatasetSplit, decode_for, load_layout
from ssm.model import ModelConfig, SSMUNet
from ssm.scoring import ScoringConfig
from ssm.tiling import random_crop
from ssm.training import (
    TrainConfig,
    make_optimizer,
    seed_of,
    split_train_val,
    train_epochs,
    validation_loss,
)

TRAIN_STATE = "train_state.pt"  # beside the library's model.pt and ssm.json in every epoch checkpoint
RAY_RUN = "train"  # RunConfig(name): Ray Train's folder inside RUN


@dataclass
class TrainJobResult:
    run_dir: str
    best: str  # RUN/best, the calibrated checkpoint
    best_epoch: int
    best_val_loss: float
    calibration: Calibration
    history: list[dict]  # one row per epoch; "resumed_from" > 0 on epochs trained after a restart
    n_train: int  # readable training images
    n_val: int  # readable held-out normal images
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) of images that did not decode
    data: dict | None = None  # what it trained on (ssm.data.DatasetSplit.source), as its checkpoints record it
    s3_retries: int = 0  # S3 requests retried by botocore (s3fs) in the job's processes (jobs.storage.RetryCount)

    @property
    def resumed_from(self) -> list[int]:
        """Epochs the run restarted from (a replaced worker or --resume); empty for an uninterrupted run."""
        return sorted({row["resumed_from"] for row in self.history if row["resumed_from"] > 0})


# --------------------------------------------------------------------------------------------------------
# Ray


def start_ray(address: str | None = None, workers: int = 1, cpus_per_worker: float | None = None,
              gpus_per_worker: float = 0.0) -> float:
    """Join the cluster at `address`, or start a local one sized to this machine (jobs/cluster.py).

    Returns the CPUs each training worker takes: `cpus_per_worker` when given, else this machine's CPUs
    shared among the workers (local cluster) or 1 (a cluster, whose nodes may differ).
    """
    import ray

    if gpus_per_worker < 0 or (cpus_per_worker is not None and cpus_per_worker <= 0):
        raise ValueError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
    joining = bool(address) or submitted_job()
    if not ray.is_initialized() and not joining and gpus_per_worker:
        if torch.cuda.device_count() < workers * gpus_per_worker:
            raise ValueError(f"--workers {workers} --gpus-per-worker {gpus_per_worker} needs "
                             f"{workers * gpus_per_worker:g} GPUs, this machine has {torch.cuda.device_count()}; "
                             f"lower them or pass --address of a cluster with GPUs.")
    start_or_join(address)
    if cpus_per_worker is not None:
        return cpus_per_worker
    if joining:
        return 1.0
    return float(max(1, int(ray.cluster_resources().get("CPU", 1)) // workers))


# --------------------------------------------------------------------------------------------------------
# Data: listing on the driver, decoding in Ray Data CPU tasks


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of arrays that may differ in shape (Ray Data stores it as a variable-shaped tensor)."""
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column


def _decode(batch: dict[str, np.ndarray], model_config: ModelConfig, scheme: str) -> dict[str, np.ndarray]:
    """Ray Data stage: image bytes -> uint8 (C, S, S), or (C, H, W) at the image's scaled size for a tiled
    model. A file that does not decode is flagged."""
    images, errors = [], []
    names = [scheme + str(p) for p in batch["path"]]  # "bucket/key" -> "s3://bucket/key" in messages
    for data, name in zip(batch["bytes"], names):
        try:
            pixels, _ = decode_for(data, model_config, name=name)
            images.append(np.round(pixels * 255.0).astype(np.uint8))  # ImageDataset's quantisation: what `fit` sees
            errors.append("")
        except DataError as e:
            side = 1 if model_config.tiled else model_config.img_size
            images.append(np.zeros((model_config.channels, side, side), np.uint8))
            errors.append(str(e))
    errors = np.array(errors, dtype=object)
    column = _ragged(images) if model_config.tiled else np.stack(images)
    return {"path": np.array(names, dtype=object), "image": column, "ok": errors == "", "error": errors}


def _decoded(paths: list[str], data_uri: str, model_config: ModelConfig):
    """Decode `paths` once on Ray Data CPU tasks; returns (materialised images, [(file, why) skipped]).

    Materialised, so epochs re-read decoded pixels from the object store (as `fit` caches them) and need no
    CPU besides the workers'.
    """
    import ray.data
    from ray.data.expressions import col

    filesystem, _ = filesystem_for(data_uri)
    scheme = data_uri.split("://", 1)[0] + "://" if is_remote(data_uri) else ""
    read = ray.data.read_binary_files(paths, include_paths=True, filesystem=filesystem)
    read.context.execution_options.preserve_order = True  # blocks in file order, not in order of completion
    decoded = (read.map_batches(_decode, fn_kwargs={"model_config": model_config, "scheme": scheme}, batch_size=32)
               .materialize())
    skipped = sorted((r["path"], r["error"]) for r in decoded.select_columns(["path", "error"]).take_all()
                     if r["error"])
    return decoded.filter(expr=col("ok")).select_columns(["image"]).materialize(), skipped


def _model_inputs(images, model_config: ModelConfig, rng: random.Random | None) -> torch.Tensor:
    """A batch of decoded uint8 images as the network's float input: the images themselves, or for a tiled
    model one img_size crop of each (drawn from `rng`; None: the fixed crop of each image's index)."""
    images = list(images)
    if not images:  # e.g. a worker whose share of a small validation set is empty
        return torch.empty(0, model_config.channels, model_config.img_size, model_config.img_size)
    if not model_config.tiled:
        return torch.from_numpy(np.stack(images)).float().div_(255.0)
    crops = [random_crop(torch.from_numpy(np.asarray(a)), model_config.img_size, rng or random.Random(f"fixed:{i}"))
             for i, a in enumerate(images)]
    return torch.stack(crops).float().div_(255.0)


def training_split(data: str, layout: str = "mvtec", normal_dirs: Sequence[str] = (),
                   abnormal_dirs: Sequence[str] = (), mask_dir: str | None = None,
                   test_fraction: float | None = None) -> DatasetSplit:
    """The split of DATA (local folder or s3:// prefix), in the filesystem's own paths; its `source` says what
    the model trains on (checkpoints record it for `ssm evaluate`)."""
    if is_remote(data):
        fs, root = fsspec_for(data)
        if not fs.isdir(root):
            raise DataError(f"{data}: dataset folder not found; check the path (and AWS_ENDPOINT_URL for S3).")
    else:
        fs, root = None, os.path.abspath(data)
    return load_layout(root, layout, normal_dirs=normal_dirs, abnormal_dirs=abnormal_dirs, mask_dir=mask_dir,
                       test_fraction=test_fraction, fs=fs)


# --------------------------------------------------------------------------------------------------------
# The training loop on each worker


def _all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    """Sum (or max) of per-worker numbers over all workers."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _sync_buffers(module: torch.nn.Module) -> None:
    """BatchNorm statistics of rank 0 everywhere: each worker updated its own on its last batch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def _train_loop(config: dict) -> dict:
    import ray
    import ray.train
    import ray.train.torch

    model_config: ModelConfig = config["model"]
    cfg: TrainConfig = config["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    batch_size = max(1, cfg.batch_size // world)  # --batch-size is per optimiser step, across all workers

    torch.manual_seed(cfg.seed)
    model = SSMUNet(model_config).to(memory_format=torch.channels_last)  # as in `fit`: faster on CPU and CUDA
    state = None
    checkpoint = ray.train.get_checkpoint()  # the latest one after a worker died, or on --resume
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_checkpoint(d).state_dict)
            state = torch.load(os.path.join(d, TRAIN_STATE), weights_only=True)
    model = ray.train.torch.prepare_model(model)  # to the worker's device, wrapped in DDP when world > 1
    module = getattr(model, "module", model)
    opt, sched = make_optimizer(model, cfg)
    start, history = 0, []
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        sched.milestones = Counter(cfg.milestones())  # kept out of the file (a Counter); follows --epochs
        start, history = state["epoch"], state["history"]

    # This worker's share of the held-out images; for a tiled model one fixed crop of each, every epoch.
    val_images = _model_inputs(ray.get(config["val_images"])[rank::world], model_config, None)
    shard = ray.train.get_dataset_shard("train")
    drop_last = config["n_train"] // world > batch_size

    def epoch_batches(epoch: int):
        # Every draw of an epoch comes from (seed, rank, epoch): mask scales and keys, tiled crops (a new crop of
        # each image every epoch) and the shuffle buffer. A run repeats exactly; a restarted epoch draws the same.
        tag = f"{cfg.seed}:{rank}:{epoch}"
        random.seed(tag)
        torch.manual_seed(seed_of(tag))
        crops = random.Random(f"{tag}:crops")
        for batch in shard.iter_batches(batch_size=batch_size, drop_last=drop_last, batch_format="numpy",
                                        local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed_of(tag),
                                        prefetch_batches=2):
            yield _model_inputs(batch["image"], model_config, crops).to(device, non_blocking=True)

    def reduce(seen: int, sums: list[float], elapsed: float) -> tuple[int, list[float], float]:
        n_seen, *totals = _all_reduce([seen, *sums], device)
        (slowest,) = _all_reduce([elapsed], device, "max")  # global rate: all images over the slowest worker
        return n_seen, totals, slowest

    def validate() -> float:
        _sync_buffers(module)
        mean = validation_loss(module, val_images.split(batch_size), cfg, device) if len(val_images) else 0.0
        val_sum, n_val = _all_reduce([mean * len(val_images), len(val_images)], device)
        return val_sum / n_val

    def end_of_epoch(row: dict) -> None:
        row["resumed_from"] = start
        history.append(row)
        epoch = row["epoch"]
        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if rank == 0:  # one copy of the weights; every rank still reports (it is a barrier)
                meta = {"model": model_config.to_dict(), "train": cfg.to_dict(), "data": config["data"],
                        "epoch": epoch, "val_loss": row["val_loss"]}
                save_checkpoint(tmp, module, model_config, config["scoring"], None, meta)
                sched_state = {**sched.state_dict(), "milestones": dict(sched.milestones)}
                torch.save({"epoch": epoch, "optimizer": opt.state_dict(), "scheduler": sched_state,
                            "history": history}, os.path.join(tmp, TRAIN_STATE))
                saved = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(row, checkpoint=saved, checkpoint_dir_name=f"epoch_{epoch:04d}")

    train_epochs(model, opt, sched, cfg, epoch_batches, validate, end_of_epoch, start=start, reduce=reduce)
    return {"history": history}


# --------------------------------------------------------------------------------------------------------
# Calibration of the best checkpoint, where the workers ran


def _check_calibration_split(n_val: int, n_normal: int, cfg: TrainConfig) -> None:
    """Enough readable held-out normal images for the calibration (CalibrationError saying what to change
    otherwise)."""
    check_calibration_size(n_val, cfg.min_calibration_images, n_normal=n_normal, val_fraction=cfg.val_fraction)


def _calibrate_checkpoint(checkpoint, val_images, batch_size: int, min_images: int) -> dict:
    """Calibrate on the held-out images as scoring will see them: whole (a tiled model scores by tiles)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with checkpoint.as_directory() as d:
        scorer = load_checkpoint(d, map_location=device).scorer(device)
    images = [torch.from_numpy(np.array(a)).float().div_(255.0) for a in val_images]  # a writable copy
    return calibrate(scorer, [images[i : i + batch_size] for i in range(0, len(images), batch_size)],
                     min_images=min_images).to_dict()


# --------------------------------------------------------------------------------------------------------
# Run directory helpers (local folder or s3:// prefix)


def _read_text(uri: str) -> str | None:
    fs, path = fsspec_for(uri)
    return fs.cat_file(path).decode() if fs.isfile(path) else None


def _write_text(uri: str, text: str) -> None:
    fs, path = fsspec_for(uri)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fs.pipe_file(path, text.encode())


def _publish(local_dir: str, uri: str) -> None:
    """Copy a checkpoint directory to `uri`, its ssm.json last (readers take a checkpoint by its JSON)."""
    fs, path = fsspec_for(uri)
    if fs.isdir(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    for name in sorted(os.listdir(local_dir), key=lambda n: n == "ssm.json"):
        fs.put_file(os.path.join(local_dir, name), f"{path}/{name}")


def _check_run_dir(out: str, resume: bool, job: dict) -> None:
    saved = _read_text(join(out, "job.json"))
    if not resume:
        if saved is not None:
            raise ValueError(f"{out} already holds a training run: pass --resume {out} to continue it, "
                             f"or choose a new --out.")
        return
    if saved is None:
        raise ValueError(f"--resume {out}: no training run there (no job.json); check the path.")
    before = json.loads(saved)["model"]
    changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in job["model"].items() if before.get(k) != v]
    if changed:
        raise ValueError(f"--resume {out}: the model differs from the run's ({', '.join(changed)}); pass the "
                         f"run's --width/--img-size/--grayscale/--upsample or start a new run.")
    held_out = json.loads(saved).get("train", {}).get("val_fraction", job["train"]["val_fraction"])
    if held_out != job["train"]["val_fraction"]:
        raise ValueError(f"--resume {out}: the run holds out --val-fraction {held_out:g}; pass it again (another "
                         f"fraction would validate and calibrate on images the run trained on).")


def _check_same_images(out: str, resume: bool, source: dict) -> None:
    """With a test split held out, --resume must train on the run's own images: others would mix test images into
    training (images added to or removed from a layout's separate training folder are fine)."""
    before = json.loads(_read_text(join(out, "job.json"))).get("split") if resume else None
    held_out = before and (before["test_fraction"] or source["test_fraction"])
    if held_out and before["train_hash"] != source["train_hash"]:
        raise ValueError(f"--resume {out}: these are not the run's training images ({before['n_train']} then, "
                         f"{source['n_train']} now); pass the run's DATA, --layout, --normal-dir, --abnormal-dir and "
                         f"--test-fraction, or start a new run.")


# --------------------------------------------------------------------------------------------------------
# The job


class _EpochRelay(UserCallback):
    """Runs in the Ray Train controller: hands rank 0's metrics of each epoch to the driver through a queue."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(metrics[0])


def train(
    data: str,
    out: str,
    *,
    layout: str = "mvtec",
    normal_dirs: Sequence[str] = (),
    abnormal_dirs: Sequence[str] = (),
    mask_dir: str | None = None,
    test_fraction: float | None = None,
    model_config: ModelConfig | None = None,
    cfg: TrainConfig | None = None,
    scoring: ScoringConfig | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float | None = None,
    address: str | None = None,
    keep: int = 3,
    max_failures: int = 3,
    resume: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainJobResult:
    """Train on the normal images of `data` with `workers` Ray Train workers; writes the run directory `out`.

    Uses the Ray of this process if started, else joins `address` or starts a local cluster (`start_ray`).
    Everything a user can get wrong (paths, layout, an empty split, flags) raises DataError or ValueError
    before any worker starts. `on_epoch` gets each epoch's metrics on the driver as they arrive.
    """
    import ray
    import ray.train
    from ray.data import RandomSeedConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    model_config = model_config or ModelConfig()
    cfg = cfg or TrainConfig()
    scoring = scoring or ScoringConfig(k_values=tuple(cfg.k_values), n_masks=cfg.n_masks)
    for flag, value, low in (("--workers", workers, 1), ("--keep", keep, 1), ("--max-failures", max_failures, -1),
                             ("--epochs", cfg.epochs, 1), ("--batch-size", cfg.batch_size, 1)):
        if value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    if not is_remote(out):
        out = os.path.abspath(out)
    retries = RetryCount()
    job = {"data": data, "layout": layout, "normal_dirs": list(normal_dirs), "abnormal_dirs": list(abnormal_dirs),
           "mask_dir": mask_dir, "model": model_config.to_dict(), "train": cfg.to_dict(),
           "scoring": scoring.to_dict(), "workers": workers, "gpus_per_worker": gpus_per_worker,
           "test_fraction": test_fraction}
    _check_run_dir(out, resume, job)

    split = training_split(data, layout, normal_dirs, abnormal_dirs, mask_dir, test_fraction)
    _check_same_images(out, resume, split.source)
    job["split"] = split.source
    paths = split.train
    train_paths, val_paths = split_train_val(paths, cfg.val_fraction, cfg.seed)
    cpus_per_worker = start_ray(address, workers, cpus_per_worker, gpus_per_worker)
    configure_ray_data()  # before the datasets are made: each carries the context it was made with
    retries.attach()
    train_ds, skipped = _decoded(train_paths, data, model_config)
    val_ds, val_skipped = _decoded(val_paths, data, model_config)
    skipped = sorted(skipped + val_skipped)
    n_train, n_val = train_ds.count(), val_ds.count()
    if n_train == 0 or n_val == 0:
        example = f" (e.g. {skipped[0][1]})" if skipped else ""
        raise DataError(f"{data}: no readable {'training' if n_train == 0 else 'held-out validation'} images: "
                        f"{len(skipped)} of {len(paths)} failed to decode{example}; fix or replace them.")
    _check_calibration_split(n_val, n_train + n_val, cfg)  # the readable ones, before any training
    if n_train < workers:
        raise ValueError(f"--workers {workers} is more than the {n_train} training images; use fewer workers.")
    val_ref = ray.put([r["image"] for r in val_ds.take_all()])  # small: every worker takes a share
    if not resume:
        _write_text(join(out, "job.json"), json.dumps(job, indent=1))

    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    # A new block order every epoch (Ray counts the executions), the same in every run with this seed; and a
    # seeded shuffle buffer on each worker. preserve_order makes the split among workers deterministic too.
    shuffled = train_ds.randomize_block_order(seed=RandomSeedConfig(seed=cfg.seed, reseed_after_execution=True))
    shuffled.context.enable_progress_bars = False  # re-read every epoch: no progress bars for it
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    storage_fs, storage_path = filesystem_for(out)
    queue = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"model": model_config, "train": cfg, "scoring": scoring, "val_images": val_ref,
                           "n_train": n_train, "cpus_per_worker": cpus_per_worker, "data": split.source},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=RAY_RUN,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute="val_loss",
                                                         checkpoint_score_order="min"),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=[_EpochRelay(queue)],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # the driver prints one line an epoch
        ),
        datasets={"train": shuffled},
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )

    # Ray Train's fit() must run in the main thread (it installs a SIGINT handler): relay epochs beside it.
    done = threading.Event()

    def relay():
        while not (done.is_set() and queue.empty()):
            try:
                row = queue.get(timeout=0.5)
            except Empty:
                continue
            if on_epoch:
                on_epoch(row)

    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    try:
        result = trainer.fit()
    finally:
        done.set()
        relay_thread.join()
        queue.shutdown()
    history = result.return_value["history"]

    best = result.get_best_checkpoint("val_loss", "min")
    try:
        calibration = Calibration.from_dict(ray.get(
            ray.remote(_calibrate_checkpoint)
            .options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)
            .remote(best, val_ref, cfg.batch_size, cfg.min_calibration_images)))
    except CalibrationError as e:  # its own sentence, without the task's remote traceback
        raise CalibrationError(f"{getattr(e, 'cause', e)}; the epoch checkpoints are kept in "
                               f"{join(out, 'train')}") from None
    with best.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
        chosen = load_checkpoint(d)
        save_checkpoint(tmp, chosen.build_model(), chosen.model_config, chosen.scoring, calibration, chosen.meta)
        _publish(tmp, join(out, "best"))
    _write_text(join(out, "history.json"), json.dumps(history, indent=1))
    retries.detach()
    return TrainJobResult(out, join(out, "best"), chosen.meta["epoch"], chosen.meta["val_loss"], calibration,
                          history, n_train, n_val, skipped, split.source, retries.total)
