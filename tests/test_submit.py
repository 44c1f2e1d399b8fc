"""`ssm submit` against a real Ray head started with token authentication on 127.0.0.1."""

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image

from ssm.calibration import Calibration
from ssm.checkpoint import save_checkpoint
from ssm.model import ModelConfig, SSMUNet
from ssm.scoring import ScoringConfig

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    token = secrets.token_hex(16)
    port, dash = _port(), _port()
    # Every port of its own: other Ray clusters of this test session (the ray_local fixture) hold the defaults.
    own_ports = [f"--{flag}={_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port",
                                                     "ray-client-server-port")]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
         "--include-dashboard=true", f"--temp-dir={tmp_path_factory.mktemp('ray')}", *own_ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # up, and asking for the token
            break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail("the Ray head did not start within 180 s")
    yield url, token
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def checkpoint_and_images(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("submit")
    torch.manual_seed(0)
    cfg = ModelConfig(width=4, img_size=32)
    cal = Calibration(tau=0.05, max_loc=0.1, max_scale=0.05, mse_loc=0.01, mse_scale=0.01, threshold=1.0,
                      heatmap_vmin=0.0, heatmap_vmax=0.5, n_images=4)
    save_checkpoint(tmp / "ckpt", SSMUNet(cfg), cfg, ScoringConfig(), cal)
    rng = np.random.default_rng(0)
    (tmp / "images").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp / "images" / f"{i}.png")
    return tmp


def _ssm(args, env):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def test_submit_score_job_with_token(head, checkpoint_and_images, tmp_path):
    url, token = head
    tmp = checkpoint_and_images
    out = tmp_path / "scores"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    res = _ssm(["submit", "score", str(tmp / "images"), "--checkpoint", str(tmp / "ckpt"), "--out", str(out),
                "--batch-size", "4", "--address", url, "--token", token, "--wait"], env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "submitted score job" in res.stdout and "SUCCEEDED" in res.stdout
    table = pads.dataset(out, format="parquet").to_table()
    assert table.num_rows == 6
    assert sorted(Path(p).name for p in table.column("path").to_pylist()) == [f"{i}.png" for i in range(6)]
    assert table.column("error").null_count == 6


def test_submit_without_token_is_refused(head, checkpoint_and_images, tmp_path):
    url, _ = head
    tmp = checkpoint_and_images
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token here
    res = _ssm(["submit", "score", str(tmp / "images"), "--checkpoint", str(tmp / "ckpt"), "--out",
                str(tmp_path / "scores"), "--address", url], env)
    assert res.returncode == 2
    assert "requires a token" in res.stderr
    assert not (tmp_path / "scores").exists()
