"""The Ray Train job (jobs/train.py) on a real local Ray cluster: 2 CPU workers, 32 px images, width 8.

One run is shared by several checks: it has a corrupt image in its data and loses a worker (SIGKILL) after
its second epoch, so it shows the loss falling, the checkpoints kept, the calibrated RUN/best, the skipped
image and the resume from a checkpoint together. S3 runs go to the moto server of conftest.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ssm.checkpoint import load_checkpoint
from ssm.data import DataError
from ssm.model import ModelConfig
from ssm.training import TrainConfig

pytestmark = pytest.mark.slow

SIZE = 32
MODEL = ModelConfig(width=8, img_size=SIZE)


def _stripes(rng) -> np.ndarray:
    """Smooth stripes with a random phase: a texture a tiny model learns to inpaint quickly."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    img = 0.5 + 0.4 * np.sin(xx * 0.6 + rng.uniform(0, 6.28)) * np.cos(yy * 0.3)
    return (np.repeat(img[..., None], 3, axis=2) * 255).astype(np.uint8)


def write_mvtec(root: Path, n_train: int = 22, corrupt: bool = True) -> Path:
    """An MVTec-layout folder: n_train normal training images (+ one corrupt file) and one test image."""
    rng = np.random.default_rng(0)
    for folder in ("train/good", "test/good"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(_stripes(rng)).save(root / "train/good" / f"{i:03d}.png")
    Image.fromarray(_stripes(rng)).save(root / "test/good/000.png")
    if corrupt:
        (root / "train/good/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (OSError, ValueError):
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def train_worker_pids() -> list[int]:
    """PIDs of the Ray Train workers of this test session's own cluster (descendants of this process)."""
    pids = []
    for pid in _descendants(os.getpid()):
        try:
            if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module")
def killed_run(ray_local, tmp_path_factory):
    """6 epochs on 2 workers; one worker process is SIGKILLed once epoch 2 is reported."""
    from jobs.train import train

    root = tmp_path_factory.mktemp("train_job")
    data = write_mvtec(root / "data")
    rows, killed = [], []

    def on_epoch(row):
        rows.append(row)
        if row["epoch"] == 2 and not killed:
            pids = train_worker_pids()
            assert len(pids) == 2, pids
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    t0 = time.perf_counter()
    result = train(str(data), str(root / "run"), model_config=MODEL,
                   cfg=TrainConfig(epochs=6, batch_size=4, lr=2e-3, lr_steps=(), min_calibration_images=2),
                   workers=2, cpus_per_worker=1, keep=2, max_failures=2, on_epoch=on_epoch)
    print(f"killed run: {time.perf_counter() - t0:.1f} s")
    return result, rows, killed, root / "run"


def test_loss_falls_and_metrics_are_reported(killed_run):
    result, rows, _, run = killed_run
    history = result.history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert min(h["val_loss"] for h in history[3:]) < history[0]["val_loss"]
    for h in history:
        assert set(h) >= {"loss", "mse", "msgms", "ssim", "mask", "val_loss", "images_per_s"}
        assert h["images_per_s"] > 0
    assert json.loads((run / "history.json").read_text()) == history
    assert rows and rows[-1]["epoch"] == 6  # the driver saw each epoch as it came


def test_dead_worker_is_replaced_and_training_resumes_from_a_checkpoint(killed_run):
    result, rows, killed, _ = killed_run
    assert killed, "no worker was killed"
    assert result.resumed_from and min(result.resumed_from) >= 1  # not from epoch 0
    assert all(h["resumed_from"] == 0 for h in result.history[:2])
    # epochs after the restart were trained by the new worker group, from the checkpoint
    assert result.history[-1]["resumed_from"] == result.resumed_from[-1]


def test_best_checkpoints_are_kept_and_best_is_calibrated(killed_run):
    result, _, _, run = killed_run
    kept = sorted(p.name for p in (run / "train").glob("epoch_*"))
    by_val = sorted(result.history, key=lambda h: h["val_loss"])
    best_two = {f"epoch_{h['epoch']:04d}" for h in by_val[:2]}
    assert best_two <= set(kept) and set(kept) <= best_two | {"epoch_0006"}  # the latest is kept too
    for name in kept:
        assert {"model.pt", "ssm.json", "train_state.pt"} <= {p.name for p in (run / "train" / name).iterdir()}
        assert load_checkpoint(run / "train" / name).calibration is None

    best = load_checkpoint(run)  # RUN resolves to RUN/best
    assert Path(best.path) == run / "best"
    assert best.calibration is not None and best.calibration.n_images == result.n_val == 2
    assert best.meta["epoch"] == result.best_epoch == by_val[0]["epoch"]
    assert best.meta["val_loss"] == pytest.approx(by_val[0]["val_loss"])
    data = best.meta["data"]  # what it trained on, for `ssm evaluate`: all of train/good (+ the corrupt file)
    assert data["layout"] == "mvtec" and data["n_train"] == 23 and data["test_fraction"] == 0.0
    assert data["normal_dirs"] == [str(run.parent / "data" / "train" / "good")]
    image = torch.from_numpy(_stripes(np.random.default_rng(1))).permute(2, 0, 1)[None].float() / 255
    assert torch.isfinite(best.scorer().score(image).image_scores).all()  # scores on its own


def test_corrupt_image_is_skipped_and_counted(killed_run):
    result, _, _, _ = killed_run
    assert len(result.skipped) == 1
    path, why = result.skipped[0]
    assert path.endswith("broken.png") and "cannot be decoded" in why
    assert result.n_train + result.n_val == 22


def test_s3_data_and_storage_then_resume_from_the_cli(s3_server, ray_local, tmp_path):
    from cli import app
    from jobs.storage import localize
    from jobs.train import train

    bucket = s3_server.make_bucket()
    local = write_mvtec(tmp_path / "data", n_train=12)
    client = s3_server.client()
    for f in local.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), bucket, f"data/{f.relative_to(local)}")
    data, run = f"s3://{bucket}/data", f"s3://{bucket}/run"

    result = train(data, run, model_config=MODEL, cfg=TrainConfig(epochs=2, batch_size=4, lr=2e-3, val_fraction=0.3,
                                                                  min_calibration_images=2),
                   workers=2, cpus_per_worker=1, keep=1)
    assert [h["epoch"] for h in result.history] == [1, 2] and len(result.skipped) == 1
    assert result.skipped[0][0] == f"s3://{bucket}/data/train/good/broken.png"
    keys = s3_server.list_keys(bucket, "run/")
    assert {"run/job.json", "run/history.json", "run/best/ssm.json", "run/best/model.pt"} <= set(keys)
    assert {k.split("/")[2] for k in keys if k.startswith("run/train/epoch_")} <= {"epoch_0001", "epoch_0002"}

    # --resume continues the stopped run from its latest checkpoint (epoch 2) up to the new --epochs
    out = CliRunner().invoke(app, ["train", data, "--resume", run, "--epochs", "3", "--batch-size", "4",
                                   "--img-size", str(SIZE), "--width", "8", "--lr", "2e-3", "--workers", "2",
                                   "--cpus-per-worker", "1", "--keep", "1", "--val-fraction", "0.3",
                                   "--min-calibration-images", "2"])
    assert out.exit_code == 0, out.output
    assert "resumed from epoch 2" in out.output and "images skipped: 1" in out.output
    assert f"checkpoint: {run}/best" in out.output
    history = json.loads(client.get_object(Bucket=bucket, Key="run/history.json")["Body"].read())
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[-1]["resumed_from"] == 2

    best = load_checkpoint(localize(run))
    assert best.calibration is not None and best.meta["epoch"] in (1, 2, 3)
    assert best.meta["data"]["normal_dirs"] == [f"{data}/train/good"]


# --------------------------------------------------------------------------------------------------------
# Bad input: one clear sentence, before any worker starts


def _cli(*args):
    from cli import app

    t0 = time.perf_counter()
    base = ["--img-size", str(SIZE), "--width", "8", "--workers", "2", "--cpus-per-worker", "1"]
    out = CliRunner().invoke(app, ["train", *base, *map(str, args)])
    return out, time.perf_counter() - t0


@pytest.mark.parametrize("case", ["missing", "wrong_layout", "empty", "one_image", "workers"])
def test_bad_input_fails_fast_with_a_clear_message(case, tmp_path, ray_local):
    data = tmp_path / "data"
    extra = []
    if case == "missing":
        expected = f"{data}: dataset folder not found"
    elif case == "wrong_layout":
        write_mvtec(data, n_train=3, corrupt=False)
        extra, expected = ["--layout", "oct2017"], "is this an OCT2017 folder"
    elif case == "empty":
        write_mvtec(data, n_train=0, corrupt=False)
        expected = f"{data}/train/good: no training images found"
    elif case == "one_image":
        write_mvtec(data, n_train=1, corrupt=False)
        expected = "need at least 2 normal training images"
    else:
        write_mvtec(data, n_train=3, corrupt=False)
        extra, expected = ["--workers", "0"], "--workers must be at least 1"
    out, seconds = _cli(data, "--out", tmp_path / "run", *extra)
    assert out.exit_code == 2, out.output
    assert "error: " in out.output and expected in out.output.replace("\n", " ")
    assert seconds < 10 and not (tmp_path / "run" / "train").exists()


def test_unreadable_training_data_fails_before_training(tmp_path, ray_local):
    data = write_mvtec(tmp_path / "data", n_train=0, corrupt=False)
    for i in range(3):
        (data / "train/good" / f"{i}.png").write_bytes(b"")
    out, _ = _cli(data, "--out", tmp_path / "run")
    assert out.exit_code == 2
    assert "no readable training images: 3 of 3 failed to decode" in out.output.replace("\n", " ")
    assert not (tmp_path / "run" / "train").exists()


def test_too_few_held_out_images_fail_before_training(tmp_path, ray_local):
    # 16 normal images and a corrupt one: 2 held out at --val-fraction 0.1, too few to calibrate on
    data = write_mvtec(tmp_path / "data", n_train=16)
    out, _ = _cli(data, "--out", tmp_path / "run")
    assert out.exit_code == 2, out.output
    assert ("calibration needs at least 9 held-out normal images and the validation split has 2 (of 16 normal "
            "images, --val-fraction 0.1): add normal images or raise --val-fraction from 0.1 to 0.57"
            ) in out.output.replace("\n", " ")
    assert not (tmp_path / "run" / "train").exists()


def test_existing_run_needs_resume(tmp_path, ray_local):
    data = write_mvtec(tmp_path / "data", n_train=3, corrupt=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "job.json").write_text("{}")
    out, _ = _cli(data, "--out", tmp_path / "run")
    assert out.exit_code == 2 and "already holds a training run: pass --resume" in out.output
    out, _ = _cli(data, "--resume", tmp_path / "elsewhere")
    assert out.exit_code == 2 and "no training run there" in out.output


def test_in_process_flag_runs_plain_fit(tmp_path):
    data = write_mvtec(tmp_path / "data", n_train=6, corrupt=False)
    out, _ = _cli(data, "--out", tmp_path / "run", "--in-process", "--epochs", "1", "--batch-size", "4",
                  "--val-fraction", "0.34", "--min-calibration-images", "2")
    assert out.exit_code == 0, out.output
    assert load_checkpoint(tmp_path / "run").calibration is not None
    assert (tmp_path / "run" / "last" / "ssm.json").is_file()  # fit's own layout: no Ray run folder
    assert not (tmp_path / "run" / "train").exists()
