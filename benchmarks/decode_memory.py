"""Peak memory of decoding one large image, in bytes per image pixel, measured in a fresh process.

Each case runs `ssm.data.decode_for` on a generated PNG (RGB and RGBA) and JPEG in a subprocess and reports the rise of
the process's peak resident memory (VmHWM in /proc/self/status, Linux) over what it held just before decoding (the
imports and the file's bytes, which the scoring job holds too). Cases: a model that takes 256 x 256
images (decoded reduced), a tiled model at scale 0.5 (reduced), at scale 1 (no reduction possible), and
the 256 x 256 model with reduction switched off (ssm.data.REDUCE_FROM_PIXELS raised), as decoding was
before reduce-on-load.

    PYTHONPATH=. python benchmarks/decode_memory.py --megapixels 36
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys
import ssm.data as data
from ssm.model import ModelConfig
path, tile, scale, reduce = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
if not reduce:
    data.REDUCE_FROM_PIXELS = 1 << 62
cfg = ModelConfig(width=4, img_size=256) if tile == 0 else ModelConfig(width=4, img_size=tile, tiled=True, scale=scale)
def hwm():  # this process's peak resident memory in bytes (unlike ru_maxrss, not inherited across exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
raw = open(path, "rb").read()
before = hwm()
x, (w, h) = data.decode_for(raw, cfg)
print(json.dumps({"rise": hwm() - before, "pixels": w * h, "shape": list(x.shape)}))
"""

CASES = [  # (label, tile, scale, reduce)
    ("256x256 model", 0, 1.0, True),
    ("tiled, scale 0.5", 256, 0.5, True),
    ("tiled, scale 1 (full size)", 256, 1.0, True),
    ("256x256 model, no reduction", 0, 1.0, False),
]


def make_images(folder: str, megapixels: float) -> dict[str, str]:
    side = int(round((megapixels * 1e6) ** 0.5))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    rgb = np.stack([np.sin(9 * xx + 3 * yy), np.cos(7 * yy - 2 * xx), np.sin(5 * (xx + yy))], axis=-1)
    rgb = ((rgb * 0.4 + 0.5) * 255 + rng.normal(0, 4, (1, side, 3))).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(rgb)
    paths = {}
    rgba = Image.fromarray(np.dstack([rgb, rgb[..., 0]]))
    for fmt, image, kwargs in (("PNG", im, {"compress_level": 1}), ("JPEG", im, {"quality": 90}),
                               ("RGBA", rgba, {"format": "PNG", "compress_level": 1})):
        buf = io.BytesIO()
        image.save(buf, **{"format": fmt, **kwargs})
        paths[fmt] = os.path.join(folder, f"large-{fmt.lower()}.{kwargs.get('format', fmt).lower()}")
        with open(paths[fmt], "wb") as f:
            f.write(buf.getvalue())
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megapixels", type=float, default=36.0)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(tmp, args.megapixels)
        print(f"{'format':6s} {'case':30s} {'peak rise MB':>12s} {'bytes/pixel':>11s}  decoded shape")
        for fmt, path in paths.items():
            for label, tile, scale, reduce in CASES:
                out = subprocess.run([sys.executable, "-c", CHILD, path, str(tile), str(scale), str(int(reduce))],
                                     env=env, capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{fmt:6s} {label:30s} {r['rise'] / 1e6:12.0f} {r['rise'] / r['pixels']:11.1f}  {r['shape']}")


if __name__ == "__main__":
    main()
