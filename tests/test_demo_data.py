"""The demo dataset: MVTec AD layout, deterministic, and masks that mark exactly the altered pixels."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.demo_data import (
    ANOMALY_KINDS, PATCH_MIN_CHANGE, TEXTURES, add_anomaly, load_texture, make_demo_dataset, random_crop, to_rgb,
)

SMALL = dict(size=64, n_train=6, n_test_normal=4, n_test_anomalous=9)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("brick")
    return root, make_demo_dataset(str(root), seed=1, **SMALL)


def test_counts_and_layout(dataset):
    root, info = dataset
    assert info["counts"] == {
        "train/good": 6, "test/good": 4, "test/patch": 3, "test/scratch": 3, "test/blob": 3,
    }
    for rel, n in info["counts"].items():
        assert len(list((root / rel).glob("*.png"))) == n
    for kind in ANOMALY_KINDS:
        images = sorted((root / "test" / kind).glob("*.png"))
        masks = sorted((root / "ground_truth" / kind).glob("*.png"))
        assert [m.name for m in masks] == [i.stem + "_mask.png" for i in images]
    assert not (root / "ground_truth" / "good").exists()
    assert sum(len(v) for v in info["masks"].values()) == 9


def test_images_decode_as_rgb_and_masks_as_binary(dataset):
    root, info = dataset
    for path in root.rglob("*.png"):
        with Image.open(path) as im:
            assert im.size == (64, 64)
            array = np.asarray(im)
        if "ground_truth" in path.parts:
            assert set(np.unique(array)) <= {0, 255}
            # Visible but not huge: a few percent of the image.
            assert 0.002 < (array == 255).mean() < 0.15, path
        else:
            assert im.mode == "RGB"
            assert array.std() > 5, f"{path} looks flat"


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = make_demo_dataset(str(tmp_path / "a"), seed=3, **SMALL)
    b = make_demo_dataset(str(tmp_path / "b"), seed=3, **SMALL)
    c = make_demo_dataset(str(tmp_path / "c"), seed=4, **SMALL)
    files_a, files_b, files_c = (_files(Path(x["root"])) for x in (a, b, c))
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    assert files_a != files_c


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
@pytest.mark.parametrize("texture", ["brick", "grass", "gravel"])
def test_mask_is_exactly_the_changed_pixels(kind, texture):
    photo = load_texture(texture)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        clean = random_crop(photo, 128, rng)
        altered, mask = add_anomaly(clean, kind, rng, donor=load_texture("gravel"))
        assert mask.dtype == bool and mask.shape == clean.shape
        np.testing.assert_array_equal(mask, altered != clean)
        assert 0.003 < mask.mean() < 0.08
        # The defect is visible: the altered pixels move a lot on average, not by a level or two.
        assert np.abs(altered.astype(int) - clean)[mask].mean() > 10


@pytest.mark.parametrize("texture", TEXTURES)
def test_pasted_patches_never_blend_in(texture):
    # Same material over same material would often be invisible; every patch is redrawn until it shows.
    # Small crops are often flat: the patch still shows there (an early version gave up on 32 px crops).
    photo = load_texture(texture)
    for seed in range(40):
        rng = np.random.default_rng(seed)
        clean = random_crop(photo, 32 if seed % 2 else 48, rng)
        altered, mask = add_anomaly(clean, "patch", rng, donor=photo)
        assert np.abs(altered.astype(int) - clean)[mask].mean() >= PATCH_MIN_CHANGE


def test_a_patch_on_a_flat_image_is_refused_with_a_clear_error():
    flat = np.full((48, 48), 120, np.uint8)
    with pytest.raises(ValueError, match="no visible patch"):
        add_anomaly(flat, "patch", np.random.default_rng(0), donor=flat)


@pytest.mark.parametrize("texture", ["brick", "grass", "gravel"])
def test_tinting_keeps_the_mask_exact(texture):
    # Images are saved tinted RGB: a changed gray level must still change the RGB pixel.
    rng = np.random.default_rng(0)
    clean = random_crop(load_texture(texture), 64, rng)
    altered, mask = add_anomaly(clean, "blob", rng)
    clean_rgb, altered_rgb = np.asarray(to_rgb(clean, texture)), np.asarray(to_rgb(altered, texture))
    np.testing.assert_array_equal((clean_rgb != altered_rgb).any(axis=-1), mask)


def test_every_anomalous_image_has_a_non_empty_mask(dataset):
    root, info = dataset
    for kind in ANOMALY_KINDS:
        for image_path, mask_path in zip(info["test"][kind], info["masks"][kind], strict=True):
            assert Path(mask_path).name == Path(image_path).stem + "_mask.png"
            assert (np.asarray(Image.open(mask_path)) == 255).any()
    # Normal images have no ground truth at all (MVTec AD convention).
    assert sorted(p.name for p in (root / "ground_truth").iterdir()) == sorted(ANOMALY_KINDS)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="brick, grass, gravel"):
        make_demo_dataset(str(tmp_path / "x"), texture="marble")
    with pytest.raises(ValueError, match="size=1024"):
        make_demo_dataset(str(tmp_path / "y"), size=1024)


def test_the_mvtec_reader_finds_every_image_and_mask(dataset):
    from ssm.data import load_layout

    root, info = dataset
    split = load_layout(str(root), "mvtec")
    assert len(split.train) == 6 and split.has_masks
    anomalous = [s for s in split.test if s.label == 1]
    assert len(anomalous) == 9 and all(s.mask_path for s in anomalous)
    assert sorted(s.mask_path for s in anomalous) == sorted(sum(info["masks"].values(), []))
    assert sum(s.label == 0 for s in split.test) == 4


def test_demo_leaves_a_data_folder_it_did_not_make_alone(tmp_path):
    from jobs.demo import run_demo

    mine = tmp_path / "data" / "train" / "good" / "000.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"someone's image")
    with pytest.raises(ValueError, match="not generated by this demo"):
        run_demo(str(tmp_path), echo=lambda line: None)
    assert mine.read_bytes() == b"someone's image"
