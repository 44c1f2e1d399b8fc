"""Dataset layouts (MVTec AD, OCT2017, plain folders), image decoding and resizing.

Everything here turns files into arrays: `load_layout` finds the images and their labels and masks,
`decode_image` / `decode_mask` turn one file (or its bytes) into a float / bool array, and
`ImageDataset` / `load_images` / `load_masks` stack many of them for training and evaluation.

Any problem a user can cause with their data raises `DataError` with one sentence that names the file or
folder and says what to do.

The layouts also read remote folders: pass an fsspec filesystem as `fs` (e.g. s3fs) and paths in its own
form ("bucket/prefix"); the paths returned are then in that form too, ready for the same filesystem.

    >>> split = load_layout("../shared/data/mvtec_bottle", "mvtec")
    >>> len(split.train), len(split.test), split.has_masks
    (209, 83, True)
    >>> x = load_images(split.train[:4], size=128)            # (4, 3, 128, 128) float32 in [0, 1]
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")

# Decompression-bomb guard: an image whose header claims more pixels than this is refused before any pixel
# is decoded. Raise it (ssm.data.MAX_IMAGE_PIXELS = ...) for genuinely huge images.
MAX_IMAGE_PIXELS: int = 100_000_000

LAYOUTS = ("mvtec", "oct2017", "folder")

# ITU-R 601-2 luma, the weights PIL itself uses for RGB -> L.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# What PIL raises for files it cannot read: unknown format (UnidentifiedImageError is an OSError),
# truncated data (OSError), broken chunks (SyntaxError, struct.error, EOFError), bad values (ValueError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

# Reduce-on-load: an image the model will shrink anyway is decoded reduced (JPEG: DCT scaling in the decoder,
# Image.draft; other formats: Image.reduce, a box filter on the 8-bit pixels, before the float conversion)
# to no less than this many times the target size; the antialiased resize does the rest. Images that need
# less shrinking than this, or have at most REDUCE_FROM_PIXELS pixels, take exactly the unreduced path (so
# the usual datasets decode as they always did; unreduced decoding peaks at 28 (RGB) to 32 (RGBA) bytes a
# pixel, reduced at 8 or less: benchmarks/decode_memory.py).
REDUCING_GAP = 2.0
REDUCE_FROM_PIXELS = 1 << 22
# Modes Image.reduce averages correctly: RGBA and LA are premultiplied first (RGBa, La) so the average is
# that of the pixels composited onto black; palette and 1-bit images are converted first, I;16 is not reduced.
_REDUCIBLE = {"L": "L", "RGB": "RGB", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "RGBA": "RGBa",
              "LA": "La", "RGBa": "RGBa", "La": "La", "I": "I", "F": "F", "1": "L"}
_ORIENTATION = 0x0112  # the EXIF tag; 5-8 swap width and height


class DataError(ValueError):
    """A problem with the user's data or data flags; the message names the path and what to do."""


# ----------------------------------------------------------------------------------------------------------
# Decoding


def _open_source(source: str | os.PathLike | bytes, name: str | None) -> tuple[object, str]:
    """Return something PIL can open, and the name to use in error messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<image bytes>"
        if len(source) == 0:
            raise DataError(f"{label}: the image data is empty (0 bytes); re-export or remove the file.")
        return io.BytesIO(bytes(source)), label
    path = os.fspath(source)
    label = name or path
    if not os.path.isfile(path):
        raise DataError(f"{label}: file not found; check the path.")
    if os.path.getsize(path) == 0:
        raise DataError(f"{label}: the file is empty (0 bytes); re-export or remove it.")
    return path, label


def _to_float(im: Image.Image, label: str, fmt: str | None = None) -> np.ndarray:
    """Pixels of a loaded PIL image as float32 (H, W, C) in [0, 1], C = 1 or 3; `fmt` the file's format.

    Alpha is dropped by compositing onto black (colour * alpha), so fully transparent pixels read as 0.
    """
    mode = im.mode
    if mode == "P" or mode == "PA":
        # Palette images: expand the palette; keep transparency so it is composited like RGBA.
        im = im.convert("RGBA" if (mode == "PA" or "transparency" in im.info) else "RGB")
        mode = im.mode
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        im = im.convert("RGB")
        mode = "RGB"
    if mode == "1":
        im = im.convert("L")
        mode = "L"

    if mode in ("L", "RGB", "LA", "RGBA", "La", "RGBa"):
        a = np.asarray(im, dtype=np.float32)
        a /= 255.0  # in place: a large image holds one float copy, not two
        if a.ndim == 2:
            a = a[:, :, None]
        if mode in ("LA", "RGBA"):  # straight alpha: composite onto black
            a = a[:, :, :-1] * a[:, :, -1:]
        elif mode in ("La", "RGBa"):  # already premultiplied
            a = a[:, :, :-1]
        return a
    if mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float32) / 65535.0
        return np.clip(a, 0.0, 1.0)[:, :, None]
    if mode == "I":
        # PNG holds at most 16 bits per sample, even when PIL widens it to 32-bit 'I'.
        full_scale = 65535.0 if (fmt or im.format) == "PNG" else float(2**31 - 1)
        a = np.asarray(im).astype(np.float64) / full_scale
        return np.clip(a, 0.0, 1.0).astype(np.float32)[:, :, None]
    if mode == "F":
        return np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)[:, :, None]
    raise DataError(f"{label}: unsupported image mode {mode!r}; convert the image to RGB or grayscale.")


def _resize(a: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize float (H, W, C) to (height, width, C) with PIL bilinear (antialiased when shrinking).

    Each channel goes through PIL's 32-bit float mode, so 16-bit sources keep their precision.
    """
    if a.shape[0] == height and a.shape[1] == width:
        return a
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(a[:, :, c]), mode="F").resize((width, height), Image.BILINEAR))
        for c in range(a.shape[2])
    ]
    return np.clip(np.stack(channels, axis=2), 0.0, 1.0)


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(width, height) resized by `scale`, aspect ratio kept, at least 1 px each."""
    return max(1, round(width * scale)), max(1, round(height * scale))


def _reduce(im: Image.Image, fx: int, fy: int) -> Image.Image:
    """`im` shrunk by integer factors with a box filter (Image.reduce), in a mode where averaging is right;
    unchanged for modes it cannot average (I;16)."""
    mode = _REDUCIBLE.get(im.mode)
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA" if (im.mode == "PA" or "transparency" in im.info) else "RGB")
        mode = _REDUCIBLE[im.mode]
    if mode is None or (fx, fy) == (1, 1):
        return im
    return (im if im.mode == mode else im.convert(mode)).reduce((fx, fy))


def decode_image(
    source: str | os.PathLike | bytes,
    channels: int = 3,
    size: int | None = None,
    name: str | None = None,
    scale: float | None = None,
    *,
    frames: bool = False,
):
    """Decode an image file or its bytes to float32 (channels, size, size) in [0, 1].

    Returns the array and the ORIGINAL (width, height) as a viewer shows it; with frames=True also the
    number of frames in the file (multi-frame GIF, TIFF, WebP, APNG: frame 0 is the one decoded). With
    `size` None the array keeps the image's aspect ratio: its original height and width, or both
    multiplied by `scale` when given.
    EXIF orientation is applied first (ImageOps.exif_transpose): pixels, width and height are upright.
    An image of more than REDUCE_FROM_PIXELS pixels that will be shrunk by REDUCING_GAP or more is decoded
    reduced (JPEG draft mode, else Image.reduce on the 8-bit pixels), which bounds the memory it takes.
    8-bit modes are scaled by 255, 16-bit integer modes by 65535, 32-bit integer by 2**31 - 1; float images
    are clipped to [0, 1]. Palette and CMYK images become RGB; alpha is dropped by compositing onto black.
    channels=3 repeats a grayscale image to three channels; channels=1 turns colour into luma (ITU-R 601-2).

    Raises DataError naming `name` (or the path) for an empty, missing, truncated, corrupt or non-image file,
    an unsupported mode, or a header claiming more than MAX_IMAGE_PIXELS pixels (checked before decoding).

        >>> x, (w, h) = decode_image("../shared/data/mvtec_bottle/train/good/000.png", size=128)
        >>> x.shape, x.dtype, (w, h)
        ((3, 128, 128), dtype('float32'), (256, 256))
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    fp, label = _open_source(source, name)
    try:
        with warnings.catch_warnings():
            # Our own header check below is the guard (PIL warns from about 89 M pixels, below our limit);
            # PIL's hard DecompressionBombError still becomes a DataError.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                width, height = im.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise DataError(
                        f"{label}: {width}x{height} is {width * height:,} pixels, more than the "
                        f"{MAX_IMAGE_PIXELS:,} allowed (a decompression-bomb guard); shrink the image or raise "
                        f"ssm.data.MAX_IMAGE_PIXELS."
                    )
                try:
                    n_frames = getattr(im, "n_frames", 1)
                except (*_DECODE_ERRORS, IndexError):  # later frames truncated: frame 0 may still decode
                    n_frames = 1
                if n_frames > 1 or im.tell():
                    im.seek(0)
                fmt = im.format
                # The size the model takes, in the file's own orientation (the same either way round: a
                # square, or the image scaled with its aspect ratio kept).
                if size is not None:
                    target = (size, size)
                elif scale is not None and scale < 1.0:
                    target = scaled_size(width, height, scale)
                else:
                    target = None
                if width * height <= REDUCE_FROM_PIXELS:
                    target = None
                if target is not None and fmt in ("JPEG", "MPO"):  # MPO: cameras' multi-picture JPEG
                    wanted = (round(target[0] * REDUCING_GAP), round(target[1] * REDUCING_GAP))
                    if min(im.width // wanted[0], im.height // wanted[1]) >= 2:
                        im.draft(im.mode, wanted)
                im.load()
                try:  # after load: PNG finds its EXIF anywhere in the file
                    orientation = im.getexif().get(_ORIENTATION, 1)
                except _DECODE_ERRORS:  # broken EXIF does not make the pixels unreadable
                    orientation = 1
                if target is not None:
                    im = _reduce(im, max(1, int(im.width / target[0] / REDUCING_GAP)),
                                 max(1, int(im.height / target[1] / REDUCING_GAP)))
                if orientation in (5, 6, 7, 8):
                    width, height = height, width  # as a viewer shows it
                if orientation in (2, 3, 4, 5, 6, 7, 8):
                    im = ImageOps.exif_transpose(im)
                a = _to_float(im, label, fmt)
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(f"{label}: refused as a possible decompression bomb ({e}); shrink the image.") from e
    except _DECODE_ERRORS as e:
        raise DataError(
            f"{label}: cannot be decoded as an image ({type(e).__name__}: {e}); the file is truncated, corrupt "
            f"or not an image: replace or remove it."
        ) from e

    if size is not None:
        a = _resize(a, size, size)
    elif scale is not None and scale != 1.0:
        a = _resize(a, *scaled_size(width, height, scale))
    if channels == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif channels == 1 and a.shape[2] == 3:
        a = (a @ _LUMA)[:, :, None]
    a = np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32)
    return (a, (width, height), n_frames) if frames else (a, (width, height))


def decode_for(source: str | os.PathLike | bytes, model_config, name: str | None = None, *, frames: bool = False):
    """`decode_image` as the model expects its input: the whole image resized to img_size x img_size, or
    for a tiled model (ModelConfig.tiled) the image resized by ModelConfig.scale with its aspect ratio kept."""
    if model_config.tiled:
        return decode_image(source, model_config.channels, None, name, model_config.scale, frames=frames)
    return decode_image(source, model_config.channels, model_config.img_size, name, frames=frames)


def decode_mask(
    source: str | os.PathLike | bytes, size: int | tuple[int, int] | None, name: str | None = None
) -> np.ndarray:
    """Decode a ground-truth mask to bool: any nonzero pixel is anomalous.

    `size`: an int for (size, size), (height, width), or None to keep the mask's own resolution. Resized
    with nearest neighbour so the mask stays binary.
    """
    a, _ = decode_image(source, channels=1, size=None, name=name)
    height, width = (size, size) if isinstance(size, int) else size or a.shape[1:]
    binary = Image.fromarray((a[0] > 0).astype(np.uint8) * 255, mode="L")
    if binary.size != (width, height):
        binary = binary.resize((width, height), Image.NEAREST)
    return np.asarray(binary) > 0


# ----------------------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class Sample:
    """One test image with its label (0 normal, 1 anomalous), ground-truth mask and category."""

    path: str
    label: int
    mask_path: str | None = None
    category: str = ""


@dataclass
class DatasetSplit:
    """Normal training images and labelled test samples, both sorted.

    `source` says where the training images came from and which normal images were held out for testing
    (see `_source`); training records it in the checkpoint so evaluation can test only what it never saw.
    """

    train: list[str]
    test: list[Sample]
    has_masks: bool
    source: dict | None = field(default=None, compare=False)


def _is_image(filename: str) -> bool:
    return not filename.startswith(".") and filename.lower().endswith(IMAGE_EXTENSIONS)


# `fs` below: None for local paths, or an fsspec filesystem (s3fs, ...) whose paths look like "bucket/key".


def _isdir(path: str, fs=None) -> bool:
    return os.path.isdir(path) if fs is None else fs.isdir(path)


def _isfile(path: str, fs=None) -> bool:
    return os.path.isfile(path) if fs is None else fs.isfile(path)


def _entries(root: str, fs=None) -> list[tuple[str, str, bool]]:
    """(name, path, is_folder) of each entry directly in `root`."""
    if fs is None:
        return [(e.name, e.path, e.is_dir()) for e in os.scandir(root)]
    listing = fs.ls(root, detail=True)
    return [(e["name"].rstrip("/").rsplit("/", 1)[-1], e["name"].rstrip("/"), e["type"] == "directory")
            for e in listing if e["name"].rstrip("/") != root.rstrip("/")]


def list_images(root: str, recursive: bool = True, fs=None) -> list[str]:
    """Image files under `root` (by extension, any case), hidden files and folders skipped, sorted."""
    if not _isdir(root, fs):
        raise DataError(f"{root}: folder not found; check the path.")
    found = []
    if recursive:
        for folder, subdirs, files in os.walk(root) if fs is None else fs.walk(root):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            found.extend(os.path.join(folder, f) for f in files if _is_image(f))
    else:
        found = [path for name, path, is_dir in _entries(root, fs) if not is_dir and _is_image(name)]
    return sorted(found)


def _subfolders(root: str, fs=None) -> list[str]:
    return sorted(name for name, _, is_dir in _entries(root, fs) if is_dir and not name.startswith("."))


def _require_dir(path: str, hint: str, fs=None) -> None:
    if not _isdir(path, fs):
        raise DataError(f"{path} not found: {hint}")


def _require_train(train: list[str], folder: str) -> list[str]:
    if not train:
        raise DataError(f"{folder}: no training images found (extensions {', '.join(IMAGE_EXTENSIONS)}); "
                        f"add normal images or point at the right folder.")
    return train


def _load_mvtec(root: str, fs=None) -> DatasetSplit:
    hint = "is this an MVTec AD category folder? use --layout oct2017 or --layout folder for other layouts."
    train_dir = os.path.join(root, "train", "good")
    test_dir = os.path.join(root, "test")
    gt_dir = os.path.join(root, "ground_truth")
    _require_dir(train_dir, hint, fs)
    _require_dir(test_dir, hint, fs)
    train = _require_train(list_images(train_dir, recursive=False, fs=fs), train_dir)
    has_masks = _isdir(gt_dir, fs)

    test = []
    for defect in _subfolders(test_dir, fs):
        for path in list_images(os.path.join(test_dir, defect), recursive=False, fs=fs):
            if defect == "good":
                test.append(Sample(path, 0, None, defect))
                continue
            mask_path = None
            if has_masks:
                mask_path = os.path.join(gt_dir, defect, Path(path).stem + "_mask.png")
                if not _isfile(mask_path, fs):
                    raise DataError(f"{mask_path} not found: every anomalous test image needs its mask "
                                    f"(for {path}); restore it or remove the ground_truth folder.")
            test.append(Sample(path, 1, mask_path, defect))
    return DatasetSplit(train, test, has_masks, _source("mvtec", root, [train_dir], [], train, train, 0.0, 0, fs))


def _load_oct2017(root: str, fs=None) -> DatasetSplit:
    hint = "is this an OCT2017 folder (train/NORMAL, test/<class>)? use --layout mvtec or --layout folder."
    train_dir = os.path.join(root, "train", "NORMAL")
    test_dir = os.path.join(root, "test")
    _require_dir(train_dir, hint, fs)
    _require_dir(test_dir, hint, fs)
    train = _require_train(list_images(train_dir, fs=fs), train_dir)
    test = [
        Sample(path, 0 if cls == "NORMAL" else 1, None, cls)
        for cls in _subfolders(test_dir, fs)
        for path in list_images(os.path.join(test_dir, cls), fs=fs)
    ]
    return DatasetSplit(train, test, False, _source("oct2017", root, [train_dir], [], train, train, 0.0, 0, fs))


def _images_without_masks(folder: str, fs=None) -> list[str]:
    """Images under `folder`, leaving out masks that sit beside their image.

    In a folder holding x.jpg and x.png (the magnetic-tile layout), or x.<ext> and x_mask.png, the png is
    x's mask, not an image of its own.
    """
    images = list_images(folder, fs=fs)
    by_stem: dict[tuple[str, str], list[str]] = {}
    for p in images:
        by_stem.setdefault((os.path.dirname(p), Path(p).stem), []).append(p)

    def is_mask(p: str) -> bool:
        if Path(p).suffix.lower() != ".png":
            return False
        stem = Path(p).stem
        siblings = by_stem[(os.path.dirname(p), stem)]
        if any(s != p for s in siblings):  # x.png beside x.jpg
            return True
        return stem.endswith("_mask") and (os.path.dirname(p), stem[: -len("_mask")]) in by_stem

    return [p for p in images if not is_mask(p)]


def _find_mask(image: str, mask_dir: str | None, fs=None) -> str | None:
    folder = mask_dir if mask_dir is not None else os.path.dirname(image)
    stem = Path(image).stem
    for candidate in (os.path.join(folder, stem + ".png"), os.path.join(folder, stem + "_mask.png")):
        if _isfile(candidate, fs) and os.path.abspath(candidate) != os.path.abspath(image):
            return candidate
    return None


def _split_key(path: str, root: str, seed: int) -> bytes:
    # A hash of (seed, path relative to root): the split is the same on every machine and numpy version,
    # and adding an image does not reshuffle the others.
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    return hashlib.blake2b(f"{seed}:{rel}".encode(), digest_size=16).digest()


# The share of normal images a folder layout holds out for testing when it has anomalous folders too (one
# mixed folder set). Normal folders alone are all for training: their test images are in other folders.
DEFAULT_TEST_FRACTION = 0.2


def _folder_images(root: str, normal_dirs: Sequence[str], abnormal_dirs: Sequence[str], mask_dir: str | None,
                   fs=None) -> tuple[list[tuple[str, str]], list[Sample], list[str], list[str]]:
    """Normal (path, category) pairs, anomalous samples, and the normal and anomalous folders, resolved."""
    if not normal_dirs:
        raise DataError("the folder layout needs at least one --normal-dir holding defect-free images.")

    def resolve(d: str, flag: str) -> str:
        path = d if os.path.isabs(d) else os.path.join(root, d)
        _require_dir(path, f"check {flag} {d} (absolute, or relative to {root}).", fs)
        return path

    if mask_dir is not None:
        mask_dir = resolve(mask_dir, "--mask-dir")

    normal_paths = [resolve(d, "--normal-dir") for d in normal_dirs]
    normals: list[tuple[str, str]] = []  # (path, category)
    for path in normal_paths:
        normals += [(p, Path(path).name) for p in _images_without_masks(path, fs)]
    if not normals:
        raise DataError(f"{', '.join(normal_dirs)}: no normal images found under {root}; check --normal-dir.")

    abnormal_paths = [resolve(d, "--abnormal-dir") for d in abnormal_dirs]
    abnormals: list[Sample] = []
    for path in abnormal_paths:
        category = Path(path).name
        abnormals += [Sample(p, 1, _find_mask(p, mask_dir, fs), category) for p in _images_without_masks(path, fs)]

    overlap = {p for p, _ in normals} & {s.path for s in abnormals}
    if overlap:
        raise DataError(f"{sorted(overlap)[0]} is under both a --normal-dir and an --abnormal-dir; "
                        f"make the folders disjoint.")
    return normals, abnormals, normal_paths, abnormal_paths


def _hold_out(normals: list[tuple[str, str]], root: str, test_fraction: float,
              seed: int) -> tuple[list[str], list[Sample]]:
    """Normal (path, category) pairs -> training paths and the `test_fraction` of them held out as test samples."""
    ranked = sorted(normals, key=lambda pc: _split_key(pc[0], root, seed))
    n_test = int(round(len(ranked) * test_fraction))
    return sorted(p for p, _ in ranked[n_test:]), [Sample(p, 0, None, c) for p, c in ranked[:n_test]]


def _files_hash(paths: Sequence[str], root: str) -> str:
    rel = sorted(os.path.relpath(p, root).replace(os.sep, "/") for p in paths)
    return hashlib.sha256("\n".join(rel).encode()).hexdigest()[:16]


def _where(path: str, fs=None) -> str:
    """A path as a checkpoint records it: absolute (links resolved) when local, a URI (s3://...) when remote."""
    return os.path.realpath(path) if fs is None else fs.unstrip_protocol(path)


def _source(layout: str, root: str, normal_dirs: Sequence[str], abnormal_dirs: Sequence[str], normals: Sequence[str],
            train: Sequence[str], test_fraction: float, seed: int, fs=None) -> dict:
    """Where the training images come from, for DatasetSplit.source: the folders, the split rule (the share of
    normal images held out for testing and its seed), and hashes of the normal and training file lists."""
    return {"layout": layout, "root": _where(root, fs), "normal_dirs": [_where(d, fs) for d in normal_dirs],
            "abnormal_dirs": [_where(d, fs) for d in abnormal_dirs], "test_fraction": test_fraction,
            "split_seed": seed, "n_normal": len(normals), "normal_hash": _files_hash(normals, root),
            "n_train": len(train), "train_hash": _files_hash(train, root)}


def _load_folder(
    root: str,
    normal_dirs: Sequence[str],
    abnormal_dirs: Sequence[str],
    mask_dir: str | None,
    test_fraction: float | None,
    seed: int,
    fs=None,
) -> DatasetSplit:
    if test_fraction is None:
        test_fraction = DEFAULT_TEST_FRACTION if abnormal_dirs else 0.0
    if normal_dirs and not 0.0 <= test_fraction < 1.0:
        raise DataError(f"--test-fraction must be in [0, 1) for training (some normal images must be left to "
                        f"train on), got {test_fraction}.")
    normals, abnormals, normal_paths, abnormal_paths = _folder_images(root, normal_dirs, abnormal_dirs, mask_dir, fs)
    train, held_out = _hold_out(normals, root, test_fraction, seed)
    train = _require_train(train, ", ".join(normal_dirs))
    test = sorted(held_out + abnormals, key=lambda s: s.path)
    has_masks = bool(abnormals) and all(s.mask_path is not None for s in abnormals)
    source = _source("folder", root, normal_paths, abnormal_paths, [p for p, _ in normals], train, test_fraction,
                     seed, fs)
    return DatasetSplit(train, test, has_masks, source)


def _require_root(root: str, fs=None) -> None:
    if not _isdir(root, fs):
        raise DataError(f"{root}: dataset folder not found; check the path.")


def load_layout(
    root: str,
    layout: str = "mvtec",
    *,
    normal_dirs: Sequence[str] = (),
    abnormal_dirs: Sequence[str] = (),
    mask_dir: str | None = None,
    test_fraction: float | None = None,
    seed: int = 0,
    fs=None,
) -> DatasetSplit:
    """Find the training and test images of a dataset laid out as `layout`.

    - "mvtec":   ROOT/train/good; ROOT/test/<defect> (label 0 iff defect is 'good');
                 masks ROOT/ground_truth/<defect>/<stem>_mask.png.
    - "oct2017": ROOT/train/NORMAL; ROOT/test/NORMAL is label 0, every other ROOT/test/<class> label 1.
    - "folder":  `normal_dirs` (split by `seed` into train and a `test_fraction` of test normals) and
                 `abnormal_dirs` (all test), searched recursively, relative to ROOT unless absolute.
                 `test_fraction` None: DEFAULT_TEST_FRACTION with `abnormal_dirs` (one mixed folder set),
                 0 without (normal folders for training, their test images elsewhere).
                 The mask of <stem>.<ext> is <stem>.png or <stem>_mask.png in `mask_dir` (default: the
                 image's own folder); a png beside a same-stem image is a mask, never an image.

    `fs`: an fsspec filesystem to read a remote root ("bucket/prefix" for s3fs); None for local folders.
    """
    root = os.fspath(root)
    _require_root(root, fs)
    if layout == "mvtec":
        return _load_mvtec(root, fs)
    if layout == "oct2017":
        return _load_oct2017(root, fs)
    if layout == "folder":
        return _load_folder(root, normal_dirs, abnormal_dirs, mask_dir, test_fraction, seed, fs)
    raise DataError(f"unknown layout {layout!r}: use --layout with one of {', '.join(LAYOUTS)}.")


def evaluation_split(
    root: str,
    layout: str = "mvtec",
    *,
    trained_on: dict | None = None,
    normal_dirs: Sequence[str] = (),
    abnormal_dirs: Sequence[str] = (),
    mask_dir: str | None = None,
    test_fraction: float | None = None,
    fs=None,
) -> tuple[DatasetSplit, str]:
    """The images to test a model on that was trained on `trained_on` (the DatasetSplit.source its checkpoint
    records), and a line saying which normal images they are.

    mvtec and oct2017 test their own test folders. The folder layout tests every anomalous image and
      - with `test_fraction`: that share of the normal images, held out as in training (1: all of them),
        whether or not the model trained on them (the user's override);
      - in the normal folders the model was trained from, unchanged: exactly the part held out then;
      - in normal folders the model never saw (by path): all of them;
      - otherwise (some are under its training folders, but not as the same split, or none was held out):
        a DataError naming --test-fraction, rather than metrics on images the model trained on.
    A checkpoint that records nothing (older ones) gets the rule training had then: 20 % held out, seed 0.
    """
    root = os.fspath(root)
    if layout != "folder":
        split = load_layout(root, layout, fs=fs)
        return split, f"the {layout} layout's test folders"
    _require_root(root, fs)
    if test_fraction is not None and not 0.0 <= test_fraction <= 1.0:
        raise DataError(f"--test-fraction must be in [0, 1], got {test_fraction}.")
    normals, abnormals, _, _ = _folder_images(root, normal_dirs, abnormal_dirs, mask_dir, fs)
    seed = (trained_on or {}).get("split_seed", 0)
    n = len(normals)
    if test_fraction is not None:
        _, held_out = _hold_out(normals, root, test_fraction, seed)
        note = f"{len(held_out)} of {n} (--test-fraction {test_fraction:g}), whether or not the model trained on them"
    elif trained_on is None:
        _, held_out = _hold_out(normals, root, DEFAULT_TEST_FRACTION, 0)
        note = f"{len(held_out)} of {n} (the checkpoint does not record its training images: the 20 % held out before)"
    else:
        train, held_out = _hold_out(normals, root, trained_on["test_fraction"], seed)
        folders = tuple(os.path.join(d, "") for d in trained_on["normal_dirs"])
        parents = {os.path.dirname(p) for p, _ in normals}
        under = {d: os.path.join(_where(d, fs), "").startswith(folders) for d in parents}
        seen = sum(under[os.path.dirname(p)] for p, _ in normals)  # images in the folders it was trained from
        same = seen == n and _files_hash(train, root) == trained_on["train_hash"]
        if same and held_out:
            note = f"the {len(held_out)} of {n} held out when the model was trained"
        elif seen:
            force = "or pass --test-fraction F to test a share F of them anyway (1: all)"
            raise DataError(
                f"{', '.join(normal_dirs)}: the model was trained on all of these normal images (none was held out); "
                f"test on folders it never saw, {force}." if same else
                f"{', '.join(normal_dirs)}: {seen} of these {n} normal images are in the folders the model was trained "
                f"from ({', '.join(trained_on['normal_dirs'])}), but not as the split it held out then; pass the "
                f"training run's own DATA and --normal-dir to test what it held out, test on folders it never saw, "
                f"{force}.")
        else:
            held_out = [Sample(p, 0, None, c) for p, c in normals]
            note = f"all {n} (folders the model never trained on)"
    test = sorted(held_out + abnormals, key=lambda s: s.path)
    has_masks = bool(abnormals) and all(s.mask_path is not None for s in abnormals)
    return DatasetSplit([], test, has_masks), "normal test images: " + note


# ----------------------------------------------------------------------------------------------------------
# Many images at once


class ImageDataset(torch.utils.data.Dataset):
    """Images as float32 tensors in [0, 1]: (channels, size, size), or tiles of a tiled model.

    Each decoded image is kept in memory as uint8 after its first read, so later epochs skip decoding
    (128 px RGB is 48 KiB an image); pass cache=False for datasets that do not fit. The first read returns
    the same quantised values as later ones, so every epoch sees identical inputs.

    With `tiled`, images keep their aspect ratio (resized by `scale`) and `crop` says what an item is:
    "random" a size x size crop drawn anew on every read (one per image per epoch, from a generator seeded
    by `seed`), "fixed" the same crop every time (for validation), None the whole image (shapes differ).
    """

    def __init__(self, paths: Sequence[str], size: int, channels: int = 3, cache: bool = True, *,
                 tiled: bool = False, scale: float = 1.0, crop: str | None = None, seed: int = 0):
        if crop not in (None, "random", "fixed"):
            raise ValueError(f"crop must be None, 'random' or 'fixed', got {crop!r}")
        self.paths = list(paths)
        self.size = size
        self.channels = channels
        self.cache = cache
        self.tiled, self.scale, self.crop, self.seed = tiled, scale, crop, seed
        self._rng = random.Random(seed)
        self._cached: dict[int, np.ndarray] = {}

    @classmethod
    def for_model(cls, paths: Sequence[str], model_config, crop: str | None = None, seed: int = 0, cache: bool = True):
        """The dataset of `paths` as `model_config` takes its input (whole images or tiles)."""
        return cls(paths, model_config.img_size, model_config.channels, cache, tiled=model_config.tiled,
                   scale=model_config.scale, crop=crop, seed=seed)

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self, index: int) -> np.ndarray:
        """The decoded image as uint8 (C, H, W), cached."""
        pixels = self._cached.get(index)
        if pixels is None:
            size = None if self.tiled else self.size
            a, _ = decode_image(self.paths[index], self.channels, size, scale=self.scale if self.tiled else None)
            pixels = np.round(a * 255.0).astype(np.uint8)
            if self.cache:
                self._cached[index] = pixels
        return pixels

    def __getitem__(self, index: int) -> torch.Tensor:
        x = torch.from_numpy(self.pixels(index))
        if self.tiled and self.crop is not None:
            from .tiling import random_crop

            rng = self._rng if self.crop == "random" else random.Random(f"{self.seed}:{index}")
            x = random_crop(x, self.size, rng)
        return x.float().div_(255.0)


def _progress(items: Sequence, enabled: bool, what: str):
    if not enabled:
        return items
    try:
        from tqdm import tqdm

        return tqdm(items, desc=what, unit="img")
    except ImportError:

        def report():
            step = max(1, len(items) // 20)
            for i, item in enumerate(items, 1):
                yield item
                if i % step == 0 or i == len(items):
                    print(f"{what}: {i}/{len(items)}", file=sys.stderr, flush=True)

        return report()


def load_images(paths: Sequence[str], size: int, channels: int = 3, progress: bool = False) -> torch.Tensor:
    """Decode and stack images into one (N, channels, size, size) float32 tensor in [0, 1]."""
    out = torch.empty((len(paths), channels, size, size), dtype=torch.float32)
    for i, path in enumerate(_progress(paths, progress, "loading images")):
        out[i] = torch.from_numpy(decode_image(path, channels, size)[0])
    return out


def load_masks(samples: Sequence[Sample], size: int) -> np.ndarray:
    """Ground-truth masks of `samples` as bool (N, size, size); all False for samples without a mask."""
    out = np.zeros((len(samples), size, size), dtype=bool)
    for i, sample in enumerate(samples):
        if sample.mask_path is not None:
            out[i] = decode_mask(sample.mask_path, size)
    return out
