"""Self-supervised training on normal images (method page, section 4).

`training_step` is the whole method for one batch and knows nothing of orchestration: the single-process
`fit` below and the Ray Train job both call it. `fit` keeps the best checkpoint by validation loss on a
held-out normal split, then calibrates it on that same split (never on test labels).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .calibration import MIN_CALIBRATION_IMAGES, Calibration, calibrate, check_calibration_size
from .checkpoint import save_checkpoint
from .losses import ssm_loss
from .masks import cell_sizes, complementary_masks, image_keys, random_keys
from .model import ModelConfig, SSMUNet, masked_forward
from .scoring import Scorer, ScoringConfig


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-5
    lr_steps: Sequence[int] = (15, 30, 45)  # epochs after which lr is multiplied by lr_decay (the paper's)
    lr_decay: float = 0.1
    alpha: float = 1.0  # MSGMS weight
    beta: float = 1.0  # SSIM weight
    gamma: float = 1.0  # MSE weight
    k_values: Sequence[int] = (2, 4, 8)
    n_masks: int = 3
    val_fraction: float = 0.1
    seed: int = 0
    min_calibration_images: int = MIN_CALIBRATION_IMAGES  # held-out normal images the calibration needs
    amp: bool | None = None  # bf16 autocast; None = on for CUDA

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lr_steps"], d["k_values"] = list(self.lr_steps), list(self.k_values)
        return d

    def __post_init__(self) -> None:
        if any(int(s) != s or s < 1 for s in self.lr_steps):
            raise ValueError(f"lr_steps must be positive whole epochs, got {list(self.lr_steps)}")

    def milestones(self) -> list[int]:
        """The lr steps that fall inside the run (fixed epochs, as in the paper; not scaled to --epochs)."""
        return sorted({int(s) for s in self.lr_steps if s < self.epochs})


def autocast_for(device: torch.device, amp: bool | None):
    use = device.type == "cuda" if amp is None else amp
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()


def training_step(model, x: torch.Tensor, cfg: TrainConfig, scale: int | None = None,
                  keys: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch x (B,C,H,W) in [0,1]: a random scale, per-image complementary masks, one forward."""
    size = x.shape[-1]
    cells = cell_sizes(size, cfg.k_values)
    cell = cells[random.randrange(len(cells)) if scale is None else scale]
    keys = random_keys(x.shape[0], x.device) if keys is None else keys
    masks = complementary_masks(keys, size, cell, cfg.n_masks)
    with autocast_for(x.device, cfg.amp):
        x_hat, mask_pred = masked_forward(model, x, masks)
    loss, parts = ssm_loss(x, x_hat, mask_pred, masks, cfg.alpha, cfg.beta, cfg.gamma)
    return loss, {k: float(v.detach()) for k, v in parts.items()}


@torch.no_grad()
def validation_loss(model, batches: Iterable[torch.Tensor], cfg: TrainConfig, device) -> float:
    """Mean loss over every scale with masks fixed by image content: comparable from epoch to epoch."""
    model.eval()
    total, count = 0.0, 0
    for x in batches:
        x = x.to(device, non_blocking=True)
        keys = image_keys(x, cfg.seed)
        for s in range(len(cfg.k_values)):
            loss, _ = training_step(model, x, cfg, scale=s, keys=keys)
            total += float(loss) * len(x)
            count += len(x)
    model.train()
    return total / max(count, 1)


PART_NAMES = ("loss", "mse", "msgms", "ssim", "mask")  # the loss and its parts, as ssm_loss names them


def train_epochs(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched,
    cfg: TrainConfig,
    batches: Callable[[int], Iterable[torch.Tensor]],
    validate: Callable[[], float],
    on_epoch: Callable[[dict], None],
    *,
    start: int = 0,
    reduce: Callable[[int, list[float], float], tuple[int, list[float], float]] | None = None,
) -> None:
    """The epoch loop of `fit` and of the Ray Train job: epochs `start`..cfg.epochs-1 of `training_step`.

    batches(epoch): that epoch's input batches, on the model's device (the caller decides the order and seeds
    its draws); validate(): the validation loss after the epoch; on_epoch(row): the epoch's metrics (epoch,
    loss and its parts per image, val_loss, images_per_s, lr) to record, checkpoint and report. reduce(images,
    loss sums, seconds): the totals over all data-parallel workers (default: this process's own).
    """
    for epoch in range(start, cfg.epochs):
        model.train()
        t0, seen, sums = time.perf_counter(), 0, dict.fromkeys(PART_NAMES, 0.0)
        for x in batches(epoch):
            loss, parts = training_step(model, x, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(x)
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                sums[k] += v * len(x)
        sched.step()
        elapsed = time.perf_counter() - t0
        totals = list(sums.values())
        if reduce is not None:
            seen, totals, elapsed = reduce(seen, totals, elapsed)
        val = validate()
        on_epoch({"epoch": epoch + 1, **{k: v / max(seen, 1) for k, v in zip(PART_NAMES, totals)}, "val_loss": val,
                  "images_per_s": seen / elapsed, "lr": opt.param_groups[0]["lr"]})


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.milestones(), gamma=cfg.lr_decay)
    return opt, sched


def seed_of(tag: str) -> int:
    """A 32-bit seed from a text tag such as "seed:rank:epoch" (the same on every machine and Python)."""
    return int.from_bytes(hashlib.blake2b(tag.encode(), digest_size=4).digest(), "little")


def split_train_val(items: Sequence, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Deterministic hold-out of a normal validation split (at least one item when val_fraction > 0)."""
    items = list(items)
    if len(items) < 2 and val_fraction > 0:
        raise ValueError(f"need at least 2 normal training images to hold out a validation split, got {len(items)}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(items) * val_fraction)) if val_fraction > 0 else 0
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [items[i] for i in train], [items[i] for i in val]


def _batches(data: Dataset, batch_size: int) -> list[torch.Tensor]:
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    return [b[0] if isinstance(b, (list, tuple)) else b for b in loader]


def image_batches(data: Dataset, batch_size: int) -> list[list[torch.Tensor]]:
    """Items of `data` in lists of up to batch_size, unstacked: images may differ in size."""
    return [[data[i] for i in range(j, min(j + batch_size, len(data)))] for j in range(0, len(data), batch_size)]


@dataclass
class FitResult:
    run_dir: Path
    best: Path
    best_epoch: int
    best_val_loss: float
    calibration: Calibration
    history: list[dict] = field(default_factory=list)


def fit(
    train_data: Dataset | torch.Tensor,
    val_data: Dataset | torch.Tensor,
    out_dir: str | Path,
    model_config: ModelConfig | None = None,
    cfg: TrainConfig | None = None,
    scoring: ScoringConfig | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    calibration_data: Dataset | None = None,
    trained_on: dict | None = None,
) -> FitResult:
    """Train in this process; writes RUN/last, RUN/best (calibrated) and RUN/history.json.

    The best checkpoint is calibrated on `calibration_data` (default: `val_data`): for a tiled model, the
    held-out images whole (ImageDataset with crop=None), since scoring sees whole images, not crops.
    `trained_on` (ssm.data.DatasetSplit.source) goes into every checkpoint's meta as "data", so evaluation
    knows which images the model saw.
    """
    from tqdm.auto import tqdm

    model_config = model_config or ModelConfig()
    cfg = cfg or TrainConfig()
    scoring = scoring or ScoringConfig(k_values=tuple(cfg.k_values), n_masks=cfg.n_masks)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_data = TensorDataset(train_data) if isinstance(train_data, torch.Tensor) else train_data
    val_data = TensorDataset(val_data) if isinstance(val_data, torch.Tensor) else val_data
    if len(train_data) == 0:
        raise ValueError("the training split is empty")
    if len(val_data) == 0:
        raise ValueError("the validation split is empty: calibration needs held-out normal images")
    check_calibration_size(len(val_data if calibration_data is None else calibration_data), cfg.min_calibration_images)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    model = SSMUNet(model_config).to(device)
    model = model.to(memory_format=torch.channels_last)  # measured faster on CPU (oneDNN) and CUDA alike
    opt, sched = make_optimizer(model, cfg)
    loader = DataLoader(train_data, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_data) > cfg.batch_size)
    val_batches = _batches(val_data, cfg.batch_size)
    history: list[dict] = []
    meta = {"model": model_config.to_dict(), "train": cfg.to_dict(), "data": trained_on}
    bar = tqdm(total=cfg.epochs, desc="train", unit="epoch", disable=not progress)
    best_loss, best_epoch = math.inf, -1

    def epoch_batches(epoch: int):
        for batch in loader:
            yield (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device, non_blocking=True)

    def end_of_epoch(row: dict) -> None:
        nonlocal best_loss, best_epoch
        history.append(row)
        epoch, val = row["epoch"], row["val_loss"]
        save_checkpoint(out / "last", model, model_config, scoring, None, {**meta, "epoch": epoch, "val_loss": val})
        if val < best_loss:
            best_loss, best_epoch = val, epoch
            save_checkpoint(out / "best", model, model_config, scoring, None, {**meta, "epoch": epoch, "val_loss": val})
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", val=f"{val:.4f}", img_s=f"{row['images_per_s']:.1f}")
        if on_epoch:
            on_epoch(row)
        (out / "history.json").write_text(json.dumps(history, indent=1))

    train_epochs(model, opt, sched, cfg, epoch_batches, lambda: validation_loss(model, val_batches, cfg, device),
                 end_of_epoch)
    bar.close()

    from .checkpoint import load_checkpoint

    best = load_checkpoint(out / "best", map_location=device)
    scorer = Scorer(best.build_model(device), scoring)
    cal = calibrate(scorer, val_batches if calibration_data is None else image_batches(calibration_data, cfg.batch_size),
                    min_images=cfg.min_calibration_images)
    save_checkpoint(out / "best", scorer.model, model_config, scoring, cal, best.meta)
    return FitResult(out, out / "best", best_epoch, best_loss, cal, history)
