"""`ssm submit` against a real Ray head started with token authentication on 127.0.0.1."""

import os
import secrets
import shutil
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

from jobs.submit import SubmitError, find_token, package
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
    ray_tmp = tmp_path_factory.mktemp("ray")
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
         "--include-dashboard=true", f"--temp-dir={ray_tmp}", *own_ports],
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
    yield url, token, ray_tmp
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
    url, token, ray_tmp = head
    tmp = checkpoint_and_images
    out = tmp_path / "scores"
    (tmp_path / "token").write_text(token + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token: the token comes from --token-file only
    res = _ssm(["submit", "score", str(tmp / "images"), "--checkpoint", str(tmp / "ckpt"), "--out", str(out),
                "--batch-size", "4", "--address", url, "--token-file", str(tmp_path / "token"), "--wait"], env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "submitted score job" in res.stdout and "SUCCEEDED" in res.stdout
    assert token not in res.stdout + res.stderr
    table = pads.dataset(out, format="parquet").to_table()
    assert table.num_rows == 6
    assert sorted(Path(p).name for p in table.column("path").to_pylist()) == [f"{i}.png" for i in range(6)]
    assert table.column("error").null_count == 6
    # what reached the cluster: the job's unpacked working directory on the head holds the code only
    unpacked = [d for d in ray_tmp.glob("session_latest/runtime_resources/working_dir_files/*") if d.is_dir()]
    assert len(unpacked) == 1, unpacked
    shipped = {str(p.relative_to(unpacked[0])) for p in unpacked[0].rglob("*") if p.is_file()}
    code = {"cli.py", "pyproject.toml", "cluster.yaml", "README.md",
            *(str(p.relative_to(ROOT)) for d in ("ssm", "jobs") for p in (ROOT / d).glob("*.py"))}
    assert {p for p in shipped if "__pycache__" not in p} == code


def test_submit_without_token_is_refused(head, checkpoint_and_images, tmp_path):
    url, _, _ = head
    tmp = checkpoint_and_images
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token here
    args = ["submit", "score", str(tmp / "images"), "--checkpoint", str(tmp / "ckpt"), "--out",
            str(tmp_path / "scores"), "--address", url]
    res = _ssm(args, env)
    assert res.returncode == 2
    assert "requires a token" in res.stderr
    # a token on the command line still works, with a warning: it is visible in the process list
    res = _ssm([*args, "--token", "not-the-token"], env)
    assert res.returncode == 2
    assert "--token is deprecated" in res.stderr and "process list" in res.stderr
    assert "refused the token" in res.stderr
    assert not (tmp_path / "scores").exists()


SECRETS_AND_DATA = {
    ".env": "AWS_SECRET_ACCESS_KEY=secret",
    ".aws/credentials": "[default]\naws_secret_access_key = secret",
    ".ray/auth_token": "secret-token",
    "auth_token": "secret-token",
    "ssm/.env": "TOKEN=secret",  # hidden files inside the code folders too
    ".venv/lib/python3.11/site-packages/pkg/__init__.py": "",
    "venv/lib/python3.11/site-packages/pkg/mod.py": "",
    "venv/pyvenv.cfg": "home = /usr/bin",
    "data/mvtec/train/good/000.png": "png",
    "ssm/sample.png": "png",
    "scores/part-000.parquet": "PAR1",
    "report.html": "<html>",
    "runs/bottle/best/model.pt": "weights",
    "runs/bottle/best/ssm.json": "{}",
    "jobs/__pycache__/score.cpython-311.pyc": "",
    ".git/config": "[core]",
    "tests/test_x.py": "",
    "notes.txt": "",
}


def test_job_package_holds_code_only(tmp_path):
    """The folder submit uploads, zipped by Ray's own packaging as the job client does, from a project folder
    salted with credentials, a virtualenv, data and outputs."""
    from ray._private.runtime_env.packaging import create_package

    project = tmp_path / "project"
    for d in ("ssm", "jobs"):
        shutil.copytree(ROOT / d, project / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("cli.py", "pyproject.toml", "cluster.yaml", "README.md"):
        shutil.copy(ROOT / f, project / f)
    code = {str(p.relative_to(project)) for p in project.rglob("*") if p.is_file()}
    for rel, text in SECRETS_AND_DATA.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text(text)
    with package(project) as folder:
        create_package(str(folder), tmp_path / "job.zip", include_gitignore=True)
    import zipfile

    shipped = {n for n in zipfile.ZipFile(tmp_path / "job.zip").namelist() if not n.endswith("/")}
    assert shipped == code
    assert not shipped & set(SECRETS_AND_DATA)


def test_token_from_file_environment_or_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert find_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert find_token() == "from-home"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert find_token() == "from-env"
    (tmp_path / "t").write_text(" from-file \n")
    assert find_token(token_file=tmp_path / "t") == "from-file"
    with pytest.raises(SubmitError, match="--token-file .*missing"):
        find_token(token_file=tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SubmitError, match="is empty"):
        find_token(token_file=tmp_path / "empty")
