import json

import pytest
import torch

from ssm.checkpoint import load_checkpoint
from ssm.model import ModelConfig, SSMUNet
from ssm.training import TrainConfig, fit, make_optimizer, split_train_val, training_step


def _textures(n, size=32, seed=0):
    """Smooth stripes with a random phase: a texture a tiny model learns to inpaint quickly."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    phase = torch.rand(n, 1, 1, generator=g) * 6.28
    img = 0.5 + 0.4 * torch.sin(xx[None] * 0.6 + phase) * torch.cos(yy[None] * 0.3)
    return img[:, None].expand(n, 3, size, size).contiguous()


def test_loss_falls_with_training_steps():
    torch.manual_seed(0)
    model = SSMUNet(ModelConfig(width=8, img_size=32))
    cfg = TrainConfig(lr=2e-3)
    opt, _ = make_optimizer(model, cfg)
    x = _textures(8)
    first = None
    for step in range(30):
        loss, parts = training_step(model, x, cfg, scale=step % 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss)
    assert set(parts) == {"mse", "msgms", "ssim", "mask"}
    assert float(loss) < 0.6 * first


def test_schedule_follows_the_paper():
    # fixed epochs, as in the paper and the released code: a 30-epoch run steps once, at epoch 15
    assert TrainConfig(epochs=50).milestones() == [15, 30, 45]
    assert TrainConfig(epochs=30).milestones() == [15]
    assert TrainConfig(epochs=40, lr_steps=(12, 24, 36)).milestones() == [12, 24, 36]
    with pytest.raises(ValueError, match="lr_steps"):
        TrainConfig(lr_steps=(0.3,))


def test_split_is_deterministic_and_disjoint():
    items = [f"img{i}" for i in range(50)]
    tr, va = split_train_val(items, 0.1, seed=1)
    assert len(va) == 5 and not set(tr) & set(va) and sorted(tr + va) == sorted(items)
    assert split_train_val(items, 0.1, seed=1) == (tr, va)


def test_fit_writes_calibrated_best_checkpoint(tmp_path):
    x = _textures(12)
    result = fit(x[:10], x[10:], tmp_path / "run", ModelConfig(width=8, img_size=32),
                 TrainConfig(epochs=2, batch_size=4, lr=1e-3, min_calibration_images=2), progress=False)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["images_per_s"] > 0 and h["val_loss"] > 0 for h in history)
    best = load_checkpoint(tmp_path / "run")
    assert best.calibration is not None and best.calibration.n_images == 2
    assert best.meta["epoch"] == result.best_epoch
    assert best.meta["val_loss"] == min(h["val_loss"] for h in history)
    assert load_checkpoint(tmp_path / "run" / "last").meta["epoch"] == 2
    # the calibrated checkpoint scores on its own
    out = best.scorer().score(x[10:])
    assert out.image_scores.shape == (2,) and torch.isfinite(out.image_scores).all()
