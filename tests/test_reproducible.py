"""The same seed on the same machine gives the same weights and metrics; another seed gives other weights."""

import json

import pytest
import torch

from jobs.demo_data import make_demo_dataset
from ssm.checkpoint import load_checkpoint
from ssm.data import ImageDataset, load_layout
from ssm.model import ModelConfig
from ssm.training import TrainConfig, fit, split_train_val

TINY = ModelConfig(width=4, img_size=32)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _outcome(run_dir):
    """Weights, calibration and per-epoch metrics (timings left out) of a run's calibrated best checkpoint."""
    best = load_checkpoint(run_dir)
    history = json.loads((run_dir / "history.json").read_text())
    return best.state_dict, best.calibration.to_dict(), [{k: v for k, v in row.items() if k != "images_per_s"}
                                                         for row in history]


@pytest.fixture(scope="module")
def bricks(tmp_path_factory):
    root = tmp_path_factory.mktemp("bricks")
    make_demo_dataset(str(root), size=48, n_train=14, n_test_normal=1, n_test_anomalous=3)
    return root


def _fit(root, out, seed, model_config=TINY):
    train, val = split_train_val(load_layout(str(root), "mvtec").train, 0.2, seed)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, seed=seed, min_calibration_images=3)  # 3 of 14 validate
    fit(ImageDataset.for_model(train, model_config, crop="random", seed=seed),
        ImageDataset.for_model(val, model_config, crop="fixed", seed=seed), out, model_config, cfg, progress=False,
        calibration_data=ImageDataset.for_model(val, model_config) if model_config.tiled else None)
    return _outcome(out)


@pytest.mark.parametrize("model_config", [TINY, ModelConfig(width=4, img_size=32, tiled=True)], ids=["whole", "tiled"])
def test_fit_repeats_exactly_with_its_seed(bricks, tmp_path, model_config):
    first, again, other = (_fit(bricks, tmp_path / name, seed, model_config)
                           for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert _same_weights(first[0], again[0])
    assert first[1:] == again[1:]  # calibration and every epoch's losses
    assert not _same_weights(first[0], other[0])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_ray_train_repeats_exactly_with_its_seed(bricks, tmp_path, ray_local, workers):
    from jobs.train import train

    def run(name, seed):
        train(str(bricks), str(tmp_path / name), model_config=TINY,
              cfg=TrainConfig(epochs=2, batch_size=4, lr=1e-3, seed=seed, val_fraction=0.2, min_calibration_images=3),
              workers=workers)
        return _outcome(tmp_path / name)

    first, again = run("a", 0), run("b", 0)
    assert _same_weights(first[0], again[0])
    assert first[1:] == again[1:]
    if workers == 1:  # one run with another seed is enough to show the seed matters
        assert not _same_weights(first[0], run("c", 1)[0])
