"""The folder layout's splits: which normal images train, which test, and what the checkpoint remembers.

Small generated PNG folders; the CLI runs train in process (1 epoch, 32 px, width 8) and evaluates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ssm.data import DataError, evaluation_split, load_layout

SIZE = 32


def _images(folder: Path, n: int, seed: int, name: str = "img") -> list[str]:
    """n small stripe images with random phases, named <name>_NNN.png."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    paths = []
    for i in range(n):
        img = 0.5 + 0.4 * np.sin(xx * 0.6 + rng.uniform(0, 6.28)) * np.cos(yy * 0.3)
        path = folder / f"{name}_{i:03d}.png"
        Image.fromarray((np.repeat(img[..., None], 3, axis=2) * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def folders(tmp_path) -> Path:
    """Separate train and test folders, and a mixed set (normal + anomalous) under one root."""
    _images(tmp_path / "train" / "normal", 10, seed=0)
    _images(tmp_path / "test" / "normal", 6, seed=1)
    _images(tmp_path / "test" / "bad", 4, seed=2)
    _images(tmp_path / "mixed" / "good", 15, seed=3)
    _images(tmp_path / "mixed" / "bad", 5, seed=4)
    return tmp_path


def _normals(split) -> set[str]:
    return {s.path for s in split.test if s.label == 0}


# ---------------------------------------------------------------------------------------------------------
# Splits, without a model


def test_normal_folders_alone_are_all_for_training(folders):
    split = load_layout(str(folders), "folder", normal_dirs=["train/normal"])
    assert len(split.train) == 10 and split.test == []
    src = split.source
    assert src["layout"] == "folder" and src["test_fraction"] == 0.0 and src["n_train"] == src["n_normal"] == 10
    assert src["normal_dirs"] == [str(folders / "train" / "normal")] and src["abnormal_dirs"] == []


def test_a_mixed_folder_set_holds_out_a_fifth_of_its_normals(folders):
    split = load_layout(str(folders), "folder", normal_dirs=["mixed/good"], abnormal_dirs=["mixed/bad"])
    assert len(split.train) == 12 and len(_normals(split)) == 3 and len(split.test) == 3 + 5
    assert not set(split.train) & _normals(split)
    assert split.source["test_fraction"] == 0.2 and split.source["n_train"] == 12

    forced = load_layout(str(folders), "folder", normal_dirs=["mixed/good"], abnormal_dirs=["mixed/bad"],
                         test_fraction=0.4)
    assert len(forced.train) == 9 and len(_normals(forced)) == 6
    alone = load_layout(str(folders), "folder", normal_dirs=["train/normal"], test_fraction=0.3)
    assert len(alone.train) == 7 and len(alone.test) == 3
    with pytest.raises(DataError, match=r"--test-fraction must be in \[0, 1\)"):
        load_layout(str(folders), "folder", normal_dirs=["train/normal"], test_fraction=1.0)


def test_evaluation_tests_exactly_what_training_held_out(folders):
    kwargs = dict(normal_dirs=["mixed/good"], abnormal_dirs=["mixed/bad"])
    trained = load_layout(str(folders), "folder", **kwargs)
    split, note = evaluation_split(str(folders), "folder", trained_on=trained.source, **kwargs)
    assert _normals(split) == _normals(trained) and len(split.test) == 8
    assert "the 3 of 15 held out" in note
    # the same folders named by absolute paths
    absolute = dict(normal_dirs=[str(folders / "mixed" / "good")], abnormal_dirs=[str(folders / "mixed" / "bad")])
    assert evaluation_split(str(folders), "folder", trained_on=trained.source, **absolute)[0] == split

    # the training folders changed since (an image added): which ones were held out is lost, so it refuses
    _images(folders / "mixed" / "good", 1, seed=9, name="new")
    with pytest.raises(DataError, match=r"16 of these 16 normal images are in the folders the model was trained "
                                        r"from .*, but not as the split it held out.*--test-fraction F"):
        evaluation_split(str(folders), "folder", trained_on=trained.source, **kwargs)


def test_foreign_folders_are_tested_whole(folders):
    trained = load_layout(str(folders), "folder", normal_dirs=["train/normal"])
    split, note = evaluation_split(str(folders), "folder", trained_on=trained.source, normal_dirs=["test/normal"],
                                   abnormal_dirs=["test/bad"])
    assert len(_normals(split)) == 6 and len(split.test) == 10 and "all 6" in note


def test_refuses_training_images_unless_forced(folders):
    trained = load_layout(str(folders), "folder", normal_dirs=["train/normal"])
    with pytest.raises(DataError, match="trained on all of these normal images.*--test-fraction F"):
        evaluation_split(str(folders), "folder", trained_on=trained.source, normal_dirs=["train/normal"],
                         abnormal_dirs=["test/bad"])
    # a folder mixing training images with new ones is refused too
    with pytest.raises(DataError, match="10 of these 16 normal images are in the folders the model was trained from"):
        evaluation_split(str(folders), "folder", trained_on=trained.source, normal_dirs=["train", "test/normal"])

    split, note = evaluation_split(str(folders), "folder", trained_on=trained.source, normal_dirs=["train/normal"],
                                   abnormal_dirs=["test/bad"], test_fraction=1.0)
    assert len(_normals(split)) == 10 and "whether or not the model trained on them" in note
    half, _ = evaluation_split(str(folders), "folder", trained_on=trained.source, normal_dirs=["train/normal"],
                               test_fraction=0.5)
    assert len(half.test) == 5
    with pytest.raises(DataError, match=r"--test-fraction must be in \[0, 1\]"):
        evaluation_split(str(folders), "folder", trained_on=trained.source, normal_dirs=["test/normal"],
                         test_fraction=1.5)


def test_mvtec_training_folder_is_refused_and_old_checkpoints_keep_the_old_rule(folders):
    mvtec = folders / "mvtec"
    _images(mvtec / "train" / "good", 5, seed=5)
    _images(mvtec / "test" / "good", 2, seed=6)
    trained = load_layout(str(mvtec), "mvtec")
    assert trained.source["normal_dirs"] == [str(mvtec / "train" / "good")]
    with pytest.raises(DataError, match="trained on all of these normal images"):
        evaluation_split(str(mvtec), "folder", trained_on=trained.source, normal_dirs=["train/good"])
    split, note = evaluation_split(str(mvtec), "mvtec", trained_on=trained.source)
    assert split.test == trained.test and "mvtec" in note

    # a checkpoint that records nothing: the 20 % hold-out (seed 0) every folder-layout run had before
    old, note = evaluation_split(str(folders), "folder", normal_dirs=["train/normal"])
    assert _normals(old) == _normals(load_layout(str(folders), "folder", normal_dirs=["train/normal"],
                                                 test_fraction=0.2))
    assert len(old.test) == 2 and "does not record" in note


def test_remote_training_folders_are_recorded_as_uris(folders, s3_server):
    from jobs.train import training_split

    bucket = s3_server.make_bucket()
    client = s3_server.client()
    for f in (folders / "train" / "normal").iterdir():
        client.upload_file(str(f), bucket, f"data/normal/{f.name}")
    split = training_split(f"s3://{bucket}/data", "folder", ["normal"])
    assert len(split.train) == 10 and split.source["normal_dirs"] == [f"s3://{bucket}/data/normal"]
    # the local folder with the same files is another place: tested whole
    local, _ = evaluation_split(str(folders), "folder", trained_on=split.source, normal_dirs=["train/normal"])
    assert len(local.test) == 10


def test_resume_refuses_other_images_when_a_test_split_is_held_out(folders):
    from jobs.train import _check_same_images

    run = folders / "run"
    run.mkdir()
    kwargs = dict(normal_dirs=["mixed/good"], abnormal_dirs=["mixed/bad"])
    before = load_layout(str(folders), "folder", **kwargs).source
    (run / "job.json").write_text(json.dumps({"split": before}))
    _check_same_images(str(run), True, load_layout(str(folders), "folder", **kwargs).source)  # the same images
    with pytest.raises(ValueError, match=r"not the run's training images \(12 then, 9 now\).*--test-fraction"):
        _check_same_images(str(run), True, load_layout(str(folders), "folder", test_fraction=0.4, **kwargs).source)
    # a separate training folder that changed (an image fixed or removed) holds no test images: fine
    alone = load_layout(str(folders), "folder", normal_dirs=["train/normal"]).source
    (run / "job.json").write_text(json.dumps({"split": alone}))
    (folders / "train" / "normal" / "img_000.png").unlink()
    _check_same_images(str(run), True, load_layout(str(folders), "folder", normal_dirs=["train/normal"]).source)
    with pytest.raises(ValueError, match="not the run's training images"):
        _check_same_images(str(run), True, load_layout(str(folders), "folder", test_fraction=0.2,
                                                       normal_dirs=["train/normal"]).source)


# ---------------------------------------------------------------------------------------------------------
# The commands: train in process, evaluate


def _run(*args):
    from cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


# Two validation images: a rough calibration, accepted explicitly (the default minimum is 9).
MODEL = ["--img-size", SIZE, "--width", 8, "--epochs", 1, "--batch-size", 4, "--in-process", "--layout", "folder",
         "--val-fraction", 0.2, "--min-calibration-images", 2]


def _evaluate(data, run, *args):
    out = _run("evaluate", data, "--checkpoint", run, "--layout", "folder", "--json", *args)
    return out, (json.loads(out.output.strip().splitlines()[-1]) if out.exit_code == 0 else None)


@pytest.mark.slow
def test_train_on_a_train_folder_and_evaluate_on_a_test_folder(folders):
    out = _run("train", folders, "--out", folders / "run", "--normal-dir", "train/normal", *MODEL)
    assert out.exit_code == 0, out.output
    assert "on 8 images (2 normal images held out for validation" in out.output  # all 10, less the validation images
    assert "normal images held out for testing: none (all 10" in out.output
    from ssm.checkpoint import load_checkpoint

    data = load_checkpoint(folders / "run").meta["data"]
    assert data["n_train"] == 10 and data["test_fraction"] == 0.0
    assert data["normal_dirs"] == [str(folders / "train" / "normal")]

    out, result = _evaluate(folders, folders / "run", "--normal-dir", "test/normal", "--abnormal-dir", "test/bad")
    assert out.exit_code == 0, out.output
    assert (result["n_test"], result["n_anomalous"]) == (10, 4) and result["image_auroc"] is not None

    out, _ = _evaluate(folders, folders / "run", "--normal-dir", "train/normal", "--abnormal-dir", "test/bad")
    message = out.output.replace("\n", " ")
    assert out.exit_code == 2 and "trained on all of these normal images" in message and "--test-fraction F" in message
    out, result = _evaluate(folders, folders / "run", "--normal-dir", "train/normal", "--abnormal-dir", "test/bad",
                            "--test-fraction", 1)
    assert out.exit_code == 0, out.output
    assert (result["n_test"], result["n_anomalous"]) == (14, 4) and "whether or not" in result["tested"]


@pytest.mark.slow
def test_train_on_a_mixed_folder_set_and_evaluate_its_held_out_part(folders):
    dirs = ["--normal-dir", "mixed/good", "--abnormal-dir", "mixed/bad"]
    out = _run("train", folders, "--out", folders / "run", *dirs, *MODEL)
    assert out.exit_code == 0, out.output
    assert "on 10 images (2 normal images held out for validation" in out.output  # 15 normals, 3 kept for testing, 2 for validation
    assert "normal images held out for testing: 3 of 15" in out.output

    out = _run("evaluate", folders, "--checkpoint", folders / "run", "--layout", "folder", *dirs)
    assert out.exit_code == 0, out.output
    assert "test images 8 (5 anomalous)" in out.output and "the 3 of 15 held out" in out.output
    out, result = _evaluate(folders, folders / "run", *dirs, "--test-fraction", 0.4)
    assert (result["n_test"], result["n_anomalous"]) == (11, 5)  # 6 normals: 3 of them trained on


def test_test_fraction_flag_errors(folders):
    out = _run("train", folders, "--out", folders / "run", "--test-fraction", 0.1, "--in-process")
    assert out.exit_code == 2 and "--test-fraction applies to --layout folder only" in out.output
    out = _run("evaluate", folders, "--checkpoint", folders / "run", "--test-fraction", 1)
    assert out.exit_code == 2 and "--test-fraction applies to --layout folder only" in out.output
    out = _run("train", folders, "--out", folders / "run", "--normal-dir", "train/normal", *MODEL, "--test-fraction", 1)
    assert out.exit_code == 2 and "--test-fraction must be in [0, 1) for training" in out.output.replace("\n", " ")
    assert not (folders / "run").exists()
