"""`ssm serve` on a real local Ray cluster: real HTTP on loopback, real bottle images, concurrent clients.

One application is started for the module (a tiny checkpoint, batches of up to 8 gathered for 300 ms) and
shut down at the end. Scores, decisions and heatmaps are checked against the library scorer on the same
images; bad uploads against the error the scoring job writes for the same bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import requests
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from conftest import _free_port
from jobs import score as score_job
from jobs.serve import RAW_BODY_NAME, build_app, start, stop
from ssm.calibration import calibrate, heatmap_to_uint8
from ssm.checkpoint import load_checkpoint, save_checkpoint
from ssm.data import decode_image, load_images
from ssm.model import ModelConfig, SSMUNet
from ssm.scoring import Scorer, ScoringConfig

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_bottle"
IMG_SIZE = 32
BATCH_SIZE = 8
MAX_BYTES = 1 << 20
# The served scores are the scoring job's code on the same pixels; they may differ from an in-process run in
# the last bits (batch composition, torch threads), never more than this.
REL, ABS = 1e-4, 1e-5

pytestmark = pytest.mark.skipif(not BOTTLE.is_dir(), reason=f"needs the bottle images in {BOTTLE}")


def _test_images() -> list[Path]:
    """Three images of each test folder (normal and three defect kinds)."""
    return [p for d in sorted((BOTTLE / "test").iterdir()) for p in sorted(d.glob("*.png"))[:3]]


def _library(ckpt_path: str, paths: list[Path]) -> dict[Path, tuple[float, np.ndarray]]:
    """Image score and 8-bit heatmap of each image from the library scorer, in one in-process batch."""
    ckpt = load_checkpoint(ckpt_path)
    x = torch.stack([torch.from_numpy(decode_image(p.read_bytes(), 3, IMG_SIZE)[0]) for p in paths])
    out = ckpt.scorer().score(x)
    maps = heatmap_to_uint8(out.heatmaps, ckpt.calibration).numpy()
    return {p: (float(out.image_scores[i]), maps[i]) for i, p in enumerate(paths)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """An untrained tiny model calibrated on 8 normal bottle images, its threshold then moved between the
    6th and 7th of the test images' scores so that the decisions are not all alike."""
    torch.manual_seed(0)
    cfg = ModelConfig(width=4, img_size=IMG_SIZE)
    model = SSMUNet(cfg).eval()
    normals = load_images(sorted((BOTTLE / "train" / "good").glob("*.png"))[:8], IMG_SIZE)
    scoring = ScoringConfig()
    scorer = Scorer(model, scoring)
    cal = calibrate(scorer, [normals], min_images=2)
    paths = _test_images()
    scores = np.sort(scorer.score(load_images(paths, IMG_SIZE)).image_scores.numpy())
    cal = dataclasses.replace(cal, threshold=float(scores[5] + scores[6]) / 2)
    return str(save_checkpoint(tmp_path_factory.mktemp("run") / "best", model, cfg, scoring, cal))


@pytest.fixture(scope="module")
def server(checkpoint, ray_local):
    from ray import serve

    served = start(checkpoint, port=_free_port(), batch_size=BATCH_SIZE, batch_wait_ms=300, cpus_per_replica=1,
                   max_bytes=MAX_BYTES)
    try:
        yield served
    finally:
        stop(served)
        serve.shutdown()  # the proxy too: the session's cluster goes on without Serve


def _post(url: str, path: Path, multipart: bool) -> requests.Response:
    if multipart:
        return requests.post(url, files={"file": (path.name, path.read_bytes(), "image/png")}, timeout=120)
    return requests.post(url, data=path.read_bytes(), headers={"Content-Type": "image/png"}, timeout=120)


def _scored(url: str) -> int:
    return requests.get(url, timeout=30).json()["replica"]["images_scored"]


def test_concurrent_requests_score_as_the_library_does_in_batches(server, checkpoint):
    paths = _test_images()
    ckpt = load_checkpoint(checkpoint)
    expected = _library(checkpoint, paths)
    threshold = ckpt.calibration.threshold
    assert 0 < sum(s >= threshold for s, _ in expected.values()) < len(paths)  # both decisions occur
    before = _scored(server.url)

    jobs = [(p, multipart) for p in paths for multipart in (False, True)]  # 24 requests, all at once
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: _post(server.url, *job), jobs))

    for (path, _), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        body = r.json()
        lib_score, lib_map = expected[path]
        assert body["image_score"] == pytest.approx(lib_score, rel=REL, abs=ABS), path
        assert body["is_anomaly"] == (lib_score >= threshold), path
        assert body["threshold"] == threshold
        assert body["checkpoint"] == ckpt.id
        assert (body["width"], body["height"], body["frames"]) == (256, 256, 1)
        heatmap = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"]))))
        assert heatmap.shape == (IMG_SIZE, IMG_SIZE) and heatmap.dtype == np.uint8
        assert np.abs(heatmap.astype(int) - lib_map.astype(int)).max() <= 1  # rounding at .5 only
    sizes = [r.json()["batch_size"] for r in responses]
    assert max(sizes) > 1 and max(sizes) <= BATCH_SIZE, sizes
    assert _scored(server.url) - before == len(jobs)


def _bomb_png() -> bytes:
    """A valid PNG whose header claims 11000 x 11000 pixels (more than ssm.data.MAX_IMAGE_PIXELS)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    png[16:24] = struct.pack(">II", 11000, 11000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def _same_reason(served: str, written: str) -> None:
    """One line each, equal but for the address of the in-memory file PIL names in some messages."""
    assert "\n" not in served
    addresses = re.compile(r" at 0x[0-9a-f]+")
    assert addresses.sub(" at 0x", served) == addresses.sub(" at 0x", written)


def test_bad_uploads_get_4xx_with_the_reason_ssm_score_writes(server, checkpoint, tmp_path, monkeypatch):
    good = (BOTTLE / "test" / "good" / "000.png").read_bytes()
    bad = {
        "truncated.png": good[: len(good) // 2],
        "corrupt.png": good[:100] + bytes(range(256)) * 2 + good[612:],
        "empty.png": b"",
        "notes.png": b"a text file with an image extension\n",
        "bomb.png": _bomb_png(),
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    # What the scoring job's decode stage writes in the error column for these files.
    unit = pa.table({"kind": ["images"], "uris": [[str(tmp_path / n).encode() for n in bad]],
                     "skip": pa.array([[]], pa.list_(pa.string()))})  # a work unit as jobs/score_plan writes it
    rows = next(score_job.decode_sources(unit, load_checkpoint(checkpoint).model_config, rows=len(bad)))
    written = dict(zip(rows["path"], rows["error"]))

    for name, data in bad.items():
        file_error = written[str(tmp_path / name)]
        assert file_error  # the job refuses it too
        r = requests.post(server.url, files={"file": (name, data)}, timeout=60)
        assert r.status_code == 400, r.text
        _same_reason(r.json()["error"], file_error.replace(str(tmp_path / name), name))
        r = requests.post(server.url, data=data, timeout=60)
        assert r.status_code == 400, r.text
        _same_reason(r.json()["error"], file_error.replace(str(tmp_path / name), RAW_BODY_NAME))
    assert "0 bytes" in requests.post(server.url, data=b"", timeout=60).json()["error"]

    # Too large: the job's reader refuses a file over its limit in the same words.
    big = tmp_path / "big.png"
    big.write_bytes(good + bytes(MAX_BYTES))
    monkeypatch.setattr(score_job, "_MAX_MEMBER_BYTES", MAX_BYTES)
    with pytest.raises(score_job.DataError) as refused:
        score_job._read_bytes(str(big))
    r = requests.post(server.url, data=big.read_bytes(), timeout=60)
    assert r.status_code == 413, r.text
    _same_reason(r.json()["error"], str(refused.value).replace(str(big), RAW_BODY_NAME))

    r = requests.post(server.url, files={"note": (None, "no file here")}, timeout=60)
    assert r.status_code == 400 and "no file field" in r.json()["error"]
    # Two files would get one answer that the client cannot tell apart: refused, whichever comes first.
    for files in ([("file", ("a.png", good)), ("file", ("b.png", good))],
                  [("scan", ("notes.png", bad["notes.png"])), ("file", ("good.png", good))]):
        r = requests.post(server.url, files=files, timeout=60)
        assert r.status_code == 400, r.text
        assert "multipart upload: 2 files (" in r.json()["error"] and "one image per request" in r.json()["error"]
    assert requests.put(server.url, data=good, timeout=60).status_code == 405
    assert requests.get(server.url + "elsewhere", timeout=60).status_code == 404


def test_info_route_names_the_checkpoint_and_its_configuration(server, checkpoint):
    ckpt = load_checkpoint(checkpoint)
    info = requests.get(server.url, timeout=30).json()
    assert info["checkpoint"] == ckpt.id
    assert info["model"] == ckpt.model_config.to_dict()
    assert info["scoring"] == ckpt.scoring.to_dict()
    assert info["calibration"] == ckpt.calibration.to_dict()
    assert info["threshold"] == ckpt.calibration.threshold
    assert (info["batch_size"], info["batch_wait_ms"], info["max_bytes"]) == (BATCH_SIZE, 300, MAX_BYTES)
    assert info["device"] == "cpu" and info["replica"]["id"]


def test_cli_refuses_bad_flags_and_uncalibrated_checkpoints_before_starting(checkpoint, tmp_path):
    def fails(args: list[str]) -> str:
        result = CliRunner().invoke(app, ["serve", *args])
        assert result.exit_code == 2, result.output
        return result.output

    assert "--replicas and --batch-size must be at least 1" in fails([checkpoint, "--batch-size", "0"])
    assert "--gpus-per-replica must be 0 or more" in fails([checkpoint, "--gpus-per-replica", "-1"])
    assert "--batch-wait-ms must be 0 or more" in fails([checkpoint, "--batch-wait-ms", "-5"])
    assert "--port must be from 1 to 65535" in fails([checkpoint, "--port", "70000"])
    assert "does not exist" in fails([str(tmp_path / "missing")])
    raw = save_checkpoint(tmp_path / "raw", SSMUNet(ModelConfig(width=4, img_size=IMG_SIZE)),
                          ModelConfig(width=4, img_size=IMG_SIZE))
    assert "is not calibrated" in fails([str(raw)])


def test_application_builder_refuses_unknown_settings_by_name(checkpoint):
    """What Serve config files (k8s/serve-rayservice.yaml) pass to jobs.serve:build_app is checked as the CLI's
    flags are, before anything is deployed."""
    with pytest.raises(ValueError, match="no setting batch_sise; its settings are checkpoint, replicas"):
        build_app({"checkpoint": checkpoint, "batch_sise": 8})
    with pytest.raises(ValueError, match="needs args.checkpoint"):
        build_app({"batch_size": 8})
    with pytest.raises(ValueError, match="--batch-wait-ms must be 0 or more"):
        build_app({"checkpoint": checkpoint, "batch_wait_ms": -1})


def test_a_port_in_use_is_refused_in_one_line_before_ray_starts(checkpoint):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, str(root / "cli.py"), "serve", checkpoint, "--port", str(port)],
                                capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    assert f"error: --port {port}: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr and "Started a local Ray" not in result.stderr


def test_serve_running_elsewhere_on_the_cluster_is_not_reported_at_the_wrong_address(server, checkpoint):
    """Serve keeps the HTTP address it started with; a second start at another port must not print a URL that
    answers nothing."""
    other = _free_port()
    with pytest.raises(ValueError, match=rf"--port {other}: Ray Serve already runs on this cluster at 127.0.0.1:"):
        start(checkpoint, port=other, batch_size=2)
    assert requests.get(server.url, timeout=30).status_code == 200  # the running application is untouched


@pytest.mark.slow
def test_a_signal_to_the_whole_process_group_stops_the_server(checkpoint, tmp_path):
    """`timeout`, service managers and some shells signal the process group, so Ray's own processes started by
    `ssm serve` die with it: stopping must still end (it once waited forever on the dead controller)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(root / "cli.py"), "serve", checkpoint, "--port", str(_free_port()),
                                 "--cpus-per-replica", "1"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "press Ctrl-C" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        assert "press Ctrl-C" in log.read_text(), log.read_text()[-2000:]
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=150) == 0, log.read_text()[-2000:]  # serve.shutdown gives up after 30 s
        assert "stopping" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
