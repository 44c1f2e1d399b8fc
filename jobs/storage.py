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

Retries. Object stores answer now and then with 503 SlowDown, 500 or a dropped
connection; every S3 filesystem handed out here retries such requests, set
explicitly rather than left to each library's default:

* ``SSM_S3_RETRIES`` (default 10): the most attempts of one S3 request, the
  first included (1 turns retries off). botocore (s3fs) retries in its
  "standard" mode (5xx, throttling, connection errors; exponential backoff
  with jitter), pyarrow with ``AwsStandardS3RetryStrategy``; s3fs's own loop
  around botocore adds at most ``S3FS_RETRIES`` tries for what botocore does
  not retry (a body cut off while it is read).
* :func:`configure_ray_data` adds the same errors to Ray Data's
  ``DataContext.retried_io_errors``, so a read or write that still fails
  after those attempts is tried again by Ray Data.
* Retries of botocore requests are counted (:class:`RetryCount`): the jobs
  report them in their summary. pyarrow's (the AWS C++ SDK's) retries are made
  but not reported by pyarrow, so they are not in the count.
"""

from __future__ import annotations

import logging
import os
import posixpath
import threading
import time
import warnings
from typing import TYPE_CHECKING, Optional, Tuple
from urllib.parse import urlsplit

if TYPE_CHECKING:  # pragma: no cover
    import fsspec
    import pyarrow.fs

_LOCAL_SCHEMES = ("", "file", "local")
_S3_SCHEMES = ("s3", "s3a", "s3n")
_TRUE = ("1", "true", "yes", "on")

log = logging.getLogger(__name__)

RETRIES_ENV = "SSM_S3_RETRIES"
DEFAULT_S3_RETRIES = 10
S3FS_RETRIES = 3  # s3fs's loop around botocore's: tries for errors botocore does not retry (a body cut off)
# Ray Data retries a read or write whose error message holds one of these (besides its own defaults): what
# S3 and the two clients say for a busy or failing server and a dropped connection.
RAY_DATA_RETRIED_ERRORS = (
    "SlowDown", "SLOW_DOWN", "reduce your request rate", "ServiceUnavailable", "SERVICE_UNAVAILABLE",
    "InternalError", "INTERNAL_FAILURE", "HTTP status 500", "HTTP status 503", "NETWORK_CONNECTION",
    "Connection reset", "Connection was closed", "ConnectionClosedError", "Empty reply from server",
)


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


def s3_retries() -> int:
    """The most attempts of one S3 request: ``$SSM_S3_RETRIES``, default 10."""
    raw = os.environ.get(RETRIES_ENV, "").strip()
    if not raw:
        return DEFAULT_S3_RETRIES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{RETRIES_ENV}={raw!r}: give the most attempts of one S3 request, a whole number of at "
                         f"least 1 (1: no retries; default {DEFAULT_S3_RETRIES}).")
    return value


def _s3_filesystem_class():
    import pyarrow.fs

    class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
        """pyarrow's S3FileSystem with a standard retry strategy of `max_attempts` that survives pickling
        (pyarrow's own pickling drops the retry strategy, so Ray tasks would get the default 3 attempts)."""

        def __init__(self, max_attempts: int, **kwargs):
            super().__init__(retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
                             **kwargs)
            self.max_attempts, self.options = max_attempts, kwargs

        def __reduce__(self):
            return _pyarrow_s3_with, (self.max_attempts, self.options)

    return RetryingS3FileSystem


_RETRYING_S3 = None


def _pyarrow_s3_with(max_attempts: int, options: dict) -> "pyarrow.fs.S3FileSystem":
    global _RETRYING_S3
    if _RETRYING_S3 is None:
        _RETRYING_S3 = _s3_filesystem_class()
    return _RETRYING_S3(max_attempts, **options)


def _pyarrow_s3(endpoint: Optional[str], region: Optional[str] = None) -> "pyarrow.fs.S3FileSystem":
    options = {"region": region or _region() or "us-east-1"}
    if endpoint:
        parsed = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=parsed.netloc + parsed.path.rstrip("/"), scheme=parsed.scheme or "https")
    # Credentials are deliberately not copied in: the AWS SDK default chain
    # (env vars, config files, instance metadata) resolves them in each
    # process, so secrets are not pickled into Ray tasks.
    return _pyarrow_s3_with(s3_retries(), options)


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
    if isinstance(fs, pyarrow.fs.S3FileSystem):  # AWS: the bucket's region as resolved, with our retries
        fs = _pyarrow_s3(None, fs.region)
    return fs, path.rstrip("/") or path


def fsspec_for(uri: str) -> Tuple["fsspec.AbstractFileSystem", str]:
    """Return ``(fsspec filesystem, path)`` for plain Python file access."""
    import fsspec

    uri = os.fspath(uri)
    scheme = _scheme(uri)
    if scheme in _LOCAL_SCHEMES:
        return fsspec.filesystem("file"), _local_path(uri)
    if scheme in _S3_SCHEMES:
        return _s3fs(s3_retries(), S3FS_RETRIES), _strip_scheme(uri)
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def _s3fs(attempts: int, s3fs_retries: int, **options) -> "fsspec.AbstractFileSystem":
    """An s3fs filesystem whose botocore client makes at most `attempts` tries of each request ("standard"
    retry mode) and counts its retries (RetryCount); fsspec caches it per process, thread and arguments."""
    global _COUNTED_S3FS
    if _COUNTED_S3FS is None:
        _COUNTED_S3FS = _counted_s3fs_class()
    endpoint = s3_endpoint_url()
    # total_max_attempts counts the first try too (botocore's max_attempts does not), as pyarrow's max_attempts does.
    config = {**options.pop("config_kwargs", {}), "retries": {"total_max_attempts": attempts, "mode": "standard"}}
    fs = _COUNTED_S3FS(**({"endpoint_url": endpoint} if endpoint else {}), **options, config_kwargs=config)
    fs.retries = s3fs_retries  # s3fs's own loop (an attribute, not a constructor argument)
    return fs


_COUNTED_S3FS = None


def _counted_s3fs_class():
    import s3fs

    class CountedS3FileSystem(s3fs.S3FileSystem):
        """s3fs whose botocore client reports each retry to this process's retry count."""

        async def set_session(self, refresh=False, kwargs={}):
            client = await super().set_session(refresh=refresh, kwargs=kwargs)
            client.meta.events.register("request-created.s3", _count_retry, unique_id="ssm-count-s3-retries")
            return client

    return CountedS3FileSystem


# --------------------------------------------------------------------------------------------------------
# Counting retries: each process counts its own; a job's Ray workers report theirs to the job's tally actor


_retries = 0
_retries_lock = threading.Lock()
_tallies: dict = {}  # tally actor name -> handle
TALLY_PREFIX = "ssm-s3-retries-"


def retries_so_far() -> int:
    """S3 request retries made by this process since it started."""
    return _retries


def _count_retry(request=None, **_) -> None:
    """botocore's request-created event: a request whose attempt number is above 1 is a retry."""
    attempt = getattr(request, "context", {}).get("retries", {}).get("attempt", 1)
    if attempt > 1:
        add_retries(1)


def add_retries(n: int) -> None:
    """Count `n` retries in this process; a Ray worker also reports them to its job's tally (RetryCount)."""
    global _retries
    with _retries_lock:
        _retries += n
    try:
        import ray

        if not ray.is_initialized():
            return
        context = ray.get_runtime_context()
        if context.worker.mode != ray.WORKER_MODE:  # the driver counts its own
            return
        name = TALLY_PREFIX + context.get_job_id()
        if name not in _tallies:
            try:
                _tallies[name] = ray.get_actor(name)
            except ValueError:  # a job that does not count (yet): looked up again at the next retry
                return
        ray.get(_tallies[name].add.remote(n), timeout=30)  # recorded before the task that retried ends
    except Exception as e:  # counting must never fail the I/O it counts
        log.debug("could not report %d S3 retries: %s", n, e)


class _Tally:
    """Ray actor: the S3 request retries reported by one job's worker processes."""

    def __init__(self):
        self.n = 0

    def add(self, n: int) -> None:
        self.n += n

    def total(self) -> int:
        return self.n


class RetryCount:
    """The S3 request retries of one job: this process's since the count started, plus those its Ray
    workers report while the count is attached to the running Ray (`attach` ... `detach`, before shutdown).

    >>> count = RetryCount()        # at the start of the job
    >>> count.attach(); ...; count.detach()   # around the Ray part
    >>> count.total                 # at the end
    """

    def __init__(self):
        self.start = retries_so_far()
        self.remote = 0
        self._actor = None

    def attach(self) -> None:
        import ray

        name = TALLY_PREFIX + ray.get_runtime_context().get_job_id()
        self._actor = ray.remote(_Tally).options(name=name, get_if_exists=True, num_cpus=0).remote()
        self._base = ray.get(self._actor.total.remote())

    def detach(self) -> None:
        import ray

        if self._actor is not None:  # the actor lives on with the job: workers keep their handles to it
            try:
                self.remote += ray.get(self._actor.total.remote(), timeout=30) - self._base
            except Exception as e:  # e.g. Ray itself failing: not worth hiding the job's own error for
                log.warning("could not collect the Ray workers' S3 retry count: %s", e)
            self._actor = None

    @property
    def total(self) -> int:
        return retries_so_far() - self.start + self.remote


def configure_ray_data(context=None) -> None:
    """Add RAY_DATA_RETRIED_ERRORS to Ray Data's retried read/write errors (of `context`, default the current
    DataContext): Ray Data tries such a file operation again (up to 10 times, with backoff) once the client's
    own retries are spent."""
    import ray.data

    context = context or ray.data.DataContext.get_current()
    merged = list(dict.fromkeys([*context.retried_io_errors, *RAY_DATA_RETRIED_ERRORS]))
    with warnings.catch_warnings():  # Ray warns about any change from its defaults (they become regexes)
        warnings.simplefilter("ignore", DeprecationWarning)
        context.retried_io_errors = merged


# The reachability check of a remote location: a down or unroutable endpoint fails within seconds instead of
# after botocore's and s3fs's retries with backoff (about 40 s), and with one line instead of their traceback.
PROBE_CONNECT_TIMEOUT_S = 3.0
PROBE_READ_TIMEOUT_S = 10.0
# A storage that answers, but busy or failing (5xx, SlowDown, a connection dropped after it was made), is asked
# again this many times in all; if it is still busy it counts as reachable: the job's own requests retry.
PROBE_ATTEMPTS = 3
_BUSY_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
               "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}


def _busy(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) says the storage answered but is busy or failing now,
    rather than that it cannot be reached (refused, unroutable, DNS) or refuses us (credentials, access)."""
    import botocore.exceptions as bex

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, bex.ClientError):
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return status >= 500 or error.response.get("Error", {}).get("Code") in _BUSY_CODES
        if isinstance(error, (bex.ConnectionClosedError, bex.ReadTimeoutError)):
            return True
        if isinstance(error, (bex.EndpointConnectionError, bex.ConnectTimeoutError)):
            return False
        error = error.__cause__ or error.__context__
    return False


def probe(uri: str) -> Tuple["fsspec.AbstractFileSystem", str]:
    """``(fsspec filesystem, path)`` like :func:`fsspec_for`, after checking that something is at ``uri``.

    S3 is asked with short connect/read timeouts and no client retries (a filesystem of its own), so that a
    down endpoint fails at once; a busy answer (5xx, SlowDown, a dropped connection) is asked again up to
    PROBE_ATTEMPTS times in all, and after that counts as reachable. Raises FileNotFoundError when nothing is
    there and ConnectionError (one line, naming the endpoint) when the storage cannot be reached or refuses.
    The filesystem returned is the shared one, with the usual retries (SSM_S3_RETRIES).
    """
    uri = os.fspath(uri)
    if _scheme(uri) not in _S3_SCHEMES:
        fs = checked = fsspec_for(uri)[0]
    else:
        fs = fsspec_for(uri)[0]
        checked = _s3fs(1, 1, skip_instance_cache=True, config_kwargs={
            "connect_timeout": PROBE_CONNECT_TIMEOUT_S, "read_timeout": PROBE_READ_TIMEOUT_S})
    path = fsspec_for(uri)[1]
    for attempt in range(1, PROBE_ATTEMPTS + 1):
        try:
            checked.info(path)
            break
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri}: nothing there; check the URI.") from None
        except Exception as e:  # connection refused, timeouts, DNS, access denied, bad credentials, busy
            if _busy(e) and attempt < PROBE_ATTEMPTS:
                add_retries(1)
                time.sleep(0.2 * 2**attempt)
                continue
            if _busy(e):
                log.warning("%s: the storage answered busy %d times (%s); going on, its requests are retried",
                            uri, PROBE_ATTEMPTS, type(e).__name__)
                break
            where = (s3_endpoint_url() or "AWS S3") if _scheme(uri) in _S3_SCHEMES else _scheme(uri)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ConnectionError(f"{uri}: cannot reach the storage at {where} ({type(e).__name__}: {first}); check "
                                  "the endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), the network and the "
                                  "credentials.") from e
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
    fs.invalidate_cache()  # the shared filesystem may have listed this prefix before it was written
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
        for name in files:
            local = os.path.join(staging, leaf, posixpath.relpath(name, path))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get_file(name, local)
        try:
            os.rename(staging, target)
        except OSError:  # another process put the same checkpoint there first
            shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(target, leaf)
