"""Checks (and worked examples) for S3 access against the loopback moto server.

These pin down the access patterns the jobs rely on: boto3/s3fs/pyarrow reach
the endpoint from the AWS_* environment, and Ray Data reads/writes ``s3://``
URIs either implicitly (URI + env) or through ``jobs.storage.filesystem_for``.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from jobs.storage import filesystem_for, fsspec_for, is_remote, join


def _png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------
# jobs.storage helpers that need no server
# --------------------------------------------------------------------------


def test_join_and_is_remote():
    assert join("s3://b/runs/", "exp", "/ckpt.pt") == "s3://b/runs/exp/ckpt.pt"
    assert join("s3://b", "k") == "s3://b/k"
    assert join("s3://b/p") == "s3://b/p"
    assert join("/tmp/a", "b", "c") == os.path.join("/tmp/a", "b", "c")
    assert is_remote("s3://b/k") and is_remote("gs://b/k")
    assert not is_remote("/tmp/x") and not is_remote("file:///tmp/x")
    assert not is_remote("relative/dir")


def test_filesystem_for_local(tmp_path):
    assert filesystem_for(str(tmp_path)) == (None, str(tmp_path))
    assert filesystem_for(f"file://{tmp_path}/") == (None, str(tmp_path))
    fs, path = fsspec_for(str(tmp_path / "x.txt"))
    fs.pipe(path, b"local")
    assert (tmp_path / "x.txt").read_bytes() == b"local"


# --------------------------------------------------------------------------
# Plain clients against moto
# --------------------------------------------------------------------------


def test_env_points_clients_at_moto(s3_server):
    import boto3
    import s3fs

    assert os.environ["AWS_ENDPOINT_URL_S3"] == s3_server.endpoint_url
    assert boto3.client("s3").meta.endpoint_url == s3_server.endpoint_url
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.connect()
    assert fs.s3.meta.endpoint_url == s3_server.endpoint_url


def test_s3fs_write_read(s3_server):
    bucket = s3_server.make_bucket()
    # fsspec_for: s3fs with the endpoint from the environment.
    fs, path = fsspec_for(f"s3://{bucket}/dir/hello.txt")
    assert path == f"{bucket}/dir/hello.txt"
    with fs.open(path, "wb") as f:
        f.write(b"hello")
    assert fs.cat(path) == b"hello"
    assert fs.ls(f"{bucket}/dir") == [path]
    assert s3_server.list_keys(bucket) == ["dir/hello.txt"]


def test_pyarrow_filesystem_write_read(s3_server):
    """pyarrow writes go through multipart upload (needs the moto patch)."""
    bucket = s3_server.make_bucket()
    uri = f"s3://{bucket}/a/b.bin"

    fs, path = filesystem_for(uri)
    assert isinstance(fs, pyarrow.fs.S3FileSystem) and path == f"{bucket}/a/b.bin"
    with fs.open_output_stream(path) as f:
        f.write(b"x" * 1000)

    # FileSystem.from_uri honours AWS_ENDPOINT_URL(_S3) too ...
    fs2, path2 = pyarrow.fs.FileSystem.from_uri(uri)
    with fs2.open_input_file(path2) as f:
        assert f.read() == b"x" * 1000
    # ... but the bare constructor does not (it would go to amazonaws.com),
    # which is why jobs.storage passes endpoint_override explicitly.


# --------------------------------------------------------------------------
# Ray Data against moto
# --------------------------------------------------------------------------


def test_ray_workers_inherit_aws_env(s3_server, ray_local):
    import ray

    @ray.remote
    def worker_env():
        return os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ENDPOINT_URL")

    assert ray.get(worker_env.remote()) == (s3_server.endpoint_url,) * 2


@pytest.mark.parametrize("explicit_fs", [False, True], ids=["uri", "filesystem_for"])
def test_ray_data_images_to_parquet(s3_server, ray_local, explicit_fs):
    import ray
    from PIL import Image

    bucket = s3_server.make_bucket()
    fs, root = fsspec_for(f"s3://{bucket}")
    for i in range(5):
        fs.pipe(f"{root}/images/good/{i:03d}.png", _png(i))

    src, out = f"s3://{bucket}/images/", f"s3://{bucket}/out/"
    if explicit_fs:
        src_fs, src_path = filesystem_for(src)
        ds = ray.data.read_binary_files(src_path, include_paths=True, filesystem=src_fs)
    else:
        ds = ray.data.read_binary_files(src, include_paths=True)

    def decode(row):
        arr = np.asarray(Image.open(io.BytesIO(row["bytes"])))
        return {"path": row["path"], "mean": float(arr.mean())}

    scored = ds.map(decode)
    if explicit_fs:
        out_fs, out_path = filesystem_for(out)
        scored.write_parquet(out_path, filesystem=out_fs)
    else:
        scored.write_parquet(out)

    # Paths come back prefix-stripped ("bucket/key"), in both modes.
    expected = {f"{bucket}/images/good/{i:03d}.png" for i in range(5)}
    # pyarrow also leaves an empty "out/" directory-marker object.
    keys = [k for k in s3_server.list_keys(bucket, "out/") if not k.endswith("/")]
    assert keys and all(k.endswith(".parquet") for k in keys)

    out_fs, out_path = filesystem_for(out)
    table = pq.read_table(out_path, filesystem=out_fs)
    assert set(table.column("path").to_pylist()) == expected
    assert set(table.column_names) == {"path", "mean"}

    back = ray.data.read_parquet(out).to_pandas()
    assert set(back["path"]) == expected
