"""Dataset layouts on the real shared data, decoding of every image mode, and the errors users meet."""

import collections
import io
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssm import data
from ssm.data import (
    DataError,
    ImageDataset,
    Sample,
    decode_image,
    decode_mask,
    list_images,
    load_images,
    load_layout,
    load_masks,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MVTEC = SHARED_DATA / "mvtec_bottle"
OCT = SHARED_DATA / "oct2017_tiny"
TILE = SHARED_DATA / "magnetic_tile"
TILE_DEFECTS = ["MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven"]


def needs(path: Path):
    return pytest.mark.skipif(not path.is_dir(), reason=f"shared dataset {path} is not present on this machine")


# ---------------------------------------------------------------------------------------------------------
# Layouts of the shared datasets


@needs(MVTEC)
def test_mvtec_layout_counts_and_masks():
    split = load_layout(str(MVTEC), "mvtec")
    assert len(split.train) == 209
    assert split.train == sorted(split.train)
    assert all(Path(p).parent == MVTEC / "train" / "good" for p in split.train)
    assert len(split.test) == 83
    assert collections.Counter(s.category for s in split.test) == {
        "good": 20, "broken_large": 20, "broken_small": 22, "contamination": 21}
    assert split.has_masks
    for s in split.test:
        assert s.label == (0 if s.category == "good" else 1)
        if s.label:
            assert s.mask_path == str(MVTEC / "ground_truth" / s.category / (Path(s.path).stem + "_mask.png"))
            assert os.path.isfile(s.mask_path)
        else:
            assert s.mask_path is None
    assert load_layout(str(MVTEC)) == split  # deterministic, and mvtec is the default layout


@needs(MVTEC)
def test_mvtec_masks_load_as_binary_and_cover_anomalies():
    split = load_layout(str(MVTEC))
    masks = load_masks(split.test, 64)
    assert masks.shape == (83, 64, 64) and masks.dtype == bool
    labels = np.array([s.label for s in split.test])
    assert not masks[labels == 0].any()
    assert masks[labels == 1].reshape(63, -1).any(axis=1).all()  # every defect image has anomalous pixels


@needs(OCT)
def test_oct2017_layout_counts():
    split = load_layout(str(OCT), "oct2017")
    assert len(split.train) == 5
    assert len(split.test) == 35
    assert collections.Counter((s.category, s.label) for s in split.test) == {
        ("NORMAL", 0): 5, ("CNV", 1): 10, ("DME", 1): 10, ("DRUSEN", 1): 10}
    assert not split.has_masks
    assert all(s.mask_path is None for s in split.test)


@needs(TILE)
def test_magnetic_tile_folder_layout():
    split = load_layout(str(TILE), "folder", normal_dirs=["MT_Free"], abnormal_dirs=TILE_DEFECTS)
    abnormal = [s for s in split.test if s.label == 1]
    normal_test = [s for s in split.test if s.label == 0]
    assert len(abnormal) == 392
    assert collections.Counter(s.category for s in abnormal) == {
        "MT_Blowhole": 115, "MT_Break": 85, "MT_Crack": 57, "MT_Fray": 32, "MT_Uneven": 103}
    assert len(split.train) + len(normal_test) == 952
    assert len(normal_test) == round(952 * 0.2)
    assert {s.category for s in normal_test} == {"MT_Free"}
    assert not set(split.train) & {s.path for s in normal_test}

    # The png beside each jpg is its mask, never an image of its own.
    every_image = split.train + [s.path for s in split.test]
    assert all(p.endswith(".jpg") for p in every_image)
    assert split.has_masks
    assert all(s.mask_path == s.path[: -len(".jpg")] + ".png" for s in abnormal)
    assert all(s.mask_path is None for s in normal_test)


@needs(TILE)
def test_folder_split_is_deterministic_and_follows_the_seed():
    kwargs = dict(normal_dirs=["MT_Free"], abnormal_dirs=["MT_Fray"])
    a = load_layout(str(TILE), "folder", seed=0, **kwargs)
    assert load_layout(str(TILE), "folder", seed=0, **kwargs) == a
    b = load_layout(str(TILE), "folder", seed=1, **kwargs)
    assert a.train != b.train and len(a.train) == len(b.train)
    # absolute paths work as well as paths relative to the root
    c = load_layout(str(TILE), "folder", normal_dirs=[str(TILE / "MT_Free")], abnormal_dirs=["MT_Fray"])
    assert c == a


# ---------------------------------------------------------------------------------------------------------
# Layouts built in tmp_path: masks, hidden files, errors


def _write(path: Path, size=(8, 8), mode="RGB", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode in ("L", "1") else (value,) * len(mode)).save(path)
    return path


def test_list_images_filters_extensions_skips_hidden_and_sorts(tmp_path):
    _write(tmp_path / "b.PNG")
    _write(tmp_path / "a.jpeg")
    _write(tmp_path / "sub" / "c.bmp")
    _write(tmp_path / ".hidden.png")
    _write(tmp_path / ".cache" / "d.png")
    (tmp_path / "notes.txt").write_text("not an image")
    names = [os.path.relpath(p, tmp_path) for p in list_images(str(tmp_path))]
    assert names == ["a.jpeg", "b.PNG", os.path.join("sub", "c.bmp")]
    assert [Path(p).name for p in list_images(str(tmp_path), recursive=False)] == ["a.jpeg", "b.PNG"]


def test_folder_layout_mask_dir_and_mask_suffix(tmp_path):
    for i in range(5):
        _write(tmp_path / "ok" / f"n{i}.png")
    _write(tmp_path / "bad" / "x.png")
    _write(tmp_path / "bad" / "x_mask.png", mode="L", value=255)  # beside its image: a mask, not an image
    _write(tmp_path / "bad2" / "y.bmp")
    _write(tmp_path / "masks" / "y.png", mode="L", value=255)

    split = load_layout(str(tmp_path), "folder", normal_dirs=["ok"], abnormal_dirs=["bad"], test_fraction=0.4)
    assert len(split.train) == 3 and len(split.test) == 3
    (x,) = [s for s in split.test if s.label == 1]
    assert x.path.endswith("x.png") and x.mask_path.endswith("x_mask.png") and x.category == "bad"
    assert split.has_masks

    split = load_layout(str(tmp_path), "folder", normal_dirs=["ok"], abnormal_dirs=["bad2"], mask_dir="masks")
    (y,) = [s for s in split.test if s.label == 1]
    assert y.mask_path == str(tmp_path / "masks" / "y.png")

    split = load_layout(str(tmp_path), "folder", normal_dirs=["ok"], abnormal_dirs=["bad2"])
    assert not split.has_masks  # y.bmp has no mask beside it


def test_mvtec_missing_mask_is_named(tmp_path):
    _write(tmp_path / "train" / "good" / "000.png")
    _write(tmp_path / "test" / "good" / "000.png")
    _write(tmp_path / "test" / "crack" / "000.png")
    (tmp_path / "ground_truth" / "crack").mkdir(parents=True)
    with pytest.raises(DataError, match="000_mask.png"):
        load_layout(str(tmp_path), "mvtec")


def test_layout_errors_name_the_path_and_what_to_do(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_layout(str(missing), "mvtec")

    with pytest.raises(DataError, match=r"train/good not found.*--layout"):
        load_layout(str(tmp_path), "mvtec")
    with pytest.raises(DataError, match=r"train/NORMAL not found"):
        load_layout(str(tmp_path), "oct2017")

    (tmp_path / "train" / "good").mkdir(parents=True)
    (tmp_path / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"train/good: no training images"):
        load_layout(str(tmp_path), "mvtec")

    with pytest.raises(DataError, match="unknown layout 'visa'"):
        load_layout(str(tmp_path), "visa")
    with pytest.raises(DataError, match="--normal-dir"):
        load_layout(str(tmp_path), "folder")
    with pytest.raises(DataError, match=r"elsewhere not found.*--normal-dir"):
        load_layout(str(tmp_path), "folder", normal_dirs=["elsewhere"])
    with pytest.raises(DataError, match="no normal images"):
        load_layout(str(tmp_path), "folder", normal_dirs=["train"])


# ---------------------------------------------------------------------------------------------------------
# Decoding every mode


def test_decode_rgb_keeps_values_and_reports_original_size(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "rgb.png")
    x, size = decode_image(tmp_path / "rgb.png")
    assert size == (10, 6)  # (width, height)
    assert x.dtype == np.float32 and x.shape == (3, 6, 10)
    np.testing.assert_allclose(x, a.transpose(2, 0, 1) / 255, atol=1e-7)

    x, size = decode_image(tmp_path / "rgb.png", size=4)
    assert size == (10, 6) and x.shape == (3, 4, 4)
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_decode_rgba_composites_onto_black(tmp_path):
    Image.new("RGBA", (4, 4), (200, 100, 50, 51)).save(tmp_path / "rgba.png")  # alpha 51 = 0.2
    x, _ = decode_image(tmp_path / "rgba.png")
    np.testing.assert_allclose(x[:, 0, 0], np.array([200, 100, 50]) / 255 * 0.2, atol=1e-6)


def test_decode_grayscale_repeats_or_stays_single_channel(tmp_path):
    Image.new("L", (5, 5), 51).save(tmp_path / "l.png")
    x3, _ = decode_image(tmp_path / "l.png", channels=3)
    x1, _ = decode_image(tmp_path / "l.png", channels=1)
    assert x3.shape == (3, 5, 5) and x1.shape == (1, 5, 5)
    np.testing.assert_allclose(x3, 0.2, atol=1e-7)
    np.testing.assert_allclose(x1, 0.2, atol=1e-7)


def test_decode_colour_to_one_channel_is_luma(tmp_path):
    Image.new("RGB", (3, 3), (255, 0, 0)).save(tmp_path / "red.png")
    x, _ = decode_image(tmp_path / "red.png", channels=1)
    np.testing.assert_allclose(x, 0.299, atol=1e-6)


def test_decode_palette_expands_to_rgb(tmp_path):
    im = Image.new("P", (4, 2))
    im.putpalette([0, 0, 0, 255, 128, 0] + [0] * (256 * 3 - 6))
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    x, _ = decode_image(tmp_path / "p.png")
    np.testing.assert_allclose(x[:, 0, 1], [1.0, 128 / 255, 0.0], atol=1e-6)
    np.testing.assert_allclose(x[:, 0, 0], 0.0)


def test_decode_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    x, _ = decode_image(tmp_path / "cmyk.jpg")
    np.testing.assert_allclose(x[:, 8, 8], [1.0, 0.0, 0.0], atol=0.05)  # JPEG is lossy


def test_decode_16_bit_png_scales_by_65535_and_keeps_precision_when_resized(tmp_path):
    a = np.array([[0, 1000, 30000, 65535]] * 4, dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I;16")
    x, _ = decode_image(tmp_path / "i16.png", channels=1)
    np.testing.assert_allclose(x[0], a / 65535, atol=1e-7)

    big_endian = Image.frombytes("I;16B", (4, 4), a.astype(">u2").tobytes())
    big_endian.save(tmp_path / "i16b.tiff")
    assert Image.open(tmp_path / "i16b.tiff").mode == "I;16B"
    x, _ = decode_image(tmp_path / "i16b.tiff", channels=1)
    np.testing.assert_allclose(x[0], a / 65535, atol=1e-7)

    # A flat 16-bit image whose value falls between two 8-bit steps survives resizing exactly.
    Image.fromarray(np.full((40, 30), 1000, np.uint16)).save(tmp_path / "flat16.png")
    x, _ = decode_image(tmp_path / "flat16.png", channels=3, size=16)
    np.testing.assert_allclose(x, 1000 / 65535, atol=1e-6)


def test_decode_one_bit_and_float_images(tmp_path):
    bits = np.zeros((4, 4), bool)
    bits[::2] = True
    Image.fromarray(bits).save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    x, _ = decode_image(tmp_path / "bits.png", channels=1)
    np.testing.assert_array_equal(x[0], bits.astype(np.float32))

    f = np.array([[-0.5, 0.25], [0.75, 2.0]], np.float32)
    Image.fromarray(f, mode="F").save(tmp_path / "f.tiff")
    x, _ = decode_image(tmp_path / "f.tiff", channels=1)
    np.testing.assert_allclose(x[0], [[0.0, 0.25], [0.75, 1.0]])


def test_decode_bytes_and_masks(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (10, 10), 0).save(buf, "PNG")
    x, size = decode_image(buf.getvalue(), size=4, name="mem.png")
    assert x.shape == (3, 4, 4) and size == (10, 10)

    m = np.zeros((10, 10), np.uint8)
    m[:5, :5] = 1  # any nonzero value is anomalous
    Image.fromarray(m).save(tmp_path / "mask.png")
    mask = decode_mask(tmp_path / "mask.png", 4)
    assert mask.dtype == bool and mask.shape == (4, 4)
    assert mask[:2, :2].all() and not mask[2:].any() and not mask[:, 2:].any()


# ---------------------------------------------------------------------------------------------------------
# Decoding errors


def _png_bytes(width=4, height=4):
    buf = io.BytesIO()
    Image.new("L", (width, height), 7).save(buf, "PNG")
    return buf.getvalue()


def _claim_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with an IHDR header claiming another size (pixel data untouched, CRC fixed)."""
    b = bytearray(png)
    b[16:24] = struct.pack(">II", width, height)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="zero-byte"),
        pytest.param(_png_bytes(64, 64)[:60], id="truncated-png"),
        pytest.param(b"this is a text file, not a picture\n", id="text-named-png"),
        pytest.param(_claim_size(_png_bytes(), 12_000, 9_000), id="header-over-our-limit"),
        pytest.param(_claim_size(_png_bytes(), 40_000, 40_000), id="header-over-pils-limit"),
    ],
)
def test_unreadable_files_raise_data_error_naming_them(tmp_path, content):
    path = tmp_path / "broken_image.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match="broken_image.png"):
        decode_image(path)
    with pytest.raises(DataError, match="given_name.png"):
        decode_image(content, name="given_name.png")


def test_pixel_limit_is_checked_from_the_header(tmp_path, monkeypatch):
    _write(tmp_path / "big.png", size=(20, 10))
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 199)
    with pytest.raises(DataError, match=r"big.png.*200 pixels.*MAX_IMAGE_PIXELS"):
        decode_image(tmp_path / "big.png")
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 200)
    assert decode_image(tmp_path / "big.png")[1] == (20, 10)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="absent.png"):
        decode_image(tmp_path / "absent.png")


# ---------------------------------------------------------------------------------------------------------
# Many images


def test_image_dataset_caches_decoded_images(tmp_path):
    paths = [str(_write(tmp_path / f"{i}.png", size=(12, 9), value=40 * i)) for i in range(3)]
    ds = ImageDataset(paths, size=8, channels=1)
    assert len(ds) == 3
    first = ds[2]
    assert first.dtype == torch.float32 and first.shape == (1, 8, 8)
    torch.testing.assert_close(first, torch.full((1, 8, 8), 80 / 255))
    os.remove(paths[2])
    torch.testing.assert_close(ds[2], first)  # served from memory, file not read again

    Path(paths[1]).write_bytes(b"garbage")
    with pytest.raises(DataError, match="1.png"):
        ds[1]


def test_load_images_stacks_and_load_masks_fills_missing(tmp_path):
    paths = [str(_write(tmp_path / f"{i}.png", size=(7 + i, 5))) for i in range(3)]
    x = load_images(paths, size=6, channels=3, progress=True)
    assert x.shape == (3, 3, 6, 6) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.full_like(x, 128 / 255))

    mask = np.zeros((5, 5), np.uint8)
    mask[0, 0] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    masks = load_masks([Sample(paths[0], 0), Sample(paths[1], 1, str(tmp_path / "m.png"), "x")], 5)
    assert masks.shape == (2, 5, 5) and masks.dtype == bool
    assert not masks[0].any() and masks[1].sum() == 1 and masks[1, 0, 0]


def _encoded(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_images_decode_frame_zero_and_count_frames(fmt):
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    frames = [Image.new("RGB", (20, 10), c) for c in colours]
    raw = _encoded(frames[0], fmt, save_all=True, append_images=frames[1:])
    x, (w, h), n = decode_image(raw, 3, None, frames=True)
    assert (w, h, n) == (20, 10, 3) and x.shape == (3, 10, 20)
    assert x[0].mean() > 0.7 and x[1:].max() < 0.05  # frame 0 is the red one
    single = decode_image(_encoded(frames[1], fmt), 3, None, frames=True)
    assert single[2] == 1 and single[0][1].mean() > 0.7
    if fmt == "GIF":  # later frames cut off: frame 0 still decodes, as it did before frames were counted
        x, _, n = decode_image(raw[: len(raw) - 30], 3, None, frames=True)
        assert n == 1 and x[0].mean() > 0.7


@pytest.mark.parametrize("orientation, bright", [(1, "left"), (3, "right"), (6, "top"), (8, "bottom")])
def test_exif_orientation_is_applied_to_pixels_and_size(orientation, bright, monkeypatch):
    stored = np.zeros((20, 40), np.uint8)  # 40 wide, 20 high, the left quarter white
    stored[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = _encoded(Image.fromarray(stored), "JPEG", exif=exif, quality=95)
    x, (w, h) = decode_image(raw, 1, None)
    upright = (40, 20) if orientation in (1, 3) else (20, 40)
    assert (w, h) == upright and x.shape == (1, upright[1], upright[0])
    edges = {"left": x[0, :, :5], "right": x[0, :, -5:], "top": x[0, :5, :], "bottom": x[0, -5:, :]}
    assert {k for k, v in edges.items() if v.mean() > 0.9} == {bright}
    y, size = decode_image(raw, 1, None, scale=0.5)  # a tiled model's scale works on the upright image
    assert size == (w, h) and y.shape == (1, h // 2, w // 2)
    monkeypatch.setattr(data, "REDUCE_FROM_PIXELS", 0)  # decoded reduced (JPEG draft): still upright
    for fmt in ("JPEG", "PNG"):
        raw = _encoded(Image.fromarray(np.kron(stored, np.ones((8, 8), np.uint8))), fmt, exif=exif)
        y, size = decode_image(raw, 1, None, scale=1 / 16)
        assert size == (w * 8, h * 8) and y.shape == (1, h // 2, w // 2)
        assert y[0, :2].mean() > 0.9 if bright == "top" else y[0, :2].mean() < 0.9


def test_large_images_decode_reduced_close_to_the_full_decode(monkeypatch):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:360, 0:480] / 120.0
    smooth = np.stack([np.sin(xx * 3 + yy), np.cos(yy * 2), np.sin(xx + yy * 4)], -1) * 0.4 + 0.5
    rgb = np.clip(smooth * 255 + rng.normal(0, 3, smooth.shape), 0, 255).astype(np.uint8)
    rgba = np.dstack([rgb, np.full((360, 480), 128, np.uint8)])
    sources = {"png": _encoded(Image.fromarray(rgb), "PNG"),
               "jpeg": _encoded(Image.fromarray(rgb), "JPEG", quality=95),
               "rgba": _encoded(Image.fromarray(rgba), "PNG"),
               "palette": _encoded(Image.fromarray(rgb).convert("P"), "PNG")}
    for name, raw in sources.items():
        for kwargs in ({"size": 32}, {"size": None, "scale": 0.1}):
            full, size = decode_image(raw, 3, **kwargs)  # below REDUCE_FROM_PIXELS: decoded whole
            monkeypatch.setattr(data, "REDUCE_FROM_PIXELS", 0)
            reduced, size_r = decode_image(raw, 3, **kwargs)
            monkeypatch.undo()
            assert size == size_r == (480, 360) and reduced.shape == full.shape
            assert not np.array_equal(reduced, full), name  # the reduced path was taken
            assert np.abs(reduced - full).mean() < 0.01 and np.abs(reduced - full).max() < 0.1, name
    # No reduction when the model does not shrink the image by more than REDUCING_GAP: the same bytes out.
    monkeypatch.setattr(data, "REDUCE_FROM_PIXELS", 0)
    small = decode_image(sources["png"], 3, 128)[0]
    monkeypatch.undo()
    assert np.array_equal(small, decode_image(sources["png"], 3, 128)[0])
