"""Shared pytest fixtures: a real S3 endpoint on loopback and a local Ray cluster.

Fixtures (all session scoped):

``s3_server``
    A moto S3 server on ``127.0.0.1:<free port>``. While it runs, the process
    environment points every AWS client at it (boto3/botocore, s3fs/aiobotocore,
    ``pyarrow.fs.FileSystem.from_uri`` and ``jobs.storage``) with dummy
    credentials. No buckets exist initially; use ``s3_server.make_bucket()``.

``ray_local``
    ``ray.init(num_cpus=4, include_dashboard=False)`` local cluster. It depends
    on ``s3_server`` so the AWS variables are already in ``os.environ`` when
    Ray starts; the raylet and every worker process it forks inherit them, so
    ``s3://`` URIs work inside Ray Data tasks and Ray Train workers too. It
    also puts the repo root and ``tests/`` on the workers' ``PYTHONPATH`` (so
    functions defined in test modules unpickle there) and sets
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5`` to make Ray Train runs faster.

Example::

    def test_roundtrip(s3_server, ray_local):
        bucket = s3_server.make_bucket()
        ds = ray.data.range(3)
        ds.write_parquet(f"s3://{bucket}/out/")
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

# Make the repository's top-level packages (``ssm``, ``jobs``) importable
# without installing the project.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _patch_moto_complete_multipart() -> None:
    """Work around a moto 5.2.x response bug that breaks pyarrow's S3 writes.

    moto 5.2.1 answers CompleteMultipartUpload with a
    ``<CompleteMultipartUploadResponse>`` root element instead of AWS's
    ``<CompleteMultipartUploadResult>``. The AWS C++ SDK inside pyarrow then
    treats the 200 reply as an embedded error ("CompletedMultipartUpload got
    error embedded in a 200 OK response") and every pyarrow write to S3 fails
    (Ray Data ``write_parquet``, Ray Train checkpoint upload, ...). boto3 and
    s3fs ignore the root element and are unaffected.
    See https://github.com/getmoto/moto/issues/10055.

    The server runs in this process, so patching the serializer here fixes the
    replies for every client, including Ray worker processes. The patch is a
    no-op once moto emits the right element.
    """
    from moto.core import serialize

    original = serialize.S3Serializer._serialized_result_to_response
    if getattr(original, "_ssm_patched", False):
        return

    def _serialized_result_to_response(self, resp, result, shape, serialized_result):
        resp = original(self, resp, result, shape, serialized_result)
        if self.operation_model.name == "CompleteMultipartUpload":
            body = resp.get("body")
            wrong, right = "CompleteMultipartUploadResponse", "CompleteMultipartUploadResult"
            if isinstance(body, bytes):
                resp["body"] = body.replace(wrong.encode(), right.encode())
            elif isinstance(body, str):
                resp["body"] = body.replace(wrong, right)
        return resp

    _serialized_result_to_response._ssm_patched = True
    serialize.S3Serializer._serialized_result_to_response = _serialized_result_to_response


@dataclass
class S3Server:
    """Handle on the running moto S3 server."""

    endpoint_url: str
    host: str
    port: int
    region: str = "us-east-1"

    def client(self):
        """A boto3 S3 client for the server (explicit endpoint; env not needed)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name when ``name`` is None); return its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """All object keys in ``bucket`` under ``prefix``."""
        paginator = self.client().get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys


# Variables that would send clients elsewhere or change how they authenticate.
_AWS_VARS_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    _patch_moto_complete_multipart()

    host, port = "127.0.0.1", _free_port()
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    endpoint = f"http://{host}:{port}"

    empty_cfg = tmp_path_factory.mktemp("aws") / "empty"
    empty_cfg.write_text("")
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        # botocore >= 1.31 (boto3, s3fs via aiobotocore) and pyarrow's
        # FileSystem.from_uri both honour these; *_S3 wins over the generic one.
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        # Never look at the developer's real AWS config or EC2 metadata.
        "AWS_CONFIG_FILE": str(empty_cfg),
        "AWS_SHARED_CREDENTIALS_FILE": str(empty_cfg),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    no_proxy = ",".join(
        p for p in (os.environ.get("NO_PROXY"), "127.0.0.1,localhost") if p
    )
    env["NO_PROXY"] = env["no_proxy"] = no_proxy

    saved = {k: os.environ.get(k) for k in (*env, *_AWS_VARS_TO_CLEAR)}
    for key in _AWS_VARS_TO_CLEAR:
        os.environ.pop(key, None)
    os.environ.update(env)
    try:
        yield S3Server(endpoint_url=endpoint, host=host, port=port)
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray cluster started *after* the S3 variables are in the env."""
    import ray

    # Ray Train's controller polls workers every 2 s by default; each report()
    # and the end of a run wait for a poll, so a faster poll roughly halves the
    # duration of a tiny TorchTrainer run. The driver's value is forwarded to
    # the controller by TorchTrainer.fit().
    saved = {
        k: os.environ.get(k)
        for k in (
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
            "PYTHONPATH",
        )
    }
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Starting 2 torch workers takes ~10 s on an idle 2-core box but can pass
    # the 60 s default when the machine is busy.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")
    # Functions defined in test modules are pickled by reference
    # (``test_xxx.func``); pytest puts tests/ on the driver's sys.path only, so
    # put it (and the repo root) on the workers' path via the inherited env.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_ROOT), str(_ROOT / "tests"), saved["PYTHONPATH"]) if p
    )

    if ray.is_initialized():  # pragma: no cover - e.g. a test forgot to clean up
        ray.shutdown()
    ctx = ray.init(
        num_cpus=4,  # logical CPUs; the machine may have fewer physical cores
        include_dashboard=False,
    )
    try:
        yield ctx
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
