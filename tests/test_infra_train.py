"""Checks (and worked examples) for Ray Train (V2, the default in Ray 2.60) on S3.

Covers: checkpoints persisted to the moto bucket, ``CheckpointConfig`` retention
by score, reading results back (``Result``/``Checkpoint``), resuming a finished
or stopped run by re-running with the same ``RunConfig(name, storage_path)``,
and ``FailureConfig(max_failures)`` restarting a crashed worker group from
``ray.train.get_checkpoint()``.

A 2-worker ``TorchTrainer.fit()`` takes ~15 s here (about 10 s of it is
starting the worker group), so these tests are marked ``slow``.
"""

from __future__ import annotations

import os

import pytest

from jobs.storage import filesystem_for

pytestmark = pytest.mark.slow


def _train_loop(config):
    """Tiny loop: resumes from the latest checkpoint, reports one per epoch."""
    import tempfile
    import time

    import torch

    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()  # None on a fresh run
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(os.path.join(ckpt_dir, "state.pt"))
        start_epoch = state["epoch"] + 1

    model = ray.train.torch.prepare_model(torch.nn.Linear(2, 1))  # DDP over gloo

    for epoch in range(start_epoch, config["epochs"]):
        if epoch == config.get("crash_at_epoch") and checkpoint is None and rank == 1:
            # Give the controller time to register the previous report first;
            # a report still in flight when the group dies is lost.
            time.sleep(3)
            os._exit(1)  # hard crash, as if the process was SIGKILLed

        val_loss = abs(epoch - 1) + 0.5  # best at epoch 1
        metrics = {"epoch": epoch, "val_loss": val_loss, "start_epoch": start_epoch}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:  # only rank 0 uploads; every rank must call report()
                torch.save(
                    {"epoch": epoch, "model": model.module.state_dict()},
                    os.path.join(tmp, "state.pt"),
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


def _fit(name: str, storage_uri: str, epochs: int, *, explicit_fs: bool, **loop_cfg):
    import ray.train
    from ray.train.torch import TorchTrainer

    if explicit_fs:
        # With storage_filesystem, storage_path must be prefix-stripped.
        fs, path = filesystem_for(storage_uri)
        storage = {"storage_path": path, "storage_filesystem": fs}
    else:
        # Plain URI: Ray resolves it with FileSystem.from_uri, which honours
        # AWS_ENDPOINT_URL(_S3) in every process that has them.
        storage = {"storage_path": storage_uri}

    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"epochs": epochs, **loop_cfg},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        run_config=ray.train.RunConfig(
            name=name,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=ray.train.FailureConfig(max_failures=2),
            **storage,
        ),
    )
    return trainer.fit()


@pytest.fixture(scope="module")
def finished_run(s3_server, ray_local):
    bucket = s3_server.make_bucket()
    storage_uri = f"s3://{bucket}/runs"
    result = _fit("demo", storage_uri, epochs=3, explicit_fs=True)
    return bucket, storage_uri, result


def test_checkpoints_land_in_bucket(finished_run, s3_server, tmp_path):
    import ray.train
    import torch

    bucket, storage_uri, result = finished_run

    assert result.error is None
    assert result.metrics["epoch"] == 2 and result.metrics["start_epoch"] == 0
    # Result.path / Checkpoint.path are prefix-stripped: "bucket/runs/demo".
    assert result.path == f"{bucket}/runs/demo"

    keys = s3_server.list_keys(bucket, "runs/demo/")
    ckpt_dirs = {
        k.split("/")[2]
        for k in keys
        if k.split("/")[2].startswith("checkpoint_") and k.count("/") >= 3
    }
    # val_loss per epoch = 1.5, 0.5, 1.5 -> keep the 2 best (epochs 1 and 2 on
    # the tie, newer wins); the latest checkpoint is always retained too.
    assert len(ckpt_dirs) == 2
    assert "runs/demo/checkpoint_manager_snapshot.json" in keys

    # Latest checkpoint: result.checkpoint.
    latest = result.checkpoint
    assert latest.path.startswith(f"{bucket}/runs/demo/checkpoint_")
    with latest.as_directory() as d:
        assert torch.load(os.path.join(d, "state.pt"))["epoch"] == 2

    # Best checkpoint: best_checkpoints is ordered worst -> best, so prefer
    # get_best_checkpoint(metric, mode).
    assert len(result.best_checkpoints) == 2
    assert result.best_checkpoints[-1][1]["epoch"] == 1
    best = result.get_best_checkpoint("val_loss", "min")
    local = best.to_directory(str(tmp_path / "best"))
    assert torch.load(os.path.join(local, "state.pt"))["epoch"] == 1

    # A later job (e.g. scoring) can reload the run or a checkpoint by URI.
    again = ray.train.Result.from_path(storage_uri + "/demo")
    assert again.get_best_checkpoint("val_loss", "min").path == best.path
    by_uri = ray.train.Checkpoint(f"s3://{best.path}")
    assert os.listdir(by_uri.to_directory(str(tmp_path / "by_uri"))) == ["state.pt"]


def test_rerun_same_name_resumes_from_latest_checkpoint(finished_run):
    # Ray Train V2 has no Trainer.restore(); re-running with the same
    # RunConfig(name, storage_path) loads checkpoint_manager_snapshot.json and
    # get_checkpoint() returns the latest checkpoint of the earlier run.
    _, storage_uri, _ = finished_run
    result = _fit("demo", storage_uri, epochs=5, explicit_fs=False)
    assert result.metrics["start_epoch"] == 3
    assert result.metrics["epoch"] == 4


def test_trainer_restore_is_gone_in_v2():
    from ray.train.torch import TorchTrainer

    with pytest.raises(DeprecationWarning):
        TorchTrainer.restore("s3://bucket/runs/demo")


def test_crashed_worker_restarts_from_checkpoint(s3_server, ray_local):
    bucket = s3_server.make_bucket()
    result = _fit(
        "crash", f"s3://{bucket}/runs", epochs=4, explicit_fs=False, crash_at_epoch=2
    )
    assert result.error is None
    assert result.metrics["epoch"] == 3
    # The restarted group resumed from a checkpoint instead of from scratch
    # (normally epoch 1's, i.e. start_epoch == 2).
    assert result.metrics["start_epoch"] >= 1
