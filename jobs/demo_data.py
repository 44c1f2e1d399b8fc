"""A small MVTec-AD-layout dataset cut from the texture photographs scikit-image ships.

Normal images are random crops of one texture photograph (brick, grass or gravel). Anomalous images are
crops with one synthetic defect, and every defect comes with its exact ground-truth mask:

    patch    a piece of another texture, or of the same texture at another scale, pasted in
    scratch  a thin bright or dark curve
    blob     a filled ellipse whose brightness and grain change, like a stain

Layout written under ROOT (the one `ssm.data` reads for MVTec AD):

    train/good/000.png ...
    test/good/000.png ...
    test/{patch,scratch,blob}/000.png ...
    ground_truth/{patch,scratch,blob}/000_mask.png     255 on every changed pixel, 0 elsewhere

Example:
    >>> info = make_demo_dataset("/tmp/brick", size=128)
    >>> info["counts"]["test/scratch"]
    10
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata
from skimage import draw, transform

TEXTURES = ("brick", "grass", "gravel")
ANOMALY_KINDS = ("patch", "scratch", "blob")

# The photographs are grayscale; a fixed tint per texture makes the crops look like the material.
# One channel stays at 1.0 so two different gray levels always give two different RGB pixels.
_TINT = {"brick": (1.0, 0.72, 0.6), "grass": (0.72, 1.0, 0.5), "gravel": (1.0, 0.96, 0.9)}


def load_texture(name: str) -> np.ndarray:
    """The scikit-image photograph `name` as a 512x512 uint8 grayscale array."""
    if name not in TEXTURES:
        raise ValueError(f"Unknown texture {name!r}: choose one of {', '.join(TEXTURES)}.")
    return np.asarray(getattr(skdata, name)(), dtype=np.uint8)


def random_crop(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size crop at a random place, with slight brightness and contrast jitter (uint8)."""
    y = rng.integers(0, texture.shape[0] - size + 1)
    x = rng.integers(0, texture.shape[1] - size + 1)
    crop = texture[y : y + size, x : x + size].astype(np.float32)
    gain, offset = rng.uniform(0.92, 1.08), rng.uniform(-8.0, 8.0)
    mean = crop.mean()
    return np.clip((crop - mean) * gain + mean + offset, 0, 255).round().astype(np.uint8)


def add_anomaly(
    image: np.ndarray, kind: str, rng: np.random.Generator, donor: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Alter a uint8 grayscale `image` with one defect of `kind`.

    `donor` is the texture photograph `patch` cuts its piece from (another texture, or the same one:
    the piece is rescaled either way). Returns the altered image and a boolean mask that is True
    exactly where the altered image differs from `image`.
    """
    size = image.shape[0]
    base = image.astype(np.float32)
    if kind == "patch":
        if donor is None:
            raise ValueError("add_anomaly(kind='patch') needs a donor texture to cut the patch from.")
        altered, region = _patch(base, rng, donor)
    elif kind == "scratch":
        altered, region = _scratch(base, rng)
    elif kind == "blob":
        altered, region = _blob(base, rng)
    else:
        raise ValueError(f"Unknown anomaly kind {kind!r}: choose one of {', '.join(ANOMALY_KINDS)}.")
    assert region.shape == (size, size) and region.any()

    out = np.where(region, np.clip(altered, 0, 255).round(), base).astype(np.uint8)
    # A defect pixel can land on its old value by chance; push those few off it so the mask is
    # exactly the set of changed pixels (a 6-level step is invisible next to the defect itself).
    unchanged = region & (out == image)
    out[unchanged] = np.where(image[unchanged] < 128, image[unchanged] + 6, image[unchanged] - 6)
    return out, region


# A pasted piece must change the pixels it covers by at least this much on average (gray levels): a piece of
# flat brick pasted over flat brick matches the surface and is no defect at all, not even to the eye.
PATCH_MIN_CHANGE = 24.0
_PATCH_TRIES = 50
_PATCH_MIN_CONTRAST = 32.0  # gray levels (standard deviation of the pasted piece, before jitter)


def _patch(base: np.ndarray, rng: np.random.Generator, donor: np.ndarray):
    """Paste a rectangle of foreign material, brightness matched so its texture is what differs.

    Placements whose piece would blend in (mean change under PATCH_MIN_CHANGE) are drawn again."""
    for _ in range(_PATCH_TRIES):
        altered, region = _patch_once(base, rng, donor)
        if np.abs(np.clip(altered, 0, 255).round() - base)[region].mean() >= PATCH_MIN_CHANGE:
            return altered, region
    raise ValueError(f"no visible patch in {_PATCH_TRIES} tries: the image or the donor texture is too flat")


def _patch_once(base: np.ndarray, rng: np.random.Generator, donor: np.ndarray):
    size = base.shape[0]
    h, w = (rng.uniform(0.2, 0.3, size=2) * size).astype(int)
    scale = rng.uniform(1.6, 2.5) if rng.random() < 0.5 else rng.uniform(0.4, 0.6)
    src_h = int(np.clip(h * scale, 2, donor.shape[0]))
    src_w = int(np.clip(w * scale, 2, donor.shape[1]))
    sy = rng.integers(0, donor.shape[0] - src_h + 1)
    sx = rng.integers(0, donor.shape[1] - src_w + 1)
    piece = donor[sy : sy + src_h, sx : sx + src_w].astype(np.float32)
    piece = transform.resize(piece, (h, w), order=1, preserve_range=True, anti_aliasing=True)
    y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    under = base[y : y + h, x : x + w]
    # The image's contrast, not the local one, and at least _PATCH_MIN_CONTRAST: over a flat spot, or on a
    # flat crop, a foreign texture should still show.
    contrast = max(float(base.std()), _PATCH_MIN_CONTRAST)
    piece = (piece - piece.mean()) / (piece.std() + 1e-6) * contrast * rng.uniform(0.8, 1.3)
    altered = base.copy()
    altered[y : y + h, x : x + w] = piece + under.mean()
    region = np.zeros(base.shape, bool)
    region[y : y + h, x : x + w] = True
    return altered, region


def _scratch(base: np.ndarray, rng: np.random.Generator):
    """A thin quadratic Bezier curve, 2-3 pixels wide, much brighter or darker than the surface."""
    size = base.shape[0]
    length = rng.uniform(0.35, 0.6) * size
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0.3, 0.7, size=2) * size
    dy, dx = np.sin(angle) * length / 2, np.cos(angle) * length / 2
    bend = rng.uniform(-0.25, 0.25, size=2) * length
    r0, c0, r2, c2 = cy - dy, cx - dx, cy + dy, cx + dx
    r1, c1 = cy + bend[0], cx + bend[1]
    region = np.zeros(base.shape, bool)
    rr, cc = draw.bezier_curve(
        *(int(round(v)) for v in (r0, c0, r1, c1, r2, c2)), weight=1.0, shape=base.shape
    )
    region[rr, cc] = True
    # 2 or 3 pixels wide: a 2x2 square or a 3x3 cross around every curve pixel.
    footprint = np.ones((2, 2), bool) if rng.random() < 0.5 else ndimage.generate_binary_structure(2, 1)
    region = ndimage.binary_dilation(region, structure=footprint)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    altered = base + sign * rng.uniform(70, 110) + rng.normal(0, 8, size=base.shape)
    return altered, region


def _blob(base: np.ndarray, rng: np.random.Generator):
    """A filled ellipse whose brightness shifts most at its centre, with added grain, like a stain."""
    size = base.shape[0]
    a, b = rng.uniform(0.09, 0.14, size=2) * size
    cy, cx = rng.uniform(0.2, 0.8, size=2) * size
    rotation = rng.uniform(-np.pi, np.pi)
    region = np.zeros(base.shape, bool)
    rr, cc = draw.ellipse(cy, cx, a, b, shape=base.shape, rotation=rotation)
    region[rr, cc] = True
    # Full change at the centre, half at the rim: soft-edged, yet every pixel inside changes.
    depth = ndimage.distance_transform_edt(region)
    falloff = 0.5 + 0.5 * depth / depth.max()
    sign = 1.0 if rng.random() < 0.35 else -1.0  # stains are more often dark
    altered = base + sign * rng.uniform(50, 80) * falloff + rng.normal(0, 12, size=base.shape)
    return altered, region


def to_rgb(gray: np.ndarray, texture: str) -> Image.Image:
    """Tint a uint8 grayscale crop with the texture's colour; distinct gray levels stay distinct."""
    lut = np.round(np.arange(256, dtype=np.float32)[:, None] * np.asarray(_TINT[texture], np.float32))
    return Image.fromarray(lut.astype(np.uint8)[gray])


def make_demo_dataset(
    root: str,
    size: int = 128,
    n_train: int = 80,
    n_test_normal: int = 20,
    n_test_anomalous: int = 30,
    seed: int = 0,
    texture: str = "brick",
) -> dict:
    """Write the dataset under `root` and return its counts and file paths.

    Anomalous test images cycle through patch, scratch, blob. Same arguments give the same bytes.
    Returns {"root", "texture", "size", "counts": {"train/good": n, "test/good": n, "test/patch": n, ...},
    "train": [paths], "test": {kind: [paths]}, "masks": {kind: [paths]}}.
    """
    photo = load_texture(texture)
    if not 32 <= size <= photo.shape[0]:
        raise ValueError(f"size={size} must be between 32 and {photo.shape[0]} (the photograph's side).")
    # Foreign patches come from the next texture in the list: a different material, same lighting.
    other = load_texture(TEXTURES[(TEXTURES.index(texture) + 1) % len(TEXTURES)])
    rng = np.random.default_rng(seed)
    root_path = Path(root)

    def save(gray: np.ndarray, rel: str) -> str:
        path = root_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        to_rgb(gray, texture).save(path)
        return str(path)

    train = [save(random_crop(photo, size, rng), f"train/good/{i:03d}.png") for i in range(n_train)]
    test: dict[str, list[str]] = {"good": []}
    masks: dict[str, list[str]] = {}
    for i in range(n_test_normal):
        test["good"].append(save(random_crop(photo, size, rng), f"test/good/{i:03d}.png"))
    for i in range(n_test_anomalous):
        kind = ANOMALY_KINDS[i % len(ANOMALY_KINDS)]
        n = len(test.setdefault(kind, []))
        crop = random_crop(photo, size, rng)
        # Half of the patches are foreign material, half the same material at another scale.
        donor = (other if rng.random() < 0.5 else photo) if kind == "patch" else None
        image, mask = add_anomaly(crop, kind, rng, donor)
        test[kind].append(save(image, f"test/{kind}/{n:03d}.png"))
        mask_path = root_path / "ground_truth" / kind / f"{n:03d}_mask.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        masks.setdefault(kind, []).append(str(mask_path))

    counts = {"train/good": len(train)} | {f"test/{k}": len(v) for k, v in test.items()}
    return {
        "root": str(root_path),
        "texture": texture,
        "size": size,
        "counts": counts,
        "train": train,
        "test": test,
        "masks": masks,
    }
