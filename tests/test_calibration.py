"""Calibration sanity: too few held-out normal images, or scores that do not vary, are refused."""

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ssm.calibration import MIN_CALIBRATION_IMAGES, CalibrationError, calibrate, check_calibration_size
from ssm.model import ModelConfig, SSMUNet
from ssm.scoring import Scorer, ScoringConfig
from ssm.training import TrainConfig, fit


def _images(n, seed=0, size=32):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    return torch.stack([torch.from_numpy(np.stack([0.5 + 0.4 * np.sin(xx * 0.5 + rng.uniform(0, 6.3)) *
                                                   np.cos(yy * 0.3 + rng.uniform(0, 6.3))] * 3)).float()
                        for _ in range(n)])


@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(0)
    return Scorer(SSMUNet(ModelConfig(width=4, img_size=32)), ScoringConfig())


def test_too_few_images_are_refused_with_the_number_needed(scorer):
    with pytest.raises(CalibrationError, match=f"at least {MIN_CALIBRATION_IMAGES} held-out normal images and the "
                                               "validation split has 2"):
        calibrate(scorer, [_images(2)])
    assert scorer.calibration is None  # nothing measured, nothing set
    cal = calibrate(scorer, [_images(MIN_CALIBRATION_IMAGES)])
    assert cal.n_images == MIN_CALIBRATION_IMAGES and cal.max_scale > 0 and cal.mse_scale > 0


def test_identical_images_give_a_degenerate_scale(scorer):
    same = _images(1).repeat(MIN_CALIBRATION_IMAGES, 1, 1, 1)
    with pytest.raises(CalibrationError, match="heatmap maximum barely varies over the 9 normal images"):
        calibrate(scorer, [same])


def test_advice_names_the_validation_fraction_that_is_enough():
    with pytest.raises(CalibrationError, match="raise --val-fraction from 0.1 to 0.57") as err:
        check_calibration_size(2, n_normal=16, val_fraction=0.1)
    assert "\n" not in str(err.value)
    assert round(16 * 0.57) >= MIN_CALIBRATION_IMAGES
    with pytest.raises(CalibrationError, match="no split leaves enough"):
        check_calibration_size(1, n_normal=10, val_fraction=0.1)
    check_calibration_size(2, minimum=2)  # a lowered minimum is honoured


def test_fit_refuses_before_training(tmp_path):
    x = _images(12)
    with pytest.raises(CalibrationError, match="validation split has 2"):
        fit(x[:10], x[10:], tmp_path / "run", ModelConfig(width=4, img_size=32), TrainConfig(epochs=1), progress=False)
    assert not (tmp_path / "run").exists()


def test_train_command_says_what_to_do(tmp_path):
    from cli import app

    for folder, images in (("train/good", _images(16)), ("test/good", _images(1, seed=1))):
        (tmp_path / "data" / folder).mkdir(parents=True)
        for i, img in enumerate(images):
            Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(
                tmp_path / "data" / folder / f"{i:03d}.png")
    out = CliRunner().invoke(app, ["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--in-process",
                                   "--img-size", "32", "--width", "4", "--epochs", "1"])
    assert out.exit_code == 2, out.output
    lines = [line for line in out.output.strip().splitlines() if not line.startswith("train: 0/1 epochs")]
    assert len(lines) == 1 and "validation split has 2 (of 16 normal images, --val-fraction 0.1)" in lines[0], lines
    assert "raise --val-fraction from 0.1 to 0.57" in lines[0]
    assert not (tmp_path / "run").exists()
    out = CliRunner().invoke(app, ["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--in-process",
                                   "--img-size", "32", "--width", "4", "--epochs", "1", "--batch-size", "4",
                                   "--val-fraction", "0.57"])
    assert out.exit_code == 0, out.output
    assert "(9 normal images held out for validation and calibration)" in out.output
