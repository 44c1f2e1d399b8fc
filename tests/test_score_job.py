"""The bulk scoring job on a real local Ray cluster: local, tar and s3:// inputs, bad files, a scoring
actor that dies mid-run, a driver killed mid-run and resumed, and scores equal to the library scorer's."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from jobs import storage
from jobs.score import METADATA_KEY, SCHEMA, score
from ssm.calibration import calibrate, heatmap_to_uint8
from ssm.checkpoint import load_checkpoint, save_checkpoint
from ssm.data import decode_image
from ssm.model import ModelConfig, SSMUNet
from ssm.scoring import Scorer, ScoringConfig

ROOT = Path(__file__).resolve().parents[1]
IMG_SIZE = 32


# --- data -----------------------------------------------------------------------------------------


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random RGB texture (uint8), with a bright blob on some images."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    f = rng.uniform(2, 6, 3)
    img = 0.5 + 0.25 * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy))[..., None] * rng.uniform(0.5, 1, 3)
    if rng.random() < 0.3:
        cy, cx = rng.uniform(0.2, 0.8, 2)
        img = img + 0.5 * (((yy - cy) ** 2 + (xx - cx) ** 2) < 0.01)[..., None]
    return (np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1) * 255).astype(np.uint8)


def _encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _good_images(n: int, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {f"img_{seed}_{i:03d}.png": _encode(Image.fromarray(_texture(rng, 40 + i % 3 * 8, 48))) for i in range(n)}


def _bomb_png() -> bytes:
    """A valid PNG whose header claims 11000 x 11000 pixels (more than ssm.data.MAX_IMAGE_PIXELS)."""
    png = bytearray(_encode(Image.new("L", (8, 8))))
    png[16:24] = struct.pack(">II", 11000, 11000)  # IHDR width, height
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def _unusual_modes(rng: np.random.Generator) -> dict[str, bytes]:
    rgb = Image.fromarray(_texture(rng, 36, 44))
    return {
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "rgba.png": _encode(rgb.convert("RGBA")),
        "gray16.png": _encode(Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257))),
        "palette.png": _encode(rgb.convert("P")),
        "gray.bmp": _encode(rgb.convert("L"), "BMP"),
    }


def _bad_files(rng: np.random.Generator) -> dict[str, bytes]:
    good = _encode(Image.fromarray(_texture(rng, 40, 40)))
    return {
        "corrupt.png": good[:100] + rng.integers(0, 255, 200, dtype=np.uint8).tobytes() + good[300:],
        "truncated.png": good[: len(good) // 2],
        "empty.png": b"",
        "not_an_image.jpg": b"a text file with an image extension\n",
        "bomb.png": _bomb_png(),
    }


def _write(folder: Path, files: dict[str, bytes]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [str(folder / name) for name in files]


def _tar(files: dict[str, bytes], extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {**files, **(extra or {})}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _rows(out: str):
    fs, root = storage.fsspec_for(out)
    files = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            table = pq.read_table(f)
        assert table.schema.equals(SCHEMA), table.schema
        meta = json.loads(table.schema.metadata[METADATA_KEY])
        assert set(meta) == {"threshold", "heatmap_vmin", "heatmap_vmax", "img_size", "tiled", "scale",
                             "heatmap_max_side", "checkpoint"}
        tables.append(table)
    rows = [r for t in tables for r in t.to_pylist()]
    keys = [(r["path"], r["member"]) for r in rows]
    assert len(keys) == len(set(keys)), "an image appears twice"
    return {k: r for k, r in zip(keys, rows)}, meta, files


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny model, calibrated on a few generated images: a real checkpoint in a second."""
    torch.manual_seed(0)
    cfg = ModelConfig(width=4, img_size=IMG_SIZE)
    model = SSMUNet(cfg).eval()
    rng = np.random.default_rng(1)
    normals = torch.stack([torch.from_numpy(_texture(rng, 32, 32)).permute(2, 0, 1).float() / 255 for _ in range(8)])
    scoring = ScoringConfig()
    cal = calibrate(Scorer(model, scoring), [normals], min_images=2)  # a fixture: the values do not matter
    return str(save_checkpoint(tmp_path_factory.mktemp("run") / "best", model, cfg, scoring, cal))


def _library_scores(ckpt_path: str, sources: dict[tuple[str, str | None], bytes]) -> dict:
    ckpt = load_checkpoint(ckpt_path)
    scorer = ckpt.scorer()
    keys = list(sources)
    x = torch.stack([torch.from_numpy(decode_image(sources[k], 3, IMG_SIZE)[0]) for k in keys])
    out = scorer.score(x)
    maps = heatmap_to_uint8(out.heatmaps, ckpt.calibration).numpy()
    return {k: (float(out.image_scores[i]), maps[i]) for i, k in enumerate(keys)}


def _assert_matches_library(rows: dict, expected: dict, threshold: float) -> None:
    for key, (lib_score, lib_map) in expected.items():
        row = rows[key]
        assert row["error"] is None, row["error"]
        assert row["image_score"] == pytest.approx(lib_score, rel=1e-4, abs=1e-5)
        assert row["is_anomaly"] == (row["image_score"] >= threshold)
        heatmap = np.asarray(Image.open(io.BytesIO(row["heatmap_png"])))
        assert heatmap.shape == (IMG_SIZE, IMG_SIZE) and heatmap.dtype == np.uint8
        assert np.abs(heatmap.astype(int) - lib_map.astype(int)).max() <= 1  # rounding at .5 only


# --- tests ----------------------------------------------------------------------------------------


def test_folder_with_bad_files_via_cli(tmp_path, checkpoint, ray_local):
    rng = np.random.default_rng(2)
    good = {**_good_images(6), **_unusual_modes(rng)}
    bad = _bad_files(rng)
    data = tmp_path / "images"
    _write(data, {k: v for i, (k, v) in enumerate(good.items()) if i % 2})
    _write(data / "nested" / "deeper", {k: v for i, (k, v) in enumerate(good.items()) if not i % 2})
    _write(data / "nested", bad)
    _write(data, {"notes.txt": b"not ours", ".hidden.png": b"skipped"})  # neither is an input
    _write(data / ".cache", {"skipped.png": b"hidden folder"})
    out = tmp_path / "scores"

    result = CliRunner().invoke(app, ["score", str(data), "--checkpoint", checkpoint, "--out", str(out),
                                      "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert f"scored {len(good)} images, {len(bad)} errors" in result.output
    assert str(out) in result.output

    rows, meta, _ = _rows(str(out))
    paths = {str(p): p.name for p in data.rglob("*") if p.is_file() and p.name in {**good, **bad}}
    assert set(rows) == {(p, None) for p in paths}
    for (path, _), row in rows.items():
        name = paths[path]
        assert row["checkpoint"] == meta["checkpoint"] == load_checkpoint(checkpoint).id
        if name in bad:
            assert row["image_score"] is None and row["heatmap_png"] is None and row["is_anomaly"] is None
            assert path in row["error"]
        else:
            w, h = Image.open(path).size
            assert (row["width"], row["height"]) == (w, h)
    assert "0 bytes" in rows[(str(data / "nested" / "empty.png"), None)]["error"]
    assert "decompression-bomb" in rows[(str(data / "nested" / "bomb.png"), None)]["error"]

    cal = load_checkpoint(checkpoint).calibration
    assert meta == {"threshold": cal.threshold, "heatmap_vmin": cal.heatmap_vmin, "heatmap_vmax": cal.heatmap_vmax,
                    "img_size": IMG_SIZE, "tiled": False, "scale": 1.0, "heatmap_max_side": 1024,
                    "precision": "float32", "checkpoint": load_checkpoint(checkpoint).id}
    expected = _library_scores(checkpoint, {(p, None): Path(p).read_bytes() for p, n in paths.items() if n in good})
    _assert_matches_library(rows, expected, cal.threshold)


def test_tar_shards_manifest_and_s3_in_and_out(tmp_path, checkpoint, s3_server, ray_local):
    bucket = s3_server.make_bucket()
    s3 = s3_server.client()
    loose = _good_images(4, seed=3)
    for name, data in loose.items():
        s3.put_object(Bucket=bucket, Key=f"images/{name}", Body=data)
    s3.put_object(Bucket=bucket, Key="images/readme.md", Body=b"not an image")
    shard = _good_images(5, seed=4)
    sidecars = {name.replace(".png", ".json"): b"{}" for name in shard}  # WebDataset: other members are not rows
    s3.put_object(Bucket=bucket, Key="shards/000.tar", Body=_tar(shard, sidecars))
    s3.put_object(Bucket=bucket, Key="shards/001.tar", Body=np.random.default_rng(5).bytes(3000))  # not a tar
    # A local shard that breaks after its first two members: those are scored, the rest is one error row.
    local = _good_images(4, seed=6)
    whole = _tar(local)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        third = tar.getmembers()[2].offset  # where the third member's header starts
    broken = tmp_path / "broken.tar"
    broken.write_bytes(whole[:third] + b"\x07" * 512 + whole[third + 512 :])
    manifest = tmp_path / "list.txt"
    extra = _good_images(2, seed=7)
    _write(tmp_path / "listed", extra)
    manifest.write_text("# images named one per line\nlisted/" + "\nlisted/".join(extra) + "\n\n")
    for name in ("model.pt", "ssm.json"):  # the checkpoint too: a training run directory on S3
        s3.put_object(Bucket=bucket, Key=f"runs/tiny/best/{name}", Body=(Path(checkpoint) / name).read_bytes())
    out = f"s3://{bucket}/scores/"

    summary = score([f"s3://{bucket}/images/", f"s3://{bucket}/shards/*.tar", str(broken), str(manifest)],
                    f"s3://{bucket}/runs/tiny", out, batch_size=4, progress=False)
    assert (summary.scored, summary.errors) == (4 + 5 + 2 + 2, 2)

    rows, meta, files = _rows(out)
    expected_keys = (
        {(f"s3://{bucket}/images/{n}", None) for n in loose}
        | {(f"s3://{bucket}/shards/000.tar", n) for n in shard}
        | {(f"s3://{bucket}/shards/001.tar", None)}
        | {(str(broken), n) for n in list(local)[:2]} | {(str(broken), None)}
        | {(str(tmp_path / "listed" / n), None) for n in extra}
    )
    assert set(rows) == expected_keys
    assert "001.tar" in rows[(f"s3://{bucket}/shards/001.tar", None)]["error"]
    assert "corrupt tar archive" in rows[(str(broken), None)]["error"]
    assert all(f.startswith(f"{bucket}/scores/") for f in files)
    sources = {(f"s3://{bucket}/shards/000.tar", n): d for n, d in shard.items()}
    sources.update({(f"s3://{bucket}/images/{n}", None): d for n, d in loose.items()})
    _assert_matches_library(rows, _library_scores(checkpoint, sources), meta["threshold"])

    # The HTML report reads the output as written.
    from jobs.report import write_report

    counts = write_report(out, str(tmp_path / "report.html"), top=3)
    assert (counts["images"], counts["errors"], counts["threshold"]) == (len(expected_keys), 2, meta["threshold"])


def test_scoring_actor_killed_mid_run_loses_and_doubles_nothing(tmp_path, checkpoint, ray_local):
    images = _write(tmp_path / "images", _good_images(16, seed=8))
    marker = tmp_path / "actor-exited"
    summary = score([str(tmp_path / "images")], checkpoint, str(tmp_path / "scores"), batch_size=2,
                    rows_per_file=6, progress=False,
                    runtime_env={"env_vars": {"SSM_SCORE_EXIT_AFTER_BATCHES": f"3:{marker}"}})
    assert marker.exists(), "the scoring actor did not exit: the fault was not injected"
    rows, _, files = _rows(str(tmp_path / "scores"))
    assert set(rows) == {(p, None) for p in images}
    assert all(r["error"] is None for r in rows.values())
    assert (summary.scored, summary.errors, len(files)) == (16, 0, len(summary.files))


def test_driver_killed_then_rerun_completes_without_duplicates(tmp_path, checkpoint, ray_local):
    images = _write(tmp_path / "images", _good_images(20, seed=9))
    shard = _good_images(6, seed=10)
    (tmp_path / "shard.tar").write_bytes(_tar(shard))
    inputs = [str(tmp_path / "images"), str(tmp_path / "shard.tar")]
    out = tmp_path / "scores"
    expected = {(p, None) for p in images} | {(str(tmp_path / "shard.tar"), n) for n in shard}

    # First run: a separate driver on the same cluster, killed once it has written its first file.
    code = (
        "import sys; from jobs.score import score; "
        f"score({inputs!r}, {checkpoint!r}, {str(out)!r}, batch_size=2, rows_per_file=4, progress=False, "
        f"address={ray_local.address_info['gcs_address']!r})"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 150
        while not list(out.glob("*.parquet")) and driver.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
        assert list(out.glob("*.parquet")), "the first run wrote nothing in time"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    time.sleep(3)  # Ray kills the dead driver's workers; let any straggler finish dying
    first, _, first_files = _rows(str(out))
    assert 0 < len(first) < len(expected)
    # Leftovers of a crash: a torn Parquet file and a temporary file.
    (out / "part-torn.parquet").write_bytes(b"PAR1 torn")
    (out / ".part-x.parquet.tmp").write_bytes(b"partial")

    summary = score(inputs, checkpoint, str(out), batch_size=4, progress=False)
    rows, _, files = _rows(str(out))
    assert set(rows) == expected
    assert summary.skipped == len(first) and summary.scored == len(expected) - len(first)
    assert set(first_files) <= set(files)  # nothing written before was rewritten
    assert (out / "part-torn.parquet.unreadable").exists() and not (out / ".part-x.parquet.tmp").exists()

    again = score(inputs, checkpoint, str(out), batch_size=4, progress=False)  # nothing left to do
    assert (again.scored, again.errors, again.skipped) == (0, 0, len(expected))
    assert _rows(str(out))[2] == files


def test_cli_errors_are_one_clear_sentence(tmp_path, checkpoint):
    runner = CliRunner()
    (tmp_path / "empty").mkdir()

    def fails(args: list[str]) -> str:
        result = runner.invoke(app, ["score", *args])
        assert result.exit_code == 2, result.output
        return result.output

    out = ["--out", str(tmp_path / "out")]
    assert "input not found" in fails([str(tmp_path / "nope"), "--checkpoint", checkpoint, *out])
    assert "no images found" in fails([str(tmp_path / "empty"), "--checkpoint", checkpoint, *out])
    assert "does not exist" in fails([str(tmp_path / "empty"), "--checkpoint", str(tmp_path / "nockpt"), *out])
    uncalibrated = save_checkpoint(tmp_path / "raw", SSMUNet(ModelConfig(width=4, img_size=IMG_SIZE)),
                                   ModelConfig(width=4, img_size=IMG_SIZE))
    assert "not calibrated" in fails([str(tmp_path / "empty"), "--checkpoint", str(uncalibrated), *out])
    assert not (tmp_path / "out").exists()
