"""The bulk scoring job on a real local Ray cluster: local, tar and s3:// inputs, bad files, a scoring
actor that dies mid-run, a driver killed mid-run and resumed, and scores equal to the library scorer's."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
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
    """The job's own files in `out` (top level, its naming scheme), their rows by key, and their metadata."""
    fs, root = storage.fsspec_for(out)
    fs.invalidate_cache()
    files = sorted(p for p in fs.ls(root, detail=False) if re.fullmatch(r"part-[0-9a-f-]+\.parquet", p.rsplit("/", 1)[-1]))
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            table = pq.read_table(f)
        assert table.schema.equals(SCHEMA), table.schema
        meta = json.loads(table.schema.metadata[METADATA_KEY])
        assert set(meta) == {"threshold", "heatmap_vmin", "heatmap_vmax", "img_size", "tiled", "scale",
                             "heatmap_max_side", "precision", "backend", "checkpoint"}
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
            assert path in row["error"] and row["error_kind"] == "permanent"  # bytes a rerun would not change
        else:
            assert row["error_kind"] is None
            w, h = Image.open(path).size
            assert (row["width"], row["height"]) == (w, h)
    assert "0 bytes" in rows[(str(data / "nested" / "empty.png"), None)]["error"]
    assert "decompression-bomb" in rows[(str(data / "nested" / "bomb.png"), None)]["error"]

    cal = load_checkpoint(checkpoint).calibration
    assert meta == {"threshold": cal.threshold, "heatmap_vmin": cal.heatmap_vmin, "heatmap_vmax": cal.heatmap_vmax,
                    "img_size": IMG_SIZE, "tiled": False, "scale": 1.0, "heatmap_max_side": 1024,
                    "precision": "float32", "backend": "torch", "checkpoint": load_checkpoint(checkpoint).id}
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
    assert {rows[(f"s3://{bucket}/shards/001.tar", None)]["error_kind"], rows[(str(broken), None)]["error_kind"]} \
        == {"transient"}  # an archive can be re-created
    assert all(f.startswith(f"{bucket}/scores/") for f in files)
    sources = {(f"s3://{bucket}/shards/000.tar", n): d for n, d in shard.items()}
    sources.update({(f"s3://{bucket}/images/{n}", None): d for n, d in loose.items()})
    _assert_matches_library(rows, _library_scores(checkpoint, sources), meta["threshold"])

    # The HTML report reads the output as written.
    from jobs.report import write_report

    counts = write_report(out, str(tmp_path / "report.html"), top=3)
    assert (counts["images"], counts["errors"], counts["threshold"]) == (len(expected_keys), 2, meta["threshold"])
    assert not any(k.endswith(".ssm-score.lock") for k in s3_server.list_keys(bucket))  # released

    # The bad shard is re-created on S3: the rerun retries its error row and replaces it with its members.
    fixed = _good_images(3, seed=11)
    s3.put_object(Bucket=bucket, Key="shards/001.tar", Body=_tar(fixed))
    again = score([f"s3://{bucket}/shards/*.tar"], f"s3://{bucket}/runs/tiny", out, batch_size=4, progress=False)
    assert (again.scored, again.errors, again.retried, again.skipped) == (3, 0, 1, 5)
    rows, _, _ = _rows(out)
    expected_keys = expected_keys - {(f"s3://{bucket}/shards/001.tar", None)} \
        | {(f"s3://{bucket}/shards/001.tar", n) for n in fixed}
    assert set(rows) == expected_keys
    assert rows[(str(broken), None)]["error_kind"] == "transient"  # not among this run's inputs: kept as it was


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
    # Leftovers of a crash: a torn file of the job's and a temporary file of its local writes.
    torn = "part-20000101000000-000000-0123456789abcdef.parquet"
    (out / torn).write_bytes(b"PAR1 torn")
    (out / f".{torn}.tmp").write_bytes(b"partial")

    summary = score(inputs, checkpoint, str(out), batch_size=4, progress=False)
    rows, _, files = _rows(str(out))
    assert set(rows) == expected
    assert summary.skipped == len(first) and summary.scored == len(expected) - len(first)
    assert set(first_files) <= set(files)  # nothing written before was rewritten
    assert (out / f".{torn}.unreadable").read_bytes() == b"PAR1 torn" and not (out / f".{torn}.tmp").exists()

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


# --- inputs: every image one row -------------------------------------------------------------------


def _link_tar(entries: list[tuple[str, str, bytes | str]]) -> bytes:
    """A tar of ("file", name, bytes), ("sym" | "hard", name, target) entries, in that order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, value in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
            elif kind == "fifo":  # a named pipe entry: no data
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
            else:
                info.type, info.linkname = (tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE), value
                tar.addfile(info)
    return buf.getvalue()


def _tricky_tar(images: list[bytes]) -> tuple[bytes, dict[str, bytes | None]]:
    """A shard with duplicate names, links (good, dangling, escaping, cyclic, forward), a nested tar (and a
    member named like one of its members), a nested corrupt tar and a member name that is not UTF-8; and
    each expected member key -> image bytes (None for an error row)."""
    inner = _link_tar([("file", "x.png", images[3]), ("sym", "y.png", "x.png")])
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes in a member name, read back as surrogate escapes
    entries = [
        ("file", "a.png", images[0]), ("file", "a.png", images[1]),
        ("sym", "dir/s.png", "../a.png"), ("hard", "h.png", "a.png"), ("sym", "fwd.png", "later.png"),
        ("sym", "dangling.png", "gone.png"), ("sym", "escape.png", "../../etc/passwd.png"),
        ("sym", "c1.png", "c2.png"), ("sym", "c2.png", "c1.png"),
        ("file", "inner.tar", inner), ("file", "inner.tar/x.png", images[2]),
        ("file", "broken.tar", b"not a tar" * 200),
        ("file", odd, images[4]), ("file", "later.png", images[5]), ("fifo", "pipe.png", ""),
    ]
    keys = {
        "a.png": images[0], "a.png#2": images[1],  # a repeated name gets #n
        "inner.tar/x.png": images[3], "inner.tar/x.png#2": images[2],  # named like a nested one
        "inner.tar/y.png": images[3], "broken.tar": None,
        "caf\\xe9.png": images[4], "later.png": images[5],
        # links point at the last member of that name, as extracting the tar would leave it
        "dir/s.png": images[1], "h.png": images[1], "fwd.png": images[5],
        "dangling.png": None, "escape.png": None, "c1.png": None, "c2.png": None, "pipe.png": None,
    }
    return _tar_bytes_checked(entries), keys


def _tar_bytes_checked(entries) -> bytes:
    data = _link_tar(entries)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert len(tar.getmembers()) == len(entries)
    return data


def test_tar_members_links_nested_duplicates_and_resume_skips(tmp_path):
    from jobs.score import _tar_members

    images = list(_good_images(6, seed=11).values())
    data, expected = _tricky_tar(images)
    (tmp_path / "s.tar").write_bytes(data)
    rows = list(_tar_members(str(tmp_path / "s.tar"), set()))
    keys = [k for k, _, _ in rows]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))
    for key, blob, error in rows:
        assert blob == expected[key], key
        assert (error is None) == (expected[key] is not None), (key, error)
    errors = {k: e for k, _, e in rows if e}
    assert "outside the archive" in errors["escape.png"] and "not a file in the archive" in errors["dangling.png"]
    assert "does not end" in errors["c1.png"] and "broken.tar in" in errors["broken.tar"]
    assert "not a regular file" in errors["pipe.png"]
    # A resumed run passes the keys already written: exactly the others come back.
    done = {"a.png#2", "inner.tar/x.png", "caf\\xe9.png", "broken.tar", "fwd.png"}
    assert sorted(k for k, _, _ in _tar_members(str(tmp_path / "s.tar"), done)) == sorted(set(expected) - done)


def test_listing_follows_symlinks_once_reads_manifests_and_names_empty_inputs(tmp_path):
    from jobs.score import list_sources, row_key
    from ssm.data import DataError

    png = next(iter(_good_images(1).values()))
    root = tmp_path / "data"
    _write(root / "sub", {"b.png": png})
    _write(root, {"a.png": png})
    _write(tmp_path / "elsewhere", {"c.png": png})
    os.symlink("..", root / "sub" / "loop")  # a loop back up the tree
    os.symlink("..", root / "sub" / "loop2")  # and another: glob's own `**` would walk 2**40 paths
    os.symlink(tmp_path / "elsewhere", root / "linked")  # a symlinked folder
    odd = os.path.join(os.fsencode(root), b"caf\xe9.png")  # a file name that is not UTF-8
    with open(odd, "wb") as f:
        f.write(png)
    want = [str(root / "a.png"), str(root) + "/caf\\xe9.png", str(root / "linked" / "c.png"),
            str(root / "sub" / "b.png")]
    for given in (str(root), str(root / "**" / "*.png"), str(root / "**")):
        assert sorted(s.key for s in list_sources([given])) == sorted(want), given
    assert [s.key for s in list_sources([os.fsencode(odd)])] == [want[1]]  # a bytes path argument
    assert os.fsencode(next(s.uri for s in list_sources([str(root)]) if "caf" in s.key)) == odd  # still opens
    import codecs

    assert os.fsencode(os.path.abspath(os.fsdecode(codecs.escape_decode(want[1].encode())[0]))) == odd
    assert row_key("a\\b") == "a\\b" and row_key(os.fsdecode(b"a\\b\xff")) == "a\\\\b\\xff"

    # A manifest with a byte-order mark, a folder line, a glob line, and lines that name nothing.
    manifest = tmp_path / "list.txt"
    manifest.write_text("data/a.png\nelsewhere\ndata/sub/*.png\nnothing/*.png\nmissing.png\n", encoding="utf-8-sig")
    listed = [s.key for s in list_sources([str(manifest)])]
    assert listed == [str(root / "a.png"), str(tmp_path / "elsewhere" / "c.png"), str(root / "sub" / "b.png"),
                      str(tmp_path / "nothing" / "*.png"), str(tmp_path / "missing.png")]

    # A folder that cannot be listed (here: removed while the walk is under way) is an error, not a skip.
    from jobs.score_plan import _walk_local

    gone = tmp_path / "gone"
    _write(gone / "inner", {"b.png": png})
    _write(gone, {"a.png": png})
    walk = _walk_local(str(gone))
    assert next(walk).key == str(gone / "a.png")
    shutil.rmtree(gone / "inner")
    with pytest.raises(FileNotFoundError, match="inner"):
        next(walk)

    # An argument that yields nothing stops the job before any work, naming it, even beside good inputs.
    (tmp_path / "empty").mkdir()
    for nothing in (str(tmp_path / "zz*.png"), str(tmp_path / "empty")):
        with pytest.raises(DataError, match=f"{re.escape(nothing)}: no images found"):
            list_sources([str(root), nothing])


@pytest.mark.slow
def test_every_input_image_gets_one_row_through_the_job(tmp_path, checkpoint, ray_local):
    """Tar links, nested tars and duplicate names, a symlink loop and a symlinked folder, a file name that is
    not UTF-8, multi-frame and EXIF-rotated images, a manifest with a byte-order mark, a folder line and
    lines naming nothing: one row each, and a rerun retries only the transient errors."""
    images = list(_good_images(6, seed=12).values())
    shard, members = _tricky_tar(images)
    data, more = tmp_path / "in", tmp_path / "more"
    _write(data, {"shard.tar": shard})
    _write(data / "sub", {"b.png": images[0]})
    _write(tmp_path / "elsewhere", {"c.png": images[1]})
    _write(more, {"d.png": images[2]})
    os.symlink("..", data / "sub" / "loop")
    os.symlink(tmp_path / "elsewhere", data / "linked")
    with open(os.path.join(os.fsencode(data), b"caf\xe9.png"), "wb") as f:
        f.write(images[3])
    rng = np.random.default_rng(13)
    frames = [Image.fromarray(_texture(rng, 40, 48)) for _ in range(3)]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 48 x 40, shown rotated a quarter turn: 40 x 48
    gif, tiff, jpeg = io.BytesIO(), io.BytesIO(), io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    frames[0].save(tiff, format="TIFF", save_all=True, append_images=frames[1:2])
    frames[2].save(jpeg, format="JPEG", exif=exif, quality=95)
    _write(data, {"anim.gif": gif.getvalue(), "pages.tiff": tiff.getvalue(), "rotated.jpg": jpeg.getvalue()})
    manifest = tmp_path / "list.txt"
    manifest.write_text("more\nnothing/*.png\nmissing.png\n", encoding="utf-8-sig")
    out = str(tmp_path / "scores")

    summary = score([str(data), str(manifest)], checkpoint, out, batch_size=8, progress=False)
    rows, _, _ = _rows(out)
    tar = str(data / "shard.tar")
    plain = {"sub/b.png": 1, "linked/c.png": 1, "caf\\xe9.png": 1, "anim.gif": 3, "pages.tiff": 2, "rotated.jpg": 1}
    expected = ({(tar, k): v for k, v in members.items()}
                | {(f"{data}/{name}", None): n for name, n in plain.items()}
                | {(str(more / "d.png"), None): 1, (str(tmp_path / "nothing" / "*.png"), None): None,
                   (str(tmp_path / "missing.png"), None): None})
    assert set(rows) == set(expected)
    failed = {k for k, r in rows.items() if r["error"]}
    assert failed == {k for k, v in expected.items() if v is None}
    assert (summary.scored, summary.errors) == (len(rows) - len(failed), len(failed))
    for key, want in expected.items():
        if key[0] == tar and want is not None:  # a tar row holds the bytes it was scored from
            want = 1
        assert rows[key]["frames"] == want, key
    assert "matches no image file" in rows[(str(tmp_path / "nothing" / "*.png"), None)]["error"]
    assert "file not found" in rows[(str(tmp_path / "missing.png"), None)]["error"]
    assert "outside the archive" in rows[(tar, "escape.png")]["error"]
    assert (rows[(f"{data}/rotated.jpg", None)]["width"], rows[(f"{data}/rotated.jpg", None)]["height"]) == (40, 48)
    # Links are scored from their target member: the same score as the member itself.
    assert rows[(tar, "h.png")]["image_score"] == rows[(tar, "a.png#2")]["image_score"]
    assert rows[(tar, "inner.tar/y.png")]["image_score"] == rows[(tar, "inner.tar/x.png")]["image_score"]
    assert rows[(f"{data}/caf\\xe9.png", None)]["image_score"] == rows[(tar, "inner.tar/x.png")]["image_score"]

    # A rerun retries only the rows whose error may go away (lines naming nothing yet, a nested tar that a
    # re-created archive may fix): they fail again; the link out of the archive stays as it is.
    transient = {k for k, r in rows.items() if r["error_kind"] == "transient"}
    assert transient == {(str(tmp_path / "nothing" / "*.png"), None), (str(tmp_path / "missing.png"), None),
                         (tar, "broken.tar")}
    again = score([str(data), str(manifest)], checkpoint, out, batch_size=8, progress=False)
    assert (again.scored, again.errors, again.skipped) == (0, len(transient), len(rows) - len(transient))
    assert set(_rows(out)[0]) == set(expected)


def test_decode_tasks_yield_tiled_rows_by_bytes_held_and_size_their_reservation(tmp_path, monkeypatch):
    from jobs import score as job

    paths = _write(tmp_path, _good_images(6, seed=14))  # 40..56 x 48 px: 23..32 KB each as float32 RGB
    tiled = ModelConfig(width=4, img_size=32, tiled=True, scale=1.0)
    from jobs.score_output import OutputState

    batch = job.plan_units(job.list_sources(paths), OutputState()).units  # one unit: the six files
    assert [len(b["path"]) for b in job.decode_sources(batch, tiled, rows=32)] == [6]
    monkeypatch.setattr(job, "_DECODE_HELD_BYTES", 60_000)
    sizes = [len(b["path"]) for b in job.decode_sources(batch, tiled, rows=32)]
    assert sum(sizes) == 6 and max(sizes) < 6  # yielded before `rows` was reached
    whole = ModelConfig(width=4, img_size=32)
    # The reservation covers decoding an image at the pixel limit: more for a tiled model that cannot reduce.
    assert job.decode_memory(whole, 32) > 8 * 100_000_000 > job.decode_memory(whole, 32) - (600 << 20)
    assert job.decode_memory(tiled, 32) > 32 * 100_000_000
