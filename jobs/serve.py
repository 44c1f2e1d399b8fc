"""Online scoring on Ray Serve: POST one image, get back its score, decision and heatmap.

One request flows the way a row of the scoring job does (jobs/score.py), through the same functions:

    POST /  body: the image's bytes, or multipart/form-data with a file field
        --read_upload (at most --max-bytes)--> bytes, and the name errors use (the upload's file name,
                                               or "request body")
        --decode_bytes (jobs/score.py, in a thread)--> pixels as the model takes them,
                                               or the error `ssm score` writes for those bytes -> 4xx
        --@serve.batch: up to --batch-size requests, waiting at most --batch-wait-ms for them
        --ScoreBatches (jobs/score.py, in a thread)--> score, decision, heatmap PNG
        --> 200 {"image_score", "is_anomaly", "threshold", "heatmap_png" (base64), "width", "height",
                 "frames", "checkpoint", "batch_size" (images scored together with this one)}

    GET /   the checkpoint id and configuration, the serving settings, and this replica's counts
            (requests, batches, images per batch size, CPU seconds used).

Errors are JSON {"error": one line}: 400 for bytes that are not a scorable image (same line as the error
column of `ssm score`), 413 for a body over --max-bytes, 404/405 for other routes and methods, 500 when
scoring itself fails.

Example (the CLI: ssm serve CKPT --port 8000; Serve config files and KubeRay import jobs.serve:build_app):

    served = start("runs/ssm/best", port=8000, batch_size=16)
    # curl --data-binary @image.png http://127.0.0.1:8000/
    stop(served)
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import ray
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from jobs import storage
from jobs.cluster import start_or_join, submitted_job
from jobs.score import ScoreBatches, decode_bytes, load_calibrated, too_large

APP_NAME = "ssm"
DEFAULT_MAX_BYTES = 64 << 20
RAW_BODY_NAME = "request body"  # what errors call an upload sent as the raw body (it has no file name)


class UploadError(Exception):
    """A request whose image cannot be read: `status` and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def _read_body(request: Request, max_bytes: int, name: str) -> bytes:
    """The whole body, refused (413) past max_bytes: before reading when Content-Length says so, else as
    soon as more has arrived."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise UploadError(413, too_large(name, int(declared)))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise UploadError(413, too_large(name, size))
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload(request: Request, max_bytes: int) -> tuple[str, bytes]:
    """(name, bytes) of the image in a POST: the raw body, or the one file field of multipart/form-data (any
    name; a form with two or more files is refused)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return RAW_BODY_NAME, await _read_body(request, max_bytes, RAW_BODY_NAME)
    body = await _read_body(request, max_bytes, "multipart upload")

    async def receive() -> dict:  # the body read above, handed to Starlette's form parser
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive).form(max_files=4, max_fields=16)
    except Exception as e:  # a malformed multipart body
        raise UploadError(400, f"multipart upload: cannot be parsed ({type(e).__name__}: {e}); send the image "
                               f"as a file field or as the raw body.") from e
    try:
        files = [(key, v) for key, v in form.multi_items() if not isinstance(v, str)]
        if not files:
            raise UploadError(400, "multipart upload: no file field; send the image as a file field (e.g. curl "
                                   "-F file=@image.png) or as the raw body.")
        if len(files) > 1:  # one answer for one image: never a score the client cannot tell apart
            names = ", ".join(v.filename or k for k, v in files)
            raise UploadError(400, f"multipart upload: {len(files)} files ({' '.join(names.splitlines())}); send one "
                                   f"image per request.")
        upload = files[0][1]
        name = " ".join((upload.filename or "").splitlines()) or RAW_BODY_NAME  # errors stay one line
        return name, await upload.read()
    finally:
        await form.close()


@serve.deployment(name="SSMScorer")
class SSMScorer:
    """One replica: loads the checkpoint once (as a scoring actor does) and scores batches of requests."""

    def __init__(self, checkpoint: str, info: dict, threshold: float, batch_size: int, batch_wait_ms: float,
                 threads: int, use_gpu: bool, max_bytes: int):
        self.scorer = ScoreBatches(checkpoint, info["checkpoint"], threshold, threads, use_gpu)
        self.model_config = self.scorer.scorer.model.config
        self.info = {**info, "device": str(self.scorer.scorer.device)}
        self.max_bytes = max_bytes
        self.score_batch.set_max_batch_size(batch_size)
        self.score_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        self.requests = 0
        self.batch_sizes: Counter[int] = Counter()

    async def __call__(self, request: Request) -> JSONResponse:
        if request.url.path != "/":
            return JSONResponse({"error": f"no route {request.url.path}; POST an image to / or GET / for the "
                                          f"checkpoint and settings."}, status_code=404)
        if request.method == "GET":
            return JSONResponse(self.describe())
        if request.method != "POST":
            return JSONResponse({"error": f"{request.method} is not served; POST an image, or GET for the "
                                          f"checkpoint and settings."}, status_code=405)
        self.requests += 1
        try:
            name, data = await read_upload(request, self.max_bytes)
        except UploadError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        pixels, width, height, frames, error = await asyncio.to_thread(decode_bytes, data, self.model_config, name)
        if error is not None:
            return JSONResponse({"error": error}, status_code=400)
        row = await self.score_batch((name, pixels, width, height, frames))
        if row["error"] is not None:
            return JSONResponse({"error": row["error"]}, status_code=500)
        return JSONResponse(row)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)  # both set per application in __init__
    async def score_batch(self, items: list[tuple]) -> list[dict]:
        """Decoded images -> their response rows, scored as one batch by the scoring job's actor code."""
        names, pixels, widths, heights, frames = zip(*items)
        column = np.empty(len(items), dtype=object)  # images may differ in size for a tiled model
        column[:] = pixels
        batch = {
            "path": np.array(names, dtype=str),
            "member": np.array([""] * len(items), dtype=str),
            "pixels": column,
            "width": np.array(widths, np.int32),
            "height": np.array(heights, np.int32),
            "frames": np.array(frames, np.int32),
            "error": np.array([""] * len(items), dtype=str),
        }
        table = await asyncio.to_thread(self.scorer, batch)
        self.batch_sizes[len(items)] += 1
        return [
            {
                "image_score": row["image_score"],
                "is_anomaly": row["is_anomaly"],
                "threshold": self.scorer.threshold,
                "heatmap_png": base64.b64encode(row["heatmap_png"]).decode() if row["heatmap_png"] else None,
                "width": row["width"],
                "height": row["height"],
                "frames": row["frames"],
                "checkpoint": row["checkpoint"],
                "batch_size": len(items),
                "error": row["error"],
            }
            for row in table.to_pylist()
        ]

    def describe(self) -> dict:
        return {
            **self.info,
            "replica": {
                "id": serve.get_replica_context().replica_tag,
                "requests": self.requests,
                "batches": sum(self.batch_sizes.values()),
                "images_scored": sum(n * k for n, k in self.batch_sizes.items()),
                "batch_sizes": {str(n): k for n, k in sorted(self.batch_sizes.items())},
                "cpu_seconds": time.process_time(),  # this replica's process, all threads
            },
        }


@dataclass
class Settings:
    """`ssm serve`'s settings, by the names of its flags (--batch-size is batch_size, ...)."""

    checkpoint: str  # local or s3://
    replicas: int = 1
    gpus_per_replica: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_replica: float | None = None  # default: 1 with GPUs, else the cluster's CPUs less one, shared
    batch_size: int = 32
    batch_wait_ms: float = 10.0
    threshold: float | None = None  # default: the checkpoint's calibrated one
    max_bytes: int = DEFAULT_MAX_BYTES

    def check(self) -> None:
        """ValueError naming the flag of the first setting out of range."""
        if self.replicas < 1 or self.batch_size < 1:
            raise ValueError(f"--replicas and --batch-size must be at least 1 (got {self.replicas} and "
                             f"{self.batch_size}).")
        if not self.batch_wait_ms >= 0:
            raise ValueError(f"--batch-wait-ms must be 0 or more, got {self.batch_wait_ms}.")
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise ValueError(f"--gpus-per-replica must be 0 or more, got {self.gpus_per_replica}.")
        if self.cpus_per_replica is not None and self.cpus_per_replica <= 0:
            raise ValueError(f"--cpus-per-replica must be above 0, got {self.cpus_per_replica}.")
        if self.max_bytes < 1:
            raise ValueError(f"--max-bytes must be at least 1, got {self.max_bytes}.")
        if self.threshold is not None and not np.isfinite(self.threshold):
            raise ValueError(f"--threshold must be a finite number, got {self.threshold}.")


def _prepare(settings: Settings):
    """The settings checked and the checkpoint loaded (no Ray needed): the checkpoint and the threshold."""
    settings.check()
    ckpt = load_calibrated(settings.checkpoint)
    return ckpt, float(ckpt.calibration.threshold if settings.threshold is None else settings.threshold)


def _bind(settings: Settings, ckpt, threshold: float) -> tuple[Application, dict]:
    """The application, its replicas sized on the connected cluster, and what GET / reports about it."""
    cluster = ray.cluster_resources()
    gpus = settings.gpus_per_replica
    gpus = (1.0 if cluster.get("GPU", 0) > 0 else 0.0) if gpus is None else float(gpus)
    cpus = settings.cpus_per_replica
    if cpus is None:
        cpus = 1.0 if gpus > 0 else max(1.0, (cluster.get("CPU", 2) - 1) // settings.replicas)
    info = {
        "checkpoint": ckpt.id,
        "model": ckpt.model_config.to_dict(),
        "scoring": ckpt.scoring.to_dict(),
        "calibration": ckpt.calibration.to_dict(),
        "threshold": threshold,
        "replicas": settings.replicas,
        "gpus_per_replica": gpus,
        "cpus_per_replica": cpus,
        "batch_size": settings.batch_size,
        "batch_wait_ms": settings.batch_wait_ms,
        "max_bytes": settings.max_bytes,
    }
    checkpoint = settings.checkpoint
    app = SSMScorer.options(
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
        max_ongoing_requests=2 * settings.batch_size,  # room for one batch being scored and the next gathering
    ).bind(
        checkpoint if storage.is_remote(checkpoint) else os.path.abspath(checkpoint),
        info,
        threshold,
        settings.batch_size,
        settings.batch_wait_ms,
        max(1, int(cpus)),
        gpus > 0,
        settings.max_bytes,
    )
    return app, info


def build_app(args: dict) -> Application:
    """The application for Serve's config files (`serve deploy`, KubeRay's RayService: import_path
    jobs.serve:build_app), `args` holding `ssm serve`'s settings by name (see Settings). Serve calls it on the
    cluster, where Ray is connected; host and port are the config file's http_options."""
    names = [f.name for f in dataclasses.fields(Settings)]
    unknown = sorted(set(args) - set(names))
    if unknown:
        raise ValueError(f"ssm serve's application has no setting {', '.join(unknown)}; its settings are "
                         f"{', '.join(names)}.")
    if "checkpoint" not in args:
        raise ValueError("ssm serve's application needs args.checkpoint: a checkpoint or training run (local or s3://).")
    settings = Settings(**args)
    return _bind(settings, *_prepare(settings))[0]


@dataclass
class Served:
    url: str
    started_ray: bool  # this process started Ray (and Serve on it): stop() shuts both down
    info: dict


def start(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          **settings) -> Served:
    """Serve `checkpoint` (local or s3://) over HTTP on host:port; returns once every replica is ready.

    `settings` are the rest of Settings (replicas, batch_size, ...). Uses the running Ray, else connects to
    `address`, else starts Ray in this process; settings and checkpoint are checked before. Raises ValueError
    (flags) or CheckpointError with a message meant for the user.
    """
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be from 1 to 65535, got {port}.")
    config = Settings(checkpoint, **settings)
    ckpt, threshold = _prepare(config)
    if not (address or submitted_job() or ray.is_initialized()):
        _check_port_free(host, port)  # Serve's proxy will listen here: say so before starting Ray
    started = start_or_join(address, num_cpus=(os.cpu_count() or 1) + 1, object_store_mb=512)
    try:
        app, info = _bind(config, ckpt, threshold)
        try:
            serve.start(http_options={"host": host, "port": port})
        except RuntimeError as e:
            if "Failed to bind" not in str(e):
                raise
            raise ValueError(_port_taken(host, port, str(e))) from None
        _check_serve_listens(host, port)
        serve.run(app, name=APP_NAME, route_prefix="/")
    except BaseException:
        if started:
            ray.shutdown()
        raise
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return Served(url=f"http://{shown}:{port}/", started_ray=started, info=info)


def _port_taken(host: str, port: int, reason: str) -> str:
    return f"--port {port}: cannot listen on {host}:{port} ({reason}); stop what uses it or choose another --port."


def _check_port_free(host: str, port: int) -> None:
    """ValueError naming --port when nothing can listen on host:port here (taken, or a host not of this machine)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: not an address of this machine ({e}).") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy's server does
        try:
            sock.bind(address)
        except OSError as e:
            raise ValueError(_port_taken(host, port, e.strerror or str(e))) from None


def _check_serve_listens(host: str, port: int) -> None:
    """ValueError naming --host/--port when Serve already ran on the cluster with other HTTP options (it keeps
    them: serve.start only logs that the new ones are not applied, and the URL printed would be wrong)."""
    from ray.serve.context import _get_global_client  # the client serve.start connected; no public getter

    http = _get_global_client().http_config
    if (http.host, http.port) != (host, port):
        raise ValueError(f"--host {host} --port {port}: Ray Serve already runs on this cluster at "
                         f"{http.host}:{http.port} and keeps that address; pass --host {http.host} --port "
                         f"{http.port}, or shut that Serve down (serve shutdown) first.")


def stop(served: Served) -> None:
    """Remove the application; when start() started Ray here, shut down Serve (and with it the application)
    and Ray instead. serve.shutdown waits a bounded time for the controller; serve.delete waits on it without
    a limit, which never ends when a signal sent to the whole process group (`timeout`, a service manager)
    has already stopped the Ray processes this one started."""
    if not served.started_ray:
        serve.delete(APP_NAME)
        return
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
