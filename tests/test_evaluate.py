"""`ssm evaluate` end to end through the CLI, against metrics computed here independently.

The fixture: an MVTec-layout set of non-square 40 x 60 images with masks at that native size, and two tiny
untrained but calibrated checkpoints (32 px whole images, and 32 px tiles at scale 0.75). The expected values
come from the scorer's own outputs, upsampled here with PIL (not the torch path ssm uses) and scored with
scikit-learn.
"""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from cli import app
from ssm.calibration import calibrate
from ssm.checkpoint import load_checkpoint, save_checkpoint
from ssm.data import decode_for, load_layout
from ssm.metrics import aupro
from ssm.model import ModelConfig, SSMUNet
from ssm.scoring import Scorer, ScoringConfig

H, W = 40, 60  # the images' and masks' native size: non-square, not the model's 32 px


def _texture(rng) -> np.ndarray:
    """A rough texture: a defect is a flat patch in it, which even an untrained model's map picks out (its
    reconstruction has gradients where the image has none)."""
    coarse = rng.random((5, 7, 3)).astype(np.float32)
    shade = [np.asarray(Image.fromarray(coarse[..., c], "F").resize((W, H), Image.BICUBIC)) for c in range(3)]
    return np.clip(np.stack(shade, -1) * 0.3 + rng.random((H, W, 3)) * 0.5 + 0.1, 0, 1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    rng = np.random.default_rng(3)
    for folder in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (root / folder).mkdir(parents=True)
    save = lambda a, path: Image.fromarray((a * 255).round().astype(np.uint8)).save(path)  # noqa: E731
    for i in range(4):
        save(_texture(rng), root / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        save(_texture(rng), root / "test" / "good" / f"{i:03d}.png")
    for i in range(3):
        image, mask = _texture(rng), np.zeros((H, W), bool)
        top, left = 5 + 8 * i, 10 + 12 * i
        mask[top : top + 7, left : left + 3 + 4 * i] = True  # a small flat patch
        mask[30:32, 3:50] = i == 1  # and on one image a thin flat scratch
        image[mask] = 0.5
        save(image, root / "test" / "crack" / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    return root


def _checkpoint(root, path, config: ModelConfig) -> str:
    torch.manual_seed(0)
    model = SSMUNet(config).eval()
    scorer = Scorer(model, ScoringConfig())
    train = sorted((root / "train" / "good").glob("*.png"))
    images = [torch.from_numpy(decode_for(p, config)[0]) for p in train]
    cal = calibrate(scorer, [images if config.tiled else torch.stack(images)], min_images=len(images))  # a tiny fixture
    return str(save_checkpoint(path, model, config, scorer.config, cal))


@pytest.fixture(scope="module")
def checkpoints(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    return {
        "whole": _checkpoint(dataset, out / "whole", ModelConfig(width=4, img_size=32)),
        "tiled": _checkpoint(dataset, out / "tiled", ModelConfig(width=4, img_size=32, tiled=True, scale=0.75)),
    }


def _evaluate(dataset, checkpoint, *flags) -> dict:
    result = CliRunner().invoke(app, ["evaluate", str(dataset), "--checkpoint", checkpoint, "--json", *flags])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _expected(dataset, checkpoint) -> dict:
    """The metrics from the checkpoint's own scorer, independently upsampled (PIL) and scored (sklearn), at
    the masks' resolution and at the model's."""
    ckpt = load_checkpoint(checkpoint)
    split = load_layout(str(dataset), "mvtec")
    decoded = [decode_for(s.path, ckpt.model_config) for s in split.test]
    out = ckpt.scorer("cpu").score_images([torch.from_numpy(a) for a, _ in decoded])
    labels = np.array([s.label for s in split.test])
    return {"image_auroc": roc_auc_score(labels, out.image_scores.numpy()),
            "map_shape": tuple(out.heatmaps[0].shape),
            **{resolution: _pixel(split.test, out.heatmaps, resolution) for resolution in ("ground-truth", "model")}}


def _pixel(samples, heatmaps, resolution: str) -> dict:
    maps, masks = [], []
    for sample, heat in zip(samples, heatmaps):
        heat = heat.numpy()
        mask = np.zeros((H, W), bool) if sample.mask_path is None else np.asarray(Image.open(sample.mask_path)) > 0
        if resolution == "ground-truth":  # the map up to the mask's size
            heat = np.asarray(Image.fromarray(heat, "F").resize((W, H), Image.BILINEAR))
        else:  # the mask down to the map's size
            size = heat.shape[::-1]
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(size, Image.NEAREST)) > 0
        maps.append(heat)
        masks.append(mask)
    flat = lambda arrays: np.concatenate([a.reshape(-1) for a in arrays])  # noqa: E731
    return {"pixel_auroc": roc_auc_score(flat(masks), flat(maps)), "aupro": aupro(masks, maps)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["whole", "tiled"])
def test_pixel_metrics_at_the_masks_native_resolution(dataset, checkpoints, kind):
    got = _evaluate(dataset, checkpoints[kind])
    model_res = _evaluate(dataset, checkpoints[kind], "--pixel-resolution", "model")
    want = _expected(dataset, checkpoints[kind])
    # the model scored at its own resolution: 32 x 32, or the 0.75-scaled 30 x 45 image in tiles
    assert want["map_shape"] == ((32, 32) if kind == "whole" else (30, 45))
    assert got["pixel_resolution"] == "ground-truth" and got["precision"] == "float32"
    assert (got["n_test"], got["n_anomalous"]) == (5, 3)
    assert got["image_auroc"] == pytest.approx(want["image_auroc"], abs=1e-9)
    # PIL's float32 bilinear and ssm's torch one agree to rounding: at most a few tied pairs may swap
    assert got["pixel_auroc"] == pytest.approx(want["ground-truth"]["pixel_auroc"], abs=1e-5)
    assert got["aupro"] == pytest.approx(want["ground-truth"]["aupro"], abs=1e-5)
    assert 0.0 <= got["f1_max"] <= 1.0 and 0.0 <= got["accuracy_at_threshold"] <= 1.0

    # at the model's resolution only when asked; the figures differ
    assert model_res["pixel_resolution"] == "model"
    assert model_res["image_auroc"] == got["image_auroc"]
    assert model_res["pixel_auroc"] == pytest.approx(want["model"]["pixel_auroc"], abs=1e-6)
    assert model_res["aupro"] == pytest.approx(want["model"]["aupro"], abs=1e-6)
    assert abs(model_res["pixel_auroc"] - got["pixel_auroc"]) > 1e-3


def test_text_output_states_the_resolution_and_bad_flag_is_refused(dataset, checkpoints):
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(dataset), "--checkpoint", checkpoints["whole"]])
    assert result.exit_code == 0, result.output
    assert "pixel metrics at the ground-truth resolution; scored in float32" in result.output
    bad = runner.invoke(app, ["evaluate", str(dataset), "--checkpoint", checkpoints["whole"],
                              "--pixel-resolution", "native"])
    assert bad.exit_code == 2 and "--pixel-resolution" in bad.output


def test_demo_metrics_from_parquet_follow_the_same_protocol(dataset, tmp_path):
    """The demo's metrics read the scoring job's rows: 8-bit heatmap PNGs at the scored resolution (here 30 x
    45) and each image's original size; its pixel metrics are at the masks' 40 x 60, like `ssm evaluate`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.demo import metrics_from_scores

    split = load_layout(str(dataset), "mvtec")
    rng = np.random.default_rng(0)
    maps, pngs = [], []
    for sample in split.test:
        mask = np.zeros((H, W), bool) if sample.mask_path is None else np.asarray(Image.open(sample.mask_path)) > 0
        small = np.asarray(Image.fromarray(mask.astype(np.float32), "F").resize((45, 30), Image.BILINEAR))
        maps.append(np.clip(small * 120 + rng.random((30, 45)) * 160, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        Image.fromarray(maps[-1]).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    n = len(split.test)
    pq.write_table(pa.table({
        "path": [s.path for s in split.test][::-1], "image_score": [float(s.label) for s in split.test][::-1],
        "heatmap_png": pngs[::-1], "width": [W] * n, "height": [H] * n, "error": [None] * n,
    }), tmp_path / "part-0.parquet")
    got = metrics_from_scores(str(tmp_path), split.test, has_masks=True)
    assert got["pixel_resolution"] == "ground-truth" and got["image_auroc"] == 1.0
    want = _pixel(split.test, [torch.from_numpy(m.astype(np.float32)) for m in maps], "ground-truth")
    assert 0.6 < want["pixel_auroc"] < 0.99  # informative, not perfect
    assert got["pixel_auroc"] == pytest.approx(want["pixel_auroc"], abs=1e-5)
    assert got["aupro"] == pytest.approx(want["aupro"], abs=1e-5)
