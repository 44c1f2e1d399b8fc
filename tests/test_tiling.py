"""Images as they come: tiles cover and stitch exactly, a tiled model scores any size at its own
resolution (alone or in any batch, equal to the plain scorer on a single tile), trains on random crops
in process and on Ray Train, calibrates on whole images, and the scoring job writes heatmaps at the scored
resolution."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ssm.calibration import calibrate
from ssm.checkpoint import load_checkpoint, save_checkpoint
from ssm.data import ImageDataset, decode_for, decode_image
from ssm.model import ModelConfig, SSMUNet
from ssm.scoring import Scorer, ScoringConfig
from ssm.tiling import cut_tiles, random_crop, stitch, tile_grid, tile_origins
from ssm.training import TrainConfig, fit

TILE = 32


def _part(rng: np.random.Generator, h: int, w: int, crack: bool = False) -> np.ndarray:
    """A long grayscale 'part': smooth horizontal shading and fine vertical grain, optionally a 1-px crack."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = 0.55 + 0.15 * np.sin(yy / h * np.pi + rng.uniform(0, 1)) + 0.05 * np.sin(xx * 1.3 + rng.uniform(0, 6))
    if crack:
        x0 = int(rng.integers(w // 4, 3 * w // 4))
        for y in range(h // 4, 3 * h // 4):
            img[y, x0 + (y // 7) % 3] = 0.05
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("length,tile,stride", [(300, 128, 64), (128, 128, 64), (50, 128, 64), (129, 32, 16)])
def test_tile_origins_cover_evenly(length, tile, stride):
    origins = tile_origins(length, tile, stride)
    assert origins[0] == 0 and origins == sorted(set(origins))
    assert origins[-1] + tile == max(length, tile)  # the last tile ends at the border
    assert all(b - a <= stride for a, b in zip(origins, origins[1:]))


@pytest.mark.parametrize("h,w", [(32, 32), (45, 100), (20, 70), (97, 33)])
def test_cut_and_stitch_roundtrip(h, w):
    x = torch.rand(2, h, w)
    tiles, grid = cut_tiles(x, TILE, 0.5)
    assert tiles.shape[1:] == (2, TILE, TILE) and len(grid) == len(tile_grid((h, w), TILE, 0.5))
    for c in range(2):
        assert torch.allclose(stitch(tiles[:, c], grid, (h, w)), x[c], atol=1e-6)


def test_random_crop_pads_small_images_and_varies():
    x = torch.arange(20 * 50, dtype=torch.float32).reshape(1, 20, 50)
    rng = random.Random(0)
    crops = [random_crop(x, TILE, rng) for _ in range(8)]
    assert all(c.shape == (1, TILE, TILE) for c in crops)
    assert len({float(c[0, 0, 0]) for c in crops}) > 1  # positions differ
    assert torch.equal(crops[0][0, 20:, :], crops[0][0, 19:20, :].expand(12, TILE))  # edge rows repeated


def test_decode_keeps_aspect_ratio_with_scale(tmp_path):
    path = tmp_path / "part.png"
    Image.fromarray(_part(np.random.default_rng(0), 60, 150)).save(path)
    x, (w, h) = decode_image(path, 1, scale=0.5)
    assert (w, h) == (150, 60) and x.shape == (1, 30, 75)
    cfg = ModelConfig(width=4, channels=1, img_size=TILE, tiled=True, scale=0.5)
    assert decode_for(path, cfg)[0].shape == (1, 30, 75)
    assert decode_for(path, ModelConfig(width=4, channels=1, img_size=TILE))[0].shape == (1, TILE, TILE)
    with pytest.raises(ValueError, match="tiled"):
        ModelConfig(img_size=TILE, scale=0.5)


@pytest.fixture(scope="module")
def tiled_model():
    torch.manual_seed(0)
    return SSMUNet(ModelConfig(width=4, channels=1, img_size=TILE, tiled=True)).eval()


def test_tiled_scoring_any_size_and_batch_independent(tiled_model):
    scorer = Scorer(tiled_model, ScoringConfig(tau=0.05), amp=False)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, TILE, TILE, generator=g), torch.rand(1, 45, 130, generator=g),
              torch.rand(1, 20, 40, generator=g)]
    together = scorer.score_images(images)
    assert [tuple(m.shape) for m in together.heatmaps] == [(TILE, TILE), (45, 130), (20, 40)]
    for i, img in enumerate(images):
        alone = scorer.score_images([img])
        assert torch.allclose(alone.heatmaps[0], together.heatmaps[i], atol=1e-6)
        assert float(alone.image_scores[0]) == pytest.approx(float(together.image_scores[i]), abs=1e-6)
    # One tile is one ordinary image: the same map and score as the plain scorer.
    plain = scorer.score(images[0][None])
    assert torch.allclose(plain.heatmaps[0], together.heatmaps[0], atol=1e-6)
    assert float(plain.image_scores[0]) == pytest.approx(float(together.image_scores[0]), abs=1e-6)
    # The stitched map is the image's: its maximum is the heatmap_max, never a tile's padded area.
    assert float(together.heatmap_max[1]) == pytest.approx(float(together.heatmaps[1].max()))


def _write_parts(folder, n, rng, crack=False, size=(40, 120)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{'crack' if crack else 'part'}_{i:03d}.png"
        Image.fromarray(_part(rng, *size, crack=crack)).save(p)
        paths.append(str(p))
    return paths


def test_fit_on_random_crops_calibrates_on_whole_images(tmp_path):
    rng = np.random.default_rng(0)
    train = _write_parts(tmp_path / "train", 12, rng)
    val = _write_parts(tmp_path / "val", 4, rng)
    cfg = ModelConfig(width=4, channels=1, img_size=TILE, tiled=True)
    train_ds = ImageDataset.for_model(train, cfg, crop="random", seed=1)
    first = [train_ds[0] for _ in range(3)]
    assert all(c.shape == (1, TILE, TILE) for c in first) and not torch.equal(first[0], first[1])
    result = fit(train_ds, ImageDataset.for_model(val, cfg, crop="fixed"), tmp_path / "run", cfg,
                 TrainConfig(epochs=2, batch_size=4, lr=1e-3, min_calibration_images=2), progress=False,
                 calibration_data=ImageDataset.for_model(val, cfg))
    ckpt = load_checkpoint(result.best)
    assert ckpt.model_config.tiled and ckpt.model_config.img_size == TILE
    assert ckpt.calibration.n_images == len(val)  # whole images, not crops
    out = ckpt.scorer(amp=False).score_images([ImageDataset.for_model(val, cfg)[0]])
    assert out.heatmaps[0].shape == (40, 120)


@pytest.fixture(scope="module")
def tiled_checkpoint(tmp_path_factory):
    """An untrained tiny tiled model at half scale, calibrated on generated parts."""
    torch.manual_seed(0)
    cfg = ModelConfig(width=4, channels=1, img_size=TILE, tiled=True, scale=0.5)
    model = SSMUNet(cfg).eval()
    rng = np.random.default_rng(3)
    normals = [torch.from_numpy(_part(rng, 48, 140)[None] / 255.0).float() for _ in range(6)]
    scoring = ScoringConfig()
    cal = calibrate(Scorer(model, scoring, amp=False), [normals], min_images=2)  # a fixture: values do not matter
    return str(save_checkpoint(tmp_path_factory.mktemp("tiled") / "best", model, cfg, scoring, cal))


@pytest.mark.slow
def test_score_job_writes_heatmaps_at_scored_resolution(tmp_path, tiled_checkpoint, ray_local):
    from jobs.score import METADATA_KEY, score

    rng = np.random.default_rng(4)
    paths = _write_parts(tmp_path / "in", 3, rng, size=(60, 200)) + _write_parts(tmp_path / "in", 2, rng, True, (90, 50))
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    summary = score([str(tmp_path / "in")], tiled_checkpoint, str(tmp_path / "out"), batch_size=2, progress=False)
    assert (summary.scored, summary.errors) == (5, 1)
    table = pq.read_table(tmp_path / "out")
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    assert meta["tiled"] is True and meta["scale"] == 0.5 and meta["img_size"] == TILE
    ckpt = load_checkpoint(tiled_checkpoint)
    scorer = ckpt.scorer(amp=False)
    rows = {r["path"]: r for r in table.to_pylist()}
    for p in paths:
        row = rows[p]
        x, (w, h) = decode_for(p, ckpt.model_config)
        assert (row["width"], row["height"]) == (w, h)
        heatmap = np.asarray(Image.open(io.BytesIO(row["heatmap_png"])))
        assert heatmap.shape == x.shape[1:] == (round(h * 0.5), round(w * 0.5))
        expected = scorer.score_images([torch.from_numpy(x)])
        assert row["image_score"] == pytest.approx(float(expected.image_scores[0]), rel=1e-4, abs=1e-5)
    assert "broken.png" in rows[str(tmp_path / "in" / "broken.png")]["error"]


@pytest.mark.slow
def test_ray_train_job_trains_on_crops_of_non_square_images(tmp_path, ray_local):
    from jobs.train import train

    rng = np.random.default_rng(5)
    root = tmp_path / "data"
    _write_parts(root / "train" / "good", 14, rng, size=(40, 110))
    _write_parts(root / "test" / "good", 1, rng, size=(40, 110))
    cfg = ModelConfig(width=4, channels=1, img_size=TILE, tiled=True)
    result = train(str(root), str(tmp_path / "run"), model_config=cfg,
                   cfg=TrainConfig(epochs=2, batch_size=4, lr=1e-3, val_fraction=0.25, min_calibration_images=2),
                   workers=1)
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert all(np.isfinite(row["loss"]) for row in result.history)
    ckpt = load_checkpoint(result.best)
    assert ckpt.model_config.tiled and ckpt.calibration.n_images == result.n_val
    x, _ = decode_for(str(root / "test" / "good" / "part_000.png"), ckpt.model_config)
    assert ckpt.scorer(amp=False).score_images([torch.from_numpy(x)]).heatmaps[0].shape == (40, 110)
