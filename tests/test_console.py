"""What a person sees: progress lines off a terminal, warnings once, and a quiet `ssm train` + `ssm score` whose
--json lines parse; and the one way to start or join Ray (jobs/cluster.py) beside a cluster already running on
this machine, its address file and a RAY_ADDRESS pointing nowhere. The Ray checks run the real CLI in
subprocesses against a real `ray start --head` cluster of the test's own (its own ports and temp folder,
stopped by its own process id), whose Prometheus endpoint shows the scoring actors' metrics."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from jobs.console import Progress
from test_score_job import checkpoint  # noqa: F401  (the fixture: a tiny calibrated checkpoint)

ROOT = Path(__file__).resolve().parents[1]
TRAIN_KEYS = {"run_dir", "checkpoint", "epochs", "best_epoch", "best_val_loss", "threshold", "n_train", "n_val",
              "images_skipped", "s3_retries", "resumed_from", "seconds"}
SCORE_KEYS = {"out", "inputs", "scored", "errors", "anomalies", "skipped", "retried", "superseded", "seconds",
              "images_per_s", "files", "s3_retries"}


def test_progress_off_a_terminal_prints_a_few_plain_lines():
    out = io.StringIO()  # not a terminal: no redrawn bar
    with Progress("score", total=500, unit="images", stream=out) as bar:
        for i in range(100):
            bar.update(5, errors=i // 50)
    lines = out.getvalue().splitlines()
    assert 3 <= len(lines) <= 12, lines
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("score: 0/500 images")
    assert lines[-1].startswith("score: 500/500 images") and "errors=1" in lines[-1]


def test_each_warning_is_printed_once(tmp_path):
    script = (
        "import warnings\n"
        "from jobs.console import set_verbose\n"
        "set_verbose(False)\n"
        "def a(): warnings.warn('the same words', UserWarning)\n"
        "def b(): warnings.warn('the same words', UserWarning)\n"
        "for _ in range(5):\n"
        "    a(); b()\n"
        "warnings.warn('other words', RuntimeWarning)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("the same words") == 1, run.stderr
    assert run.stderr.count("other words") == 1, run.stderr


# --------------------------------------------------------------------------------------------------------
# The CLI on Ray


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ssm(*args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, f"ssm {' '.join(args)} failed:\n{run.stdout}\n{run.stderr}"
    return run


def _lines(run: subprocess.CompletedProcess) -> list[str]:
    return run.stdout.splitlines() + run.stderr.splitlines()


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray cluster started with `ray start --head --block` in a temp folder of its own (its address file
    goes there, not to /tmp/ray), on free ports, reporting metrics every second; stopped by its process id."""
    root = Path(tempfile.mkdtemp(prefix="ssm", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port, metrics, *agent = _free_ports(6)
    # Token authentication on, as Ray sets it up by default where a token exists; a client joining needs the mode.
    env = {**os.environ, "RAY_TMPDIR": str(root), "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=3", "--include-dashboard=false",
         f"--temp-dir={root / 'ray'}", f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent[0]}",
         f"--dashboard-agent-grpc-port={agent[1]}", f"--runtime-env-agent-port={agent[2]}",
         f"--node-manager-port={agent[3]}", '--system-config={"metrics_report_interval_ms": 1000}'],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address_file = root / "ray" / "ray_current_cluster"
    deadline = time.monotonic() + 180
    while not address_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
        time.sleep(0.5)
    try:
        yield {"address": f"127.0.0.1:{port}", "metrics": metrics, "root": root, "env": env}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own process group: this cluster's processes only
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _sessions(root: Path) -> set[str]:
    return {p.name for p in (root / "ray").glob("session_2*")}


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def _quiet(lines: list[str]) -> None:
    """No line of Ray's own logging: no log record header, no worker prefix, nothing about the controller."""
    for line in lines:
        assert not re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING|DEBUG)", line), line
        assert "pid=" not in line and "Ray Train Controller" not in line, line


@pytest.mark.slow
def test_quiet_train_and_score_with_json_beside_a_running_cluster(head, tmp_path):
    from test_train_job import write_mvtec

    data = write_mvtec(tmp_path / "data", n_train=20, corrupt=False)
    # As after a crash or beside someone else's cluster: an address file naming a live cluster (RAY_TMPDIR is
    # where Ray looks for it) and a RAY_ADDRESS pointing nowhere. Without --address the job starts its own.
    env = {**head["env"], "RAY_ADDRESS": f"127.0.0.1:{_free_ports(1)[0]}", "PYTHONPATH": str(ROOT),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    before = _sessions(head["root"])
    train = _ssm("train", str(data), "--out", str(tmp_path / "run"), "--epochs", "2", "--width", "8", "--img-size",
                 "32", "--batch-size", "8", "--val-fraction", "0.45", "--json", env=env)
    assert len(_sessions(head["root"]) - before) == 1, "ssm train did not start a cluster of its own"
    assert train.stdout.count("\n") == 1, f"--json prints its line alone on stdout: {train.stdout!r}"
    summary = json.loads(train.stdout)
    assert set(summary) == TRAIN_KEYS
    assert summary["epochs"] == 2 and summary["best_epoch"] in (1, 2) and summary["n_val"] == 9
    assert Path(summary["checkpoint"], "ssm.json").is_file()

    score = _ssm("score", str(data / "train"), "--checkpoint", summary["run_dir"], "--out", str(tmp_path / "scores"),
                 "--json", env=env)
    assert len(_sessions(head["root"]) - before) == 2, "ssm score did not start a cluster of its own"
    result = json.loads(score.stdout)
    assert set(result) == SCORE_KEYS and result["scored"] == 20 and result["errors"] == 0

    lines = _lines(train) + _lines(score)
    assert len(lines) <= 40, "\n".join(lines)
    _quiet(lines)
    assert any(line.startswith("train: 2/2 epochs") for line in train.stderr.splitlines()), train.stderr
    assert any(line.startswith("score: 20/20 images") for line in score.stderr.splitlines()), score.stderr


@pytest.mark.slow
def test_score_joins_the_given_cluster_and_its_actors_export_metrics(head, tmp_path, checkpoint):
    from test_train_job import write_mvtec

    data = write_mvtec(tmp_path / "data", n_train=6, corrupt=True)
    env = {**head["env"], "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    before = _sessions(head["root"])
    name = "ray_ssm_images_scored_total"
    scored_before = _metric(head["metrics"], name)
    run = _ssm("score", str(data), "--checkpoint", checkpoint, "--out", str(tmp_path / "scores"), "--address",
               head["address"], "--json", "--batch-size", "4", env=env)
    assert _sessions(head["root"]) == before, "--address must join the running cluster, not start one"
    result = json.loads(run.stdout)
    assert (result["scored"], result["errors"]) == (7, 1)  # 6 + 1 test image scored, the corrupt file an error row
    deadline = time.monotonic() + 60  # the node's agent exports what the actors reported (every second here)
    while time.monotonic() < deadline and (
            _metric(head["metrics"], name) - scored_before < 7 or _metric(head["metrics"], "ray_ssm_score_error_rows_total") < 1):
        time.sleep(1)
    assert _metric(head["metrics"], name) - scored_before == 7
    assert _metric(head["metrics"], "ray_ssm_score_error_rows_total") == 1
    assert _metric(head["metrics"], "ray_ssm_score_batch_seconds_count") >= 2  # 8 rows in batches of 4
    _quiet(_lines(run))
