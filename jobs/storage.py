"""Storage helpers shared by the Ray jobs.

Everything that reads or writes job inputs/outputs goes through these helpers so
that the same code works for local paths and ``s3://`` URIs, including S3-
compatible endpoints (MinIO, moto, ...) configured through the standard AWS
environment variables:

* ``AWS_ENDPOINT_URL_S3`` (takes precedence) or ``AWS_ENDPOINT_URL`` - e.g.
  ``http://127.0.0.1:9000``. Ignored when ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS``
  is true, like botocore does.
* ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``.
* ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.

Two kinds of filesystem objects are handed out:

* :func:`filesystem_for` returns a ``pyarrow.fs.FileSystem`` (or ``None`` for
  local paths) plus the path to use with it. Pass both to Ray Data
  (``filesystem=``) and Ray Train (``RunConfig(storage_filesystem=...)``).
  The filesystem carries the endpoint explicitly, so it still reaches the
  right endpoint after being pickled into another process (credentials are
  still looked up there through the standard AWS chain).
* :func:`fsspec_for` returns an fsspec filesystem plus path for plain file
  access from Python (open/ls/put/get).

Note: ``pyarrow.fs.FileSystem.from_uri("s3://...")`` honours the endpoint
variables, but the bare ``pyarrow.fs.S3FileSystem()`` constructor does not,
which is why the endpoint is passed explicitly here.
"""

from __future__ import annotations

import os
import posixpath
from typing import TYPE_CHECKING, Optional, Tuple
from urllib.parse import urlsplit

if TYPE_CHECKING:  # pragma: no cover
    import fsspec
    import pyarrow.fs

_LOCAL_SCHEMES = ("", "file", "local")
_S3_SCHEMES = ("s3", "s3a", "s3n")
_TRUE = ("1", "true", "yes", "on")


def _scheme(uri: str) -> str:
    uri = os.fspath(uri)
    if "://" not in uri:
        return ""
    return uri.split("://", 1)[0].lower()


def is_remote(uri: str) -> bool:
    """True when ``uri`` names a non-local location (``s3://``, ``gs://``, ...)."""
    return _scheme(uri) not in _LOCAL_SCHEMES


def _local_path(uri: str) -> str:
    uri = os.fspath(uri)
    if "://" in uri:
        uri = uri.split("://", 1)[1]
    return os.path.abspath(os.path.expanduser(uri))


def _strip_scheme(uri: str) -> str:
    """``s3://bucket/key/`` -> ``bucket/key``."""
    return uri.split("://", 1)[1].rstrip("/")


def join(uri: str, *parts: str) -> str:
    """Join path components onto a local path or a URI.

    ``join("s3://b/runs", "exp", "x.pt") == "s3://b/runs/exp/x.pt"``
    """
    uri = os.fspath(uri)
    parts = tuple(os.fspath(p) for p in parts)
    if not is_remote(uri):
        return os.path.join(uri, *parts)
    scheme, rest = uri.split("://", 1)
    cleaned = [p.strip("/") for p in parts if p.strip("/")]
    if not cleaned:
        return uri
    return f"{scheme}://" + posixpath.join(rest.rstrip("/") or rest, *cleaned)


def s3_endpoint_url() -> Optional[str]:
    """The custom S3 endpoint configured in the environment, if any."""
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() in _TRUE:
        return None
    return (
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    ) or None


def _region() -> Optional[str]:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def _pyarrow_s3(endpoint: str) -> "pyarrow.fs.S3FileSystem":
    import pyarrow.fs

    parsed = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    return pyarrow.fs.S3FileSystem(
        endpoint_override=parsed.netloc + parsed.path.rstrip("/"),
        scheme=parsed.scheme or "https",
        region=_region() or "us-east-1",
        # Credentials are deliberately not copied in: the AWS SDK default chain
        # (env vars, config files, instance metadata) resolves them in each
        # process, so secrets are not pickled into Ray tasks.
    )


def filesystem_for(uri: str) -> Tuple[Optional["pyarrow.fs.FileSystem"], str]:
    """Return ``(pyarrow filesystem or None, path)`` for Ray readers/writers.

    * local path / ``file://`` -> ``(None, absolute local path)``
    * ``s3://bucket/key`` with a custom endpoint in the environment ->
      ``(S3FileSystem(endpoint_override=..., scheme=...), "bucket/key")``
    * any other URI -> ``pyarrow.fs.FileSystem.from_uri(uri)`` (for real AWS
      this also resolves the bucket's region).
    """
    uri = os.fspath(uri)
    scheme = _scheme(uri)
    if scheme in _LOCAL_SCHEMES:
        return None, _local_path(uri)
    if scheme in _S3_SCHEMES:
        endpoint = s3_endpoint_url()
        if endpoint:
            return _pyarrow_s3(endpoint), _strip_scheme(uri)
        if scheme != "s3":
            uri = "s3://" + uri.split("://", 1)[1]
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/") or path


def fsspec_for(uri: str) -> Tuple["fsspec.AbstractFileSystem", str]:
    """Return ``(fsspec filesystem, path)`` for plain Python file access."""
    import fsspec

    uri = os.fspath(uri)
    scheme = _scheme(uri)
    if scheme in _LOCAL_SCHEMES:
        return fsspec.filesystem("file"), _local_path(uri)
    if scheme in _S3_SCHEMES:
        import s3fs

        kwargs = {}
        endpoint = s3_endpoint_url()
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        return s3fs.S3FileSystem(**kwargs), _strip_scheme(uri)
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


# The reachability check of a remote location: a down or unroutable endpoint fails within seconds instead of
# after botocore's and s3fs's retries with backoff (about 40 s), and with one line instead of their traceback.
PROBE_CONNECT_TIMEOUT_S = 3.0
PROBE_READ_TIMEOUT_S = 10.0


def probe(uri: str) -> Tuple["fsspec.AbstractFileSystem", str]:
    """``(fsspec filesystem, path)`` like :func:`fsspec_for`, after checking that something is at ``uri``.

    S3 is asked once, with short connect/read timeouts and no retries (a filesystem of its own: the shared
    one keeps the defaults for bulk reads). Raises FileNotFoundError when nothing is there and
    ConnectionError (one line, naming the endpoint) when the storage cannot be reached or refuses.
    """
    uri = os.fspath(uri)
    if _scheme(uri) not in _S3_SCHEMES:
        fs, path = fsspec_for(uri)
    else:
        import s3fs

        kwargs = {"endpoint_url": s3_endpoint_url()} if s3_endpoint_url() else {}
        fs = s3fs.S3FileSystem(**kwargs, skip_instance_cache=True, config_kwargs={
            "connect_timeout": PROBE_CONNECT_TIMEOUT_S, "read_timeout": PROBE_READ_TIMEOUT_S,
            "retries": {"max_attempts": 1, "mode": "standard"}})
        fs.retries = 1  # s3fs's own retry loop around botocore's
        path = _strip_scheme(uri)
    try:
        fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: nothing there; check the URI.") from None
    except Exception as e:  # connection refused, timeouts, DNS, access denied, bad credentials
        where = (s3_endpoint_url() or "AWS S3") if _scheme(uri) in _S3_SCHEMES else _scheme(uri)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConnectionError(f"{uri}: cannot reach the storage at {where} ({type(e).__name__}: {first}); check the "
                              "endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), the network and the credentials.") from e
    return fs, path


def localize(uri: str, cache_dir: Optional[str] = None) -> str:
    """A local directory for a checkpoint given as a local path or a remote URI.

    Local paths come back unchanged. A remote checkpoint directory (or a training
    run directory, of which only ``best/`` is fetched) is downloaded into
    ``cache_dir`` (default ``$SSM_CACHE_DIR`` or ``~/.cache/ssm``) under a name
    derived from the URI and the files' sizes and ETags, so a later call reuses
    it until the checkpoint changes. Each download lands in a temporary folder
    that is renamed into place, so concurrent callers never see half a copy.

    ``localize("s3://bucket/runs/bottle")`` -> ``~/.cache/ssm/<hash>/best``
    """
    import hashlib
    import json
    import shutil
    import tempfile

    uri = os.fspath(uri)
    if not is_remote(uri):
        return uri
    fs, path = probe(uri)  # fails fast and in one line when the storage is down or nothing is there
    path = path.rstrip("/")
    if not fs.isfile(f"{path}/ssm.json") and fs.isfile(f"{path}/best/ssm.json"):
        path, leaf = f"{path}/best", "best"  # a run directory: its best checkpoint
    else:
        leaf = posixpath.basename(path) or "checkpoint"
    files = fs.find(path, detail=True)
    if not files:
        raise FileNotFoundError(f"{uri}: nothing there; check the checkpoint URI.")
    identity = json.dumps(
        [uri] + [[name, info.get("size"), str(info.get("ETag") or info.get("mtime"))]
                 for name, info in sorted(files.items())]
    )
    root = cache_dir or os.environ.get("SSM_CACHE_DIR") or os.path.expanduser("~/.cache/ssm")
    target = os.path.join(root, hashlib.sha256(identity.encode()).hexdigest()[:16])
    if not os.path.isdir(target):
        os.makedirs(root, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".download-", dir=root)
        bulk, _ = fsspec_for(uri)  # the default timeouts and retries for the downloads themselves
        for name in files:
            local = os.path.join(staging, leaf, posixpath.relpath(name, path))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            bulk.get_file(name, local)
        try:
            os.rename(staging, target)
        except OSError:  # another process put the same checkpoint there first
            shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(target, leaf)
