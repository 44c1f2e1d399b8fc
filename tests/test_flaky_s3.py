"""Flaky object storage: S3 that now and then answers 503 SlowDown, 500 or drops the connection.

The faults come from tests/faulty_s3.py, a proxy on loopback in front of the moto server of conftest.py. The
clients of jobs/storage.py retry them (SSM_S3_RETRIES attempts) and count the retries; `ssm train` and
`ssm score` run through the proxy as the user runs them (the CLI in a process of its own, which starts its
own Ray, every process of it pointed at the proxy) and lose or double nothing.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import socket
import subprocess
import sys
import time
import http.client
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from faulty_s3 import FaultyS3Proxy
from jobs import storage

ROOT = Path(__file__).resolve().parents[1]
FAULT_RATE = 0.08  # of all requests; 20 % of the others are delayed up to 50 ms
SIZE = 32


def _png(seed: int, size: int = SIZE) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = 0.5 + 0.4 * np.sin(xx * 0.6 + rng.uniform(0, 6.28)) * np.cos(yy * 0.3)
    buf = io.BytesIO()
    Image.fromarray((np.repeat(img[..., None], 3, axis=2) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def through(monkeypatch):
    """Point this process's S3 clients at an endpoint (the proxy) for one test."""

    def point(endpoint: str) -> None:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)

    return point


def _cli(*args: str, endpoint: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python cli.py ARGS` in a process of its own that starts its own Ray, with S3 at `endpoint`."""
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint,
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _retries_line(output: str) -> int:
    found = re.findall(r"^S3 request retries: (\d+)$", output, re.M)
    return int(found[-1]) if found else 0


def _assert_counted(proxy: FaultyS3Proxy, reported: int) -> None:
    """The job's count matches the faults its botocore clients met: each 5xx is one retry; a dropped connection
    is one too, unless aiohttp sent the request again itself (a reused keep-alive connection). pyarrow's
    retries (aws-sdk-cpp) are not reported, so they are not in the count."""
    met = [kind for kind, _, _, client in proxy.failed if client == "botocore"]
    assert sum(kind != "drop" for kind in met) <= reported <= len(met), (reported, proxy.failed)


# --------------------------------------------------------------------------------------------------------
# The proxy itself


def test_proxy_answers_s3_errors_and_drops_connections_as_seeded(s3_server):
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    targets = []
    for i in range(20):
        client.put_object(Bucket=bucket, Key=f"k{i}", Body=b"data")
        url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": f"k{i}"})
        targets.append(url.split(s3_server.endpoint_url, 1)[1])
    requests = [("GET", target) for target in targets * 2]  # each request twice: a retry is a new draw
    with FaultyS3Proxy(s3_server.endpoint_url, fault_rate=0.5, seed=3) as proxy:
        host, port = proxy.endpoint_url.rsplit("/", 1)[1].split(":")
        seen = {}
        for method, target in requests:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            try:
                conn.request(method, target)
                reply = conn.getresponse()
                seen.setdefault(reply.status, []).append(reply.read())
            except (ConnectionError, http.client.RemoteDisconnected):
                seen.setdefault("dropped", []).append(b"")
            finally:
                conn.close()
        assert set(seen) == {200, 500, 503, "dropped"}
        assert all(body == b"data" for body in seen[200])
        assert all(b"<Code>SlowDown</Code>" in body and b"<RequestId>" in body for body in seen[503])
        assert all(b"<Code>InternalError</Code>" in body for body in seen[500])
        assert proxy.requests == 40
        assert sum(proxy.injected.values()) == 40 - len(seen[200])
        assert proxy.injected["drop"] == len(seen["dropped"])
    # The same seed makes the same decisions for the same requests; another seed, others.
    again = FaultyS3Proxy(s3_server.endpoint_url, fault_rate=0.5, seed=3)
    other = FaultyS3Proxy(s3_server.endpoint_url, fault_rate=0.5, seed=4)
    first = [again.decide(*r)[0] for r in requests]
    assert [kind for kind, *_ in proxy.failed] == [k for k in first if k]
    assert first != [other.decide(*r)[0] for r in requests]


# --------------------------------------------------------------------------------------------------------
# The clients of jobs/storage.py: retries set explicitly, and counted


def test_retry_setting_reaches_every_client(monkeypatch, s3_server):
    monkeypatch.setenv("SSM_S3_RETRIES", "7")
    fs, _ = storage.filesystem_for("s3://bucket/key")
    assert fs.max_attempts == 7
    assert pickle.loads(pickle.dumps(fs)).max_attempts == 7  # as Ray tasks and Ray Train workers get it
    s3fs_fs, _ = storage.fsspec_for("s3://bucket/key")
    assert s3fs_fs.config_kwargs["retries"] == {"total_max_attempts": 7, "mode": "standard"}
    assert s3fs_fs.retries == storage.S3FS_RETRIES
    monkeypatch.delenv("SSM_S3_RETRIES")
    assert storage.filesystem_for("s3://bucket/key")[0].max_attempts == storage.DEFAULT_S3_RETRIES == 10
    for bad in ("0", "ten", "-2"):
        monkeypatch.setenv("SSM_S3_RETRIES", bad)
        with pytest.raises(ValueError, match="SSM_S3_RETRIES"):
            storage.fsspec_for("s3://bucket/key")

    import ray.data

    context = ray.data.DataContext()
    storage.configure_ray_data(context)
    assert {"SlowDown", "HTTP status 503", "Connection was closed"} <= set(context.retried_io_errors)
    assert set(ray.data.context.DEFAULT_RETRIED_IO_ERRORS) <= set(context.retried_io_errors)


def test_reads_and_writes_through_faults_lose_nothing_and_count_each_retry(s3_server, through, monkeypatch):
    bucket = s3_server.make_bucket()
    with FaultyS3Proxy(s3_server.endpoint_url, fault_rate=0.1, seed=5) as proxy:
        through(proxy.endpoint_url)
        count = storage.RetryCount()
        fs, root = storage.fsspec_for(f"s3://{bucket}/objects")
        blobs = {f"{root}/{i:02d}.bin": os.urandom(100 + i) for i in range(30)}
        for path, data in blobs.items():
            fs.pipe_file(path, data)
        fs.invalidate_cache()
        assert sorted(fs.ls(root)) == sorted(blobs)
        assert all(fs.cat_file(path) == data for path, data in blobs.items())
        faults = sum(proxy.injected.values())
        assert faults > 0
        # Every 5xx answer is one botocore retry, counted. A connection dropped after keep-alive reuse is sent
        # again by aiohttp itself, below botocore, so not every drop is in the count.
        assert proxy.injected["500"] + proxy.injected["503"] <= count.total <= faults
        faults = count.total

        arrow, path = storage.filesystem_for(f"s3://{bucket}/arrow")  # pyarrow: retried, not counted
        for i in range(10):
            with arrow.open_output_stream(f"{path}/{i}.bin") as f:
                f.write(b"x" * (1000 + i))
        for i in range(10):
            with arrow.open_input_file(f"{path}/{i}.bin") as f:
                assert f.read() == b"x" * (1000 + i)
        assert sum(proxy.injected.values()) > faults and count.total == faults

        # With retries turned off the same kind of fault reaches the caller: the setting is what saves it.
        monkeypatch.setenv("SSM_S3_RETRIES", "1")
        with FaultyS3Proxy(s3_server.endpoint_url, fault_rate=0.9, faults=("503",)) as busy:
            through(busy.endpoint_url)
            with pytest.raises(OSError):
                for i in range(5):
                    storage.filesystem_for(f"s3://{bucket}/off")[0].open_output_stream(f"{bucket}/off/{i}").close()
    assert sorted(s3_server.list_keys(bucket, "objects/")) == [f"objects/{i:02d}.bin" for i in range(30)]


def _read_through(endpoint: str, uri: str) -> bytes:
    """A Ray task: read `uri` with S3 at `endpoint` (the task's process is pointed there for the call only)."""
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(dict.fromkeys(names, endpoint))
    try:
        fs, path = storage.fsspec_for(uri)
        return fs.cat_file(path)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_retries_in_ray_workers_reach_the_job_count(s3_server, ray_local):
    import ray

    bucket = s3_server.make_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=b"payload")
    with FaultyS3Proxy(s3_server.endpoint_url, fault_rate=0.0) as proxy:
        proxy.script[("GET", f"/{bucket}/k")] = ["503", "500"]
        count = storage.RetryCount()
        count.attach()
        assert ray.get(ray.remote(_read_through).remote(proxy.endpoint_url, f"s3://{bucket}/k")) == b"payload"
        count.detach()
    assert proxy.injected == {"503": 1, "500": 1}
    assert count.total == 2  # both retries were made in the task's process, none here


# --------------------------------------------------------------------------------------------------------
# The probe: fails fast on a dead endpoint, not on a busy one


@pytest.mark.parametrize("fault", ["503", "500", "drop"])
def test_probe_counts_a_busy_storage_as_reachable(s3_server, through, caplog, fault):
    bucket = s3_server.make_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="run/best/ssm.json", Body=b"{}")
    with FaultyS3Proxy(s3_server.endpoint_url, fault_rate=0.999, faults=(fault,)) as proxy:
        through(proxy.endpoint_url)
        count = storage.RetryCount()
        with caplog.at_level(logging.WARNING, logger="jobs.storage"):
            fs, path = storage.probe(f"s3://{bucket}/run")
        assert path == f"{bucket}/run" and proxy.injected[fault] >= storage.PROBE_ATTEMPTS
        assert "answered busy 3 times" in caplog.text
        assert count.total == storage.PROBE_ATTEMPTS - 1
        assert fs.config_kwargs["retries"]["total_max_attempts"] == storage.s3_retries()  # the shared, retrying one
    with FaultyS3Proxy(s3_server.endpoint_url, fault_rate=FAULT_RATE, seed=2) as proxy:  # now and then busy: quiet
        through(proxy.endpoint_url)
        caplog.clear()
        for _ in range(5):
            storage.probe(f"s3://{bucket}/run")
        assert "answered busy" not in caplog.text


def test_probe_still_fails_fast_on_a_dead_endpoint_and_on_nothing_there(s3_server, through):
    bucket = s3_server.make_bucket()
    with pytest.raises(FileNotFoundError, match="nothing there"):
        storage.probe(f"s3://{bucket}/missing")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    through(dead)
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="cannot reach the storage at " + re.escape(dead)):
        storage.probe(f"s3://{bucket}/run")
    assert time.perf_counter() - t0 < storage.PROBE_CONNECT_TIMEOUT_S * storage.PROBE_ATTEMPTS


# --------------------------------------------------------------------------------------------------------
# The jobs through the proxy: `ssm train`, then `ssm score` and a rerun, each in a process of its own


def _upload_mvtec(s3_server, bucket: str, n_train: int = 12) -> None:
    client = s3_server.client()
    for i in range(n_train):
        client.put_object(Bucket=bucket, Key=f"data/train/good/{i:03d}.png", Body=_png(i))
    client.put_object(Bucket=bucket, Key="data/train/good/broken.png", Body=b"\x89PNG\r\n\x1a\n truncated")
    client.put_object(Bucket=bucket, Key="data/test/good/000.png", Body=_png(100))


@pytest.fixture(scope="module")
def flaky_training(s3_server):
    """`ssm train` with data and run directory on S3, every request through the proxy (2 epochs, tiny model)."""
    bucket = s3_server.make_bucket("flaky-train")  # fixed names: the run meets the same faults every time
    _upload_mvtec(s3_server, bucket)
    with FaultyS3Proxy(s3_server.endpoint_url, fault_rate=FAULT_RATE, seed=11) as proxy:
        # Besides the drawn faults, a SlowDown on the driver's first write of the run (s3fs), so that the count
        # has a retry to show whichever requests the drawn faults hit.
        proxy.script[("PUT", f"/{bucket}/run/job.json")] = ["503"]
        t0 = time.perf_counter()
        run = _cli("train", f"s3://{bucket}/data", "--out", f"s3://{bucket}/run", "--epochs", "2", "--batch-size",
                   "4", "--img-size", str(SIZE), "--width", "8", "--lr", "2e-3", "--workers", "1",
                   "--cpus-per-worker", "1", "--keep", "1", "--val-fraction", "0.3", "--min-calibration-images", "2",
                   endpoint=proxy.endpoint_url)
        print(f"ssm train through the proxy: {time.perf_counter() - t0:.1f} s, {proxy.requests} requests, "
              f"faults {dict(proxy.injected)}, {proxy.delayed} delayed; reported: {_retries_line(run.stdout)}; "
              f"faults met by botocore: {sum(c == 'botocore' for *_, c in proxy.failed)}")
    return bucket, run, proxy


def test_training_through_flaky_storage_completes_and_counts_retries(flaky_training, s3_server, tmp_path,
                                                                    monkeypatch):
    bucket, run, proxy = flaky_training
    assert run.returncode == 0, run.stdout + run.stderr
    # Faults were met on reads and on writes (checkpoints, job files), and the job reports its retries.
    methods = {method for _, method, _, _ in proxy.failed}
    assert methods & {"GET", "HEAD"} and methods & {"PUT", "POST"}, proxy.failed
    assert _retries_line(run.stdout) > 0, run.stdout
    _assert_counted(proxy, _retries_line(run.stdout))
    # Nothing lost or doubled: every readable image trained on or held out, each epoch once.
    trained = re.search(r"trained 2 epochs on (\d+) images \((\d+) normal images held out", run.stdout)
    assert trained and int(trained[1]) + int(trained[2]) == 12 and "images skipped: 1" in run.stdout
    keys = set(s3_server.list_keys(bucket, "run/"))
    assert {"run/job.json", "run/history.json", "run/best/ssm.json", "run/best/model.pt"} <= keys
    import json

    history = json.loads(s3_server.client().get_object(Bucket=bucket, Key="run/history.json")["Body"].read())
    assert [row["epoch"] for row in history] == [1, 2]
    assert {k.split("/")[2] for k in keys if k.startswith("run/train/epoch_")} <= {"epoch_0001", "epoch_0002"}

    # The checkpoint loads and evaluates (read back from the clean server).
    import torch

    from ssm.checkpoint import load_checkpoint
    from ssm.data import decode_image

    monkeypatch.setenv("SSM_CACHE_DIR", str(tmp_path / "cache"))
    best = load_checkpoint(storage.localize(f"s3://{bucket}/run"))
    assert best.calibration is not None and best.meta["epoch"] in (1, 2)
    images = torch.stack([torch.from_numpy(decode_image(_png(seed), 3, SIZE)[0]) for seed in (100, 101)])
    scores = best.scorer().score(images).image_scores
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def _output_rows(out: str) -> dict:
    """Every row of the scoring output (read with the clean server), by key; fails on a doubled key."""
    fs, root = storage.fsspec_for(out)
    fs.invalidate_cache()
    rows = []
    for path in sorted(fs.ls(root)):
        if re.fullmatch(r"part-[0-9a-f-]+\.parquet", path.rsplit("/", 1)[-1]):
            with fs.open(path, "rb") as f:
                rows += pq.read_table(f).to_pylist()
    keys = [(r["path"], r["member"]) for r in rows]
    assert len(keys) == len(set(keys)), "an image has two rows"
    return dict(zip(keys, rows))


def test_scoring_and_rerun_through_flaky_storage_give_one_row_per_image(flaky_training, s3_server):
    train_bucket, trained, _ = flaky_training
    assert trained.returncode == 0, trained.stdout + trained.stderr
    bucket = s3_server.make_bucket("flaky-score")
    client = s3_server.client()
    images = {f"images/{i:03d}.png": _png(200 + i) for i in range(20)}
    images["images/corrupt.png"] = _png(300)[:60]
    for key, data in images.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    out = f"s3://{bucket}/scores"
    args = ("score", f"s3://{bucket}/images/", "--checkpoint", f"s3://{train_bucket}/run", "--out", out,
            "--batch-size", "4")

    with FaultyS3Proxy(s3_server.endpoint_url, fault_rate=FAULT_RATE, seed=12) as proxy:
        # Besides the drawn faults, a SlowDown on one image read by a decode task: a retry in a Ray worker.
        proxy.script[("GET", f"/{bucket}/images/007.png")] = ["503"]
        t0 = time.perf_counter()
        first = _cli(*args, endpoint=proxy.endpoint_url)
        print(f"ssm score through the proxy: {time.perf_counter() - t0:.1f} s, {proxy.requests} requests, "
              f"faults {dict(proxy.injected)}; reported: {_retries_line(first.stdout)}; "
              f"faults met by botocore: {sum(c == 'botocore' for *_, c in proxy.failed)}")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "scored 20 images, 1 errors" in first.stdout
    assert sum(proxy.injected.values()) > 0 and _retries_line(first.stdout) > 0, first.stdout
    _assert_counted(proxy, _retries_line(first.stdout))
    rows = _output_rows(out)
    assert set(rows) == {(f"s3://{bucket}/{key}", None) for key in images}
    assert [k for k, r in rows.items() if r["error"]] == [(f"s3://{bucket}/images/corrupt.png", None)]
    assert rows[(f"s3://{bucket}/images/corrupt.png", None)]["error_kind"] == "permanent"

    # Rerun after new images arrived: only they are scored, every image still has exactly one row.
    for i in range(20, 24):
        key = f"images/{i:03d}.png"
        images[key] = _png(200 + i)
        client.put_object(Bucket=bucket, Key=key, Body=images[key])
    with FaultyS3Proxy(s3_server.endpoint_url, fault_rate=FAULT_RATE, seed=13) as proxy:
        again = _cli(*args, endpoint=proxy.endpoint_url)
        print(f"ssm score rerun through the proxy: {proxy.requests} requests, faults {dict(proxy.injected)}; "
              f"reported: {_retries_line(again.stdout)}")
    _assert_counted(proxy, _retries_line(again.stdout))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "scored 4 images, 0 errors" in again.stdout and "(21 already in the output)" in again.stdout
    rerun_rows = _output_rows(out)
    assert set(rerun_rows) == {(f"s3://{bucket}/{key}", None) for key in images}
    assert all(rerun_rows[k]["image_score"] == r["image_score"] for k, r in rows.items() if not r["error"])
    assert not any(k.endswith(".ssm-score.lock") for k in s3_server.list_keys(bucket))


def test_jobs_on_a_clean_storage_count_no_retries(s3_server, ray_local, tmp_path, monkeypatch):
    """The same jobs in this process on the clean server (the Ray of conftest.py): the count is 0."""
    from jobs.score import score
    from jobs.train import train
    from ssm.model import ModelConfig
    from ssm.training import TrainConfig

    bucket = s3_server.make_bucket()
    _upload_mvtec(s3_server, bucket, n_train=8)
    result = train(f"s3://{bucket}/data", f"s3://{bucket}/run", model_config=ModelConfig(width=8, img_size=SIZE),
                   cfg=TrainConfig(epochs=1, batch_size=4, val_fraction=0.3, min_calibration_images=2),
                   workers=1, cpus_per_worker=1, keep=1)
    assert result.s3_retries == 0 and len(result.history) == 1

    client = s3_server.client()
    for i in range(6):
        client.put_object(Bucket=bucket, Key=f"images/{i}.png", Body=_png(400 + i))
    monkeypatch.setenv("SSM_CACHE_DIR", str(tmp_path / "cache"))  # the actors download the checkpoint too
    summary = score([f"s3://{bucket}/images/"], f"s3://{bucket}/run", f"s3://{bucket}/scores",
                    batch_size=4, progress=False)
    assert summary.scored == 6 and summary.s3_retries == 0
    assert "S3 request retries" not in summary.describe()


def test_score_lock_survives_its_own_put_whose_answer_was_lost(s3_server, through):
    """The lock's conditional put is carried out but its answer is lost: the client's retry is refused (the
    object exists), and the run must see that the lock there is its own, not another run's."""
    from jobs.score_output import OutputLock
    from ssm.data import DataError

    bucket = s3_server.make_bucket()
    out = f"s3://{bucket}/scores"
    with FaultyS3Proxy(s3_server.endpoint_url, fault_rate=0.0) as proxy:
        proxy.script[("PUT", f"/{bucket}/scores/.ssm-score.lock")] = ["lost"]
        through(proxy.endpoint_url)
        with OutputLock(out):
            assert proxy.injected["lost"] == 1
            assert s3_server.list_keys(bucket) == ["scores/.ssm-score.lock"]
            with pytest.raises(DataError, match="being written by another ssm score run"):
                OutputLock(out).__enter__()  # another run is still refused
        assert s3_server.list_keys(bucket) == []  # released
