"""The HTML report: counts, one self-contained page, only the shown rows' heatmaps read, and a page
that renders in a real browser with the heatmap colours visible."""

import io
import json
import re
import shutil
import socket
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

import jobs.report as report
from jobs.report import write_report

THRESHOLD = 0.5
SCHEMA = pa.schema([
    ("path", pa.string()),
    ("member", pa.string()),
    ("image_score", pa.float64()),
    ("is_anomaly", pa.bool_()),
    ("heatmap_png", pa.binary()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("checkpoint", pa.string()),
    ("error", pa.string()),
])
META = {"threshold": THRESHOLD, "heatmap_vmin": 0.01, "heatmap_vmax": 0.4, "img_size": 64,
        "checkpoint": "s3://models/ssm-bottle.pt"}
ERROR = "cannot identify image file <broken.png> & friends"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _heatmap(rng: np.random.Generator, strength: float, size: int = 64) -> bytes:
    """A smooth blob whose peak grows with the score, like a real anomaly map."""
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 6) ** 2))
    return _png((255 * np.clip(0.05 + strength * blob, 0, 1)).astype(np.uint8))


def _row(path, score, heatmap=None, member=None, size=(120, 90), error=None):
    return {
        "path": path, "member": member, "image_score": score,
        "is_anomaly": None if score is None else score >= THRESHOLD,
        "heatmap_png": heatmap, "width": size[0] if error is None else None,
        "height": size[1] if error is None else None,
        "checkpoint": "s3://models/ssm-bottle.pt", "error": error,
    }


def _write(rows: list[dict], path: Path, metadata: dict | None, row_group_size: int | None = None):
    schema = SCHEMA.with_metadata({b"ssm": json.dumps(metadata)}) if metadata else SCHEMA
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)


@pytest.fixture(scope="module")
def scores(tmp_path_factory) -> Path:
    """Eight photos, one image inside a tar shard, one whose file is gone, one that failed to decode."""
    tmp = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    photos = [skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket()]
    rows = []
    for i, score in enumerate([0.1, 0.2, 0.3, 0.45, 0.55, 0.7, 0.8, 0.9]):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, 120, 2)
        path = tmp / "images" / f"img_{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(photo[y : y + 180, x : x + 240]).save(path)
        rows.append(_row(str(path), score, _heatmap(rng, score), size=(240, 180)))
    shard = tmp / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        data = _png(skdata.chelsea()[50:250, 100:300])
        info = tarfile.TarInfo("cats/cat_001.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    rows.append(_row(str(shard), 0.95, _heatmap(rng, 0.95), member="cats/cat_001.png", size=(200, 200)))
    rows.append(_row(str(tmp / "images" / "deleted.png"), 0.35, _heatmap(rng, 0.35)))
    rows.append(_row(str(tmp / "images" / "broken.png"), None, error=ERROR))

    out = tmp / "scores"
    out.mkdir()
    _write(rows[:6], out / "part-000.parquet", META)
    _write(rows[6:], out / "part-001.parquet", META)
    return out


def test_counts(scores, tmp_path):
    counts = write_report(str(scores), str(tmp_path / "report.html"))
    assert counts == {"images": 11, "scored": 10, "errors": 1, "anomalies": 5, "shown": 10,
                      "threshold": THRESHOLD}


def test_page_is_self_contained_and_escaped(scores, tmp_path):
    out = tmp_path / "nested" / "report.html"
    write_report(str(scores), str(out), top=24)
    page = out.read_text()
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    # 9 readable originals -> overlay + heatmap; the deleted file -> heatmap alone.
    assert len(srcs) == 2 * 9 + 1
    assert all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in srcs)
    assert not re.search(r'(src|href)="(https?:)?//', page), "the page must not fetch anything"
    assert "<link" not in page and "<script" not in page
    assert "original not readable" in page and "deleted.png" in page
    assert "cat_001.png" in page
    assert "cannot identify image file &lt;broken.png&gt; &amp; friends" in page
    assert ERROR not in page
    assert "threshold 0.5" in page
    # Cards run from the highest score down.
    shown = [float(s) for s in re.findall(r'<span class="score">([0-9.]+)</span>', page)]
    assert shown == sorted(shown, reverse=True) and shown[0] == 0.95


def test_only_the_top_rows_heatmaps_are_read(scores, tmp_path, monkeypatch):
    asked = []
    real = report._read_heatmaps

    def spy(fs, files, wanted):
        asked.extend(wanted)
        return real(fs, files, wanted)

    monkeypatch.setattr(report, "_read_heatmaps", spy)
    counts = write_report(str(scores), str(tmp_path / "top3.html"), top=3)
    assert counts["shown"] == 3 and len(asked) == 3
    page = (tmp_path / "top3.html").read_text()
    assert page.count('<figure class="card') == 3
    assert [float(s) for s in re.findall(r'<span class="score">([0-9.]+)</span>', page)] == [0.95, 0.9, 0.8]


def test_large_run_decodes_only_the_row_groups_it_shows(tmp_path, monkeypatch):
    # 100k rows in 10 files of 10 row groups: the three best rows sit in three row groups.
    rng = np.random.default_rng(1)
    heat = _heatmap(rng, 0.5, size=16)
    out = tmp_path / "big"
    out.mkdir()
    best = {(2, 1234): 9.0, (5, 9999): 8.0, (7, 0): 7.0}
    for f in range(10):
        score = rng.uniform(0, 1, 10_000)
        for (bf, row), value in best.items():
            if bf == f:
                score[row] = value
        table = pa.table({
            "path": pa.array([str(tmp_path / "gone" / f"{f}_{i}.png") for i in range(10_000)]),
            "member": pa.nulls(10_000, pa.string()),
            "image_score": score,
            "is_anomaly": score >= THRESHOLD,
            "heatmap_png": pa.array([heat] * 10_000, pa.binary()),
            "error": pa.nulls(10_000, pa.string()),
        })
        pq.write_table(table, out / f"part-{f:03d}.parquet", row_group_size=1_000)

    batches = []
    real = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        for batch in real(self, *args, **kwargs):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    counts = write_report(str(out), str(tmp_path / "big.html"), top=3)
    assert counts["images"] == 100_000 and counts["scored"] == 100_000 and counts["errors"] == 0
    assert counts["threshold"] is None  # no b"ssm" metadata: tolerated
    assert counts["anomalies"] == int(sum((pq.read_table(out, columns=["is_anomaly"])["is_anomaly"]).to_pylist()))
    assert sum(batches) == 3 * 1_000, "heatmaps were decoded outside the shown rows' row groups"
    page = (tmp_path / "big.html").read_text()
    assert "no calibration metadata" in page
    # The original images are gone: each card shows its heatmap alone, with a note.
    assert page.count("original not readable") == 3
    assert len(re.findall(r'<img[^>]*src="data:', page)) == 3


@pytest.fixture
def s3(monkeypatch):
    """A real S3 protocol endpoint (moto) on loopback; yields an fsspec S3 filesystem."""
    server_module = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached instance would keep an old endpoint
    fs = s3fs.S3FileSystem()
    fs.mkdir("runs")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_reads_scores_images_and_tar_shards_from_s3(s3, tmp_path):
    rng = np.random.default_rng(2)
    s3.pipe("runs/images/coffee.png", _png(skdata.coffee()[:200, :300]))
    shard = io.BytesIO()
    with tarfile.open(fileobj=shard, mode="w") as tar:
        data = _png(skdata.astronaut()[:256, :256])
        info = tarfile.TarInfo("faces/a.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    s3.pipe("runs/shards/000.tar", shard.getvalue())
    rows = [
        _row("s3://runs/images/coffee.png", 0.8, _heatmap(rng, 0.8)),
        _row("s3://runs/shards/000.tar", 0.6, _heatmap(rng, 0.6), member="faces/a.png"),
        _row("s3://runs/images/missing.png", None, error="no such key"),
    ]
    _write(rows, tmp_path / "part-000.parquet", META)
    s3.put(str(tmp_path / "part-000.parquet"), "runs/scores/part-000.parquet")

    counts = write_report("s3://runs/scores", "s3://runs/report/index.html")
    assert counts == {"images": 3, "scored": 2, "errors": 1, "anomalies": 2, "shown": 2,
                      "threshold": THRESHOLD}
    page = s3.cat_file("runs/report/index.html").decode()
    assert len(re.findall(r'<img[^>]*src="data:', page)) == 4  # both originals were read
    assert "original not readable" not in page and "no such key" in page


def test_missing_directory_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No .parquet files under"):
        write_report(str(tmp_path / "empty"), str(tmp_path / "r.html"))


def test_overlay_keeps_the_image_and_shows_the_heat():
    image = np.full((4, 4, 3), 128, np.uint8)
    heat = np.zeros((4, 4), np.uint8)
    heat[0, 0] = 255
    blended = report.overlay(image, heat)
    assert blended.shape == image.shape and blended.dtype == np.uint8
    hot, cold = blended[0, 0].astype(int), blended[3, 3].astype(int)
    assert hot[0] > hot[2] and cold[2] > cold[0]  # red where hot, blue where cold
    assert np.all(np.abs(cold - 128) < 128 * 0.5)  # the image still shows through


# --- in a real browser ------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not on PATH (apt-get install chromium) to render the report"
)


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
        capture_output=True, text=True, timeout=180, check=True,
    )


@needs_chromium
def test_browser_dom_has_inline_images_and_the_error_row(scores, tmp_path):
    page = tmp_path / "report.html"
    write_report(str(scores), str(page))
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    assert len(re.findall(r'<img[^>]*src="data:image/(png|jpeg);base64,', dom)) == 19
    assert len(re.findall(r"<img", dom)) == 19
    rows = re.findall(r"<tr>(.*?)</tr>", dom, flags=re.S)
    assert len(rows) == 2  # header + the one error
    assert "broken.png" in rows[1] and "cannot identify image file &lt;broken.png&gt; &amp; friends" in rows[1]
    assert dom.count("<svg") >= 2  # histogram and colour bar


@needs_chromium
def test_browser_screenshot_shows_the_heatmaps(scores, tmp_path):
    page = tmp_path / "report.html"
    shot = tmp_path / "report.png"
    write_report(str(scores), str(page))
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,3000", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.std() > 20, "the screenshot is blank"
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    jet_blue = (b > 110) & (r < 60) & (g < 90)  # the cold end of the colour map
    jet_warm = (r > 200) & (g > 150) & (b < 80)  # yellow/orange around the hot spots
    assert jet_blue.sum() > 20_000, jet_blue.sum()
    assert jet_warm.sum() > 500, jet_warm.sum()
