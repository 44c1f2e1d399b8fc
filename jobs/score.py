"""Bulk scoring on Ray Data: image files and tar shards in, one Parquet row per image out.

The job is one chain, in the order the data flows:

    inputs --list, resume, plan (driver: jobs/score_plan.py)--> work units: a tar shard (its image members
                                           are rows) or a group of files, one row each of an Arrow table
           --decode_sources (CPU tasks)--> pixels as the model takes them (img_size square, or the image at
                                           its scaled size for a tiled model), or the row's error
           --ScoreBatches (actor pool; each actor loads the checkpoint once)--> scores, heatmap PNGs
           --ParquetSink--> OUT/part-<run>-<rows digest>.parquet      (jobs/score_output.py: what OUT
                                                                       holds, reruns, the one-job lock)

Inputs can be local folders (searched recursively), globs, s3:// prefixes, tar archives (local or s3://,
the WebDataset convention) and .txt/.lst manifests with one path or URI per line. Folders, prefixes and
globs keep files with an image extension (ssm.data.IMAGE_EXTENSIONS) or a tar extension.

Every input image ends up in exactly one row: scored, or with `error` saying why not (corrupt, truncated,
empty, not an image, too many pixels, unreadable, a corrupt tar) and `error_kind` (transient or permanent).
Rerunning the same command resumes: keys (path, member) already in OUT are skipped, missing ones are
scored, transient errors are retried and their old rows removed (the contract: jobs/score_output.py).
Retried tasks rewrite the same file name (it is a digest of the rows' keys), so a write that is repeated
after a crash replaces itself instead of doubling its rows. One job per OUT: a second is refused.

Listing rules (README, "Inputs of ssm score"): symlinked folders are followed, each folder once; tar links
are scored from their target member (a dangling or escaping link is an error row); tars inside tars are
read (keys "inner.tar/member"); a repeated member name is keyed "NAME#2", "NAME#3"...; names that are not
UTF-8 are written escaped (row_key); a manifest line naming nothing is an error row; an argument that
yields no image at all is refused before any work.

Example (the CLI: ssm score INPUT... --checkpoint CKPT --out OUT):

    summary = score(["s3://bucket/images/", "shards/*.tar"], "runs/ssm/best", "s3://bucket/scores/")
    print(summary.describe())

Each file's schema metadata holds b"ssm": {"threshold", "heatmap_vmin", "heatmap_vmax", "img_size", "tiled",
"scale", "heatmap_max_side", "precision", "backend", "checkpoint"}: the scale on which every heatmap PNG was
written (0 = vmin, 255 = vmax), the resolution it was scored at, and what ran the network's forward passes
("torch", or "onnxruntime" running a file from `ssm export`; the rest of the method is the same Scorer).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import posixpath
import stat
import tarfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from PIL import Image
from ray.data import Datasink
from ray.data.block import BlockAccessor

from jobs import storage
from jobs.cluster import start_or_join
from jobs.console import Progress, Tally
from jobs.score_output import (
    METADATA_KEY,
    SCHEMA,
    OutputLock,
    check_reachable,
    check_same_run,
    error_kind,
    new_run_id,
    part_name,
    read_output,
    summarize,
    supersede,
    write_part,
)
from jobs.score_plan import _GLOB_CHARS, _kind, list_sources, plan_units, row_key
from ssm import data as ssm_data
from ssm.calibration import heatmap_to_uint8
from ssm.checkpoint import CheckpointError, load_checkpoint
from ssm.data import IMAGE_EXTENSIONS, DataError, decode_for
from ssm.export import ExportError, load_exported

log = logging.getLogger(__name__)

# Memory reserved per decode task (see decode_memory): the worker process itself, which holds torch (ssm
# imports it), about 400 MB measured; the decoded rows it holds before yielding them (at most
# _DECODE_HELD_BYTES for a tiled model); and the peak of decoding one image at ssm.data.MAX_IMAGE_PIXELS,
# in bytes per pixel as measured by benchmarks/decode_memory.py: whole-image models decode large images
# reduced (RGB PNG 4.2, RGBA PNG 8.0, JPEG 0.4); a tiled model with scale > 0.25 cannot be (28 RGB, 32 RGBA).
# Declaring it also keeps Ray from fusing decoding into the scoring actors, which it does when both ask
# for the same resources.
_DECODE_WORKER_MEMORY = 400 << 20
_DECODE_HELD_BYTES = 256 << 20
_DECODE_PEAK_PER_PIXEL = {"reduced": 8, "full": 32}
_MAX_MEMBER_BYTES = 1 << 30  # a file or tar member larger than this is an error row, not read into memory
# Fault injection for the tests: "N:MARKER" makes a scoring actor exit hard after N batches, once (the
# marker file records that it happened, so the restarted actor carries on).
_EXIT_AFTER_ENV = "SSM_SCORE_EXIT_AFTER_BATCHES"
# What runs the network's forward passes: the checkpoint in torch, or an exported ONNX file in onnxruntime.
BACKENDS = ("torch", "onnxruntime")


# ----------------------------------------------------------------------------------------------------------
# Decoding (CPU tasks)


def _regular_file(uri: str) -> os.stat_result:
    """The local file's stat; raises DataError for a pipe (reading it would block the task), a socket or a
    device (/dev/zero would fill its memory)."""
    st = os.stat(uri)
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        raise DataError(f"{uri}: not a regular file (a pipe, socket or device); only files are scored.")
    return st


def too_large(name: str, size: int) -> str:
    """The error for a file too large to read into memory (a scoring row's, or an upload's to `ssm serve`)."""
    return f"{name}: file of {size:,} bytes is too large to score."


def _read_bytes(uri: str) -> bytes:
    if not storage.is_remote(uri):
        st = _regular_file(uri)
        if st.st_size > _MAX_MEMBER_BYTES:
            raise DataError(too_large(uri, st.st_size))
        with open(uri, "rb") as f:
            return f.read()
    fs, path = storage.fsspec_for(uri)
    return fs.cat_file(path)


def _open_binary(uri: str):
    if not storage.is_remote(uri):
        _regular_file(uri)
        return open(uri, "rb")
    fs, path = storage.fsspec_for(uri)
    return fs.open(path, "rb")


_MAX_TAR_DEPTH = 4  # tars inside tars are read this deep; deeper ones are an error row
_MAX_LINK_HOPS = 16  # a chain of links longer than this (or a cycle) is an error row


class _Keys:
    """Unique member keys within one archive: a name seen before gets "#2", "#3"... (the first free one)."""

    def __init__(self):
        self.used: set[str] = set()

    def __call__(self, prefix: str, name: str) -> str:
        name = prefix + row_key(name)
        key, n = name, 1
        while key in self.used:
            n += 1
            key = f"{name}#{n}"
        self.used.add(key)
        return key


def _link_target(info: tarfile.TarInfo) -> str | None:
    """The normalised name a link member points at; None when it points outside the archive."""
    if info.issym():
        if info.linkname.startswith("/"):
            return None
        target = posixpath.normpath(posixpath.join(posixpath.dirname(info.name), info.linkname))
    else:  # hard links name their target from the archive's root
        target = posixpath.normpath(info.linkname.lstrip("/"))
    return None if target == ".." or target.startswith("../") else target


def _tar_rows(tar: tarfile.TarFile, where: str, prefix: str, skip: set[str], keys: _Keys, depth: int
              ) -> Iterator[tuple[str | None, bytes | None, str | None]]:
    """(key, bytes, None) or (key, None, error) for each image of an open tar, in archive order, then its
    image-named links; (None, None, error) once for an archive-level problem, which ends the reading.

    Keys are `prefix` + the member name as row_key writes it (made unique by `keys`); a tar member is read
    as a nested tar with prefix "<its key>/". Regular members are remembered as (offset, size) so that
    links, which may point forward, can be resolved at the end.
    """
    files: dict[str, tuple[int, int]] = {}  # normalised name -> (data offset, size) of regular members
    links: dict[str, tarfile.TarInfo] = {}  # normalised name -> link member
    pending: list[tuple[str, tarfile.TarInfo]] = []  # (key, link member) of image-named links
    count, truncated = 0, False
    while True:
        info = tar.next()
        if info is None:
            break
        tar.members.clear()  # tarfile keeps every header it saw; we never look back
        name, kind = posixpath.normpath(info.name), _kind(info.name)
        if info.isfile():
            files[name] = (info.offset_data, info.size)
        elif info.issym() or info.islnk():
            links[name] = info
        if kind is None or info.isdir():
            continue
        key = keys(prefix, info.name)
        count += 1
        if not (info.isfile() or info.issym() or info.islnk()):  # a pipe or device entry: no data to score
            if kind == "image" and key not in skip:
                yield key, None, (f"{info.name} in {where}: not a regular file (a pipe or device); "
                                  f"store the file itself.")
            continue
        if info.issym() or info.islnk():
            if kind == "image":
                pending.append((key, info))
            continue  # a link to a tar: its images are read where the tar itself is
        if key in skip:
            continue
        if info.size > _MAX_MEMBER_BYTES and kind == "image":
            yield key, None, f"{info.name} in {where}: member of {info.size:,} bytes is too large to score."
            continue
        if kind == "tar":
            yield from _nested_tar(tar, info, key, where, skip, keys, depth)
            continue
        data = tar.extractfile(info).read()
        if len(data) != info.size:
            yield key, None, f"{info.name} in {where}: the archive is truncated; re-create the tar."
            truncated = True
            break
        yield key, data, None
    # tarfile ends quietly at a header it cannot parse: tell that apart from the end of the archive.
    tar.fileobj.seek(tar.offset)
    if not truncated and tar.fileobj.read(1024).strip(b"\0"):
        yield None, None, (
            f"{where}: corrupt tar archive (invalid header at byte {tar.offset} after {count} image "
            f"and tar members); the rest was not read: re-create the archive."
        )
    for key, info in pending:
        if key not in skip:
            yield key, *_link_data(tar, info, files, links, where)


def _link_data(tar: tarfile.TarFile, info: tarfile.TarInfo, files: dict, links: dict, where: str
               ) -> tuple[bytes | None, str | None]:
    """The bytes of the regular member a link (or a chain of links) points at, or the error."""
    seen = info
    for _ in range(_MAX_LINK_HOPS):
        target = _link_target(seen)
        if target is None:
            return None, (f"{info.name} in {where}: a link to {info.linkname}, outside the archive; "
                          f"store the file itself.")
        if target in files:
            offset, size = files[target]
            if size > _MAX_MEMBER_BYTES:
                return None, f"{info.name} in {where}: links to a member of {size:,} bytes, too large to score."
            tar.fileobj.seek(offset)
            data = tar.fileobj.read(size)
            if len(data) != size:
                return None, f"{info.name} in {where}: the archive is truncated; re-create the tar."
            return data, None
        if target not in links:
            return None, (f"{info.name} in {where}: a link to {info.linkname}, which is not a file in the "
                          f"archive; store the file itself.")
        seen = links[target]
    return None, f"{info.name} in {where}: a chain of links that does not end (a cycle?); store the file itself."


def _nested_tar(tar: tarfile.TarFile, info: tarfile.TarInfo, key: str, where: str, skip: set[str],
                keys: _Keys, depth: int) -> Iterator[tuple[str | None, bytes | None, str | None]]:
    """The rows of a tar stored inside `tar`, read in place; a problem with it is one row keyed by it."""
    if key in skip:  # its own error row is done: an earlier run could not read it
        return
    inner_where = f"{info.name} in {where}"
    if depth + 1 >= _MAX_TAR_DEPTH:
        yield key, None, f"{inner_where}: tar archives nested more than {_MAX_TAR_DEPTH} deep are not read."
        return
    count, failed = 0, False
    try:
        with tarfile.open(fileobj=tar.extractfile(info), mode="r:*") as inner:
            for row in _tar_rows(inner, inner_where, key + "/", skip, keys, depth + 1):
                if row[0] is None:  # the nested archive's own problem: a row keyed by it
                    row, failed = (key, None, row[2]), True
                count += 1
                yield row
    except Exception as e:  # tarfile.ReadError, EOFError, zlib/gzip errors
        if failed:  # its one error row is written already
            return
        yield key, None, (
            f"{inner_where}: cannot read this tar inside the archive ({type(e).__name__}: "
            f"{' '.join(str(e).split())}) after "
            f"{count} members; re-create it."
        )


def _tar_members(uri: str, skip: set[str]) -> Iterator[tuple[str | None, bytes | None, str | None]]:
    """(key, bytes, None) for each image of the tar (nested tars and links included, see `_tar_rows`)
    whose key is not in `skip`; (key or None, None, error) for a member or an archive that cannot be read.
    Reading stops at the first archive-level problem."""
    count, failed = 0, False
    try:
        with _open_binary(uri) as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
            for row in _tar_rows(tar, uri, "", skip, _Keys(), 0):
                count += row[0] is not None
                failed = failed or row[0] is None
                yield row
    except Exception as e:  # tarfile.ReadError, EOFError, zlib/gzip errors, OSError from storage
        if failed:  # the archive's one error row is written already
            return
        yield None, None, str(e) if isinstance(e, DataError) else (
            f"{uri}: cannot read the tar archive ({type(e).__name__}: {e}) after {count} image members; "
            f"it is corrupt or truncated: re-create it."
        )


def decode_bytes(data: bytes, model_config, name: str) -> tuple[np.ndarray | None, int, int, int, str | None]:
    """(pixels, width, height, frames, None), or (None, -1, -1, -1, error): the one way an image's bytes
    become model input or an error message (scoring rows, and uploads to `ssm serve`), `name` naming it."""
    try:
        pixels, (w, h), frames = decode_for(data, model_config, name=name, frames=True)
        return pixels, w, h, frames, None
    except DataError as e:
        return None, -1, -1, -1, str(e)
    except Exception as e:  # never let one odd file fail the job
        return None, -1, -1, -1, f"{name}: cannot be decoded ({type(e).__name__}: {e}); replace or remove it."


def _unreadable(uri: str, e: Exception) -> str:
    """The error row's message for a file that cannot be read (named in a manifest, or gone since listing)."""
    if isinstance(e, DataError):  # not a file we score: said by _read_bytes
        return str(e)
    if isinstance(e, IsADirectoryError) or (not storage.is_remote(uri) and os.path.isdir(uri)):
        return f"{uri}: a folder with no images in it (extensions {', '.join(IMAGE_EXTENSIONS)}, or tar archives)."
    if not storage.is_remote(uri) and os.path.islink(uri) and not os.path.exists(uri):
        return f"{uri}: a symlink to {os.readlink(uri)}, which does not exist; fix or remove the link."
    if isinstance(e, FileNotFoundError) and any(c in uri for c in _GLOB_CHARS):
        return f"{uri}: matches no image file; check the pattern."
    if isinstance(e, FileNotFoundError):
        return f"{uri}: file not found; check the path."
    return f"{uri}: cannot be read ({type(e).__name__}: {e}); check that it exists."


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of arrays that may differ in shape (Ray Data stores it as a variable-shaped tensor)."""
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column


def decode_memory(model_config, rows: int) -> int:
    """Bytes one decode task can take: worker, rows held, and decoding one image of MAX_IMAGE_PIXELS pixels."""
    full = _DECODE_PEAK_PER_PIXEL["full"]
    if not model_config.tiled or int(1 / (model_config.scale * ssm_data.REDUCING_GAP)) >= 2:
        peak = max(_DECODE_PEAK_PER_PIXEL["reduced"] * ssm_data.MAX_IMAGE_PIXELS, full * ssm_data.REDUCE_FROM_PIXELS)
    else:
        peak = full * ssm_data.MAX_IMAGE_PIXELS
    if model_config.tiled:
        held = _DECODE_HELD_BYTES
    else:
        held = rows * model_config.channels * model_config.img_size**2 * 4
    return _DECODE_WORKER_MEMORY + held + peak


def _decode_reservation(model_config, rows: int) -> int:
    """decode_memory, but never more than half the memory of the cluster's largest node (a task that asks
    for more than any node has would wait forever)."""
    need = decode_memory(model_config, rows)
    node = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if node and need > node // 2:
        log.warning("decoding may take %.1f GB per task (images up to ssm.data.MAX_IMAGE_PIXELS); reserving "
                    "%.1f GB, half the largest node's memory", need / 1e9, node / 2e9)
        return int(node // 2)
    return need


def decode_sources(batch: pa.Table, model_config, rows: int) -> Iterator[dict]:
    """Read and decode the work units of one block (rows of jobs/score_plan.Plan.units); yield batches of
    `rows` rows (fewer at the end).

    Columns out: path, member ("" for plain files), pixels float32 (C, S, S) as the model takes them, or
    (C, H, W) at the image's scaled size for a tiled model (zeros on error rows), width, height (original
    size as a viewer shows it, -1 when unknown), frames (in the file; frame 0 is scored; -1 when unknown),
    error ("" when decoded). Empty strings rather than None: a column of nothing but None does not survive
    Ray's block conversions as strings. Paths and messages are written as row_key escapes them.
    """
    out: dict[str, list] = {k: [] for k in ("path", "member", "pixels", "width", "height", "frames", "error")}
    side = 1 if model_config.tiled else model_config.img_size
    blank = np.zeros((model_config.channels, side, side), np.float32)
    held = [0]  # bytes of pixels in `out`: a tiled model's images are yielded once they pass _DECODE_HELD_BYTES

    def add(path, member, pixels, w, h, frames, error):
        row = (row_key(path), member or "", blank if pixels is None else pixels, w, h, frames, row_key(error or ""))
        for k, v in zip(out, row):
            out[k].append(v)
        held[0] += row[2].nbytes

    def full() -> bool:
        return len(out["path"]) >= rows or held[0] >= _DECODE_HELD_BYTES

    def flush() -> dict:
        b = {
            "path": np.array(out["path"], dtype=str),
            "member": np.array(out["member"], dtype=str),
            "pixels": _ragged(out["pixels"]) if model_config.tiled else np.stack(out["pixels"]),
            "width": np.array(out["width"], np.int32),
            "height": np.array(out["height"], np.int32),
            "frames": np.array(out["frames"], np.int32),
            "error": np.array(out["error"], dtype=str),
        }
        for v in out.values():
            v.clear()
        held[0] = 0
        return b

    for kind, uris, skip in zip(*(batch[c].to_pylist() for c in ("kind", "uris", "skip"))):
        uris = [u.decode("utf-8", "surrogateescape") for u in uris]  # a name that is not UTF-8 opens as listed
        if kind == "tar":
            uri = uris[0]
            for member, data, error in _tar_members(uri, set(skip)):
                if error is None:
                    add(uri, member, *decode_bytes(data, model_config, f"{member} in {uri}"))
                else:
                    add(uri, member, None, -1, -1, -1, error)
                if full():
                    yield flush()
            continue
        for uri in uris:
            try:
                data = _read_bytes(uri)
            except Exception as e:
                add(uri, None, None, -1, -1, -1, _unreadable(uri, e))
            else:
                add(uri, None, *decode_bytes(data, model_config, uri))
            if full():
                yield flush()
    if out["path"]:
        yield flush()


# ----------------------------------------------------------------------------------------------------------
# Scoring (actor pool)

# Heatmap PNGs are written at the scored resolution (img_size for whole images; the scaled image size for a
# tiled model), reduced by area averaging where the longer side exceeds this, to bound the row size.
MAX_HEATMAP_SIDE = 1024


def heatmap_png_pixels(heatmap: torch.Tensor, calibration) -> np.ndarray:
    """(H, W) heatmap -> uint8 pixels for its PNG: the calibrated fixed scale, longer side capped."""
    h, w = heatmap.shape[-2:]
    if max(h, w) > MAX_HEATMAP_SIDE:
        f = MAX_HEATMAP_SIDE / max(h, w)
        size = (max(1, round(h * f)), max(1, round(w * f)))
        heatmap = torch.nn.functional.interpolate(heatmap[None, None].float(), size=size, mode="area")[0, 0]
    return heatmap_to_uint8(heatmap, calibration).cpu().numpy()


def _local_checkpoint(uri: str) -> str:
    """The checkpoint (or training run) at `uri` as a local directory; s3:// is downloaded once per machine."""
    try:
        return os.path.abspath(storage.localize(uri))
    except OSError as e:  # nothing there (FileNotFoundError), storage down or refusing (ConnectionError)
        raise CheckpointError(str(e)) from e


def load_for_scoring(checkpoint: str, backend: str = "torch", map_location: str = "cpu"):
    """What scores: the checkpoint (torch), or the exported ONNX file (onnxruntime), as a Checkpoint or
    ssm.export.ExportedModel; both have model_config, calibration, id. CheckpointError naming the file."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    if backend == "torch":
        if not storage.is_remote(checkpoint) and os.path.isfile(checkpoint):
            raise CheckpointError(f"--checkpoint {checkpoint} is a file; --backend torch takes a checkpoint or "
                                  f"training run directory (an ONNX file from `ssm export` needs --backend onnxruntime).")
        return load_checkpoint(_local_checkpoint(checkpoint), map_location=map_location)
    if storage.is_remote(checkpoint):
        raise CheckpointError(f"--checkpoint {checkpoint}: --backend onnxruntime reads a local .onnx file; copy it "
                              f"to every node first.")
    if os.path.isdir(checkpoint):
        raise CheckpointError(f"--checkpoint {checkpoint} is a folder; --backend onnxruntime takes the .onnx file "
                              f"`ssm export {checkpoint} --format onnx --out FILE.onnx` writes.")
    try:
        model = load_exported(checkpoint)
    except ExportError as e:
        raise CheckpointError(f"--checkpoint: {e}") from None
    if model.format != "onnx":
        raise CheckpointError(f"--checkpoint {checkpoint} is a {model.format} file; --backend onnxruntime takes an "
                              f"ONNX file (ssm export CKPT --format onnx --out FILE.onnx).")
    return model


class ScoreBatches:
    """The scoring actor: loads the checkpoint (or exported ONNX file) once, then turns decoded batches into
    output rows."""

    def __init__(self, checkpoint: str, checkpoint_id: str, threshold: float, threads: int, use_gpu: bool,
                 bf16: bool = False, backend: str = "torch", tally=None):
        threads = max(1, min(threads, os.cpu_count() or 1))
        torch.set_num_threads(threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        ckpt = load_for_scoring(checkpoint, backend, map_location=device)
        self.scorer = ckpt.scorer(device, amp=bf16) if backend == "torch" else ckpt.scorer(threads)
        self.calibration = ckpt.calibration
        self.checkpoint_id = checkpoint_id
        self.threshold = threshold
        self.batches = 0
        self.exit_after = os.environ.get(_EXIT_AFTER_ENV)
        self.tally = tally  # jobs.console.Tally: the driver's progress bar reads it
        self.metrics = ScoringMetrics() if ray.is_initialized() else None

    def _score(self, images: list[torch.Tensor]) -> tuple[np.ndarray, list[np.ndarray | None], list[str | None]]:
        """Scores (n,) float64 and uint8 heatmaps; a batch that fails is retried image by image, so only the
        images that fail on their own become error rows."""
        try:
            out = self.scorer.score_images(images)
            maps = [heatmap_png_pixels(m, self.calibration) for m in out.heatmaps]
            return out.image_scores.double().cpu().numpy(), maps, [None] * len(images)
        except Exception:
            if len(images) == 1:
                raise
        scores = np.full(len(images), np.nan)
        maps: list[np.ndarray | None] = [None] * len(images)
        errors: list[str | None] = [None] * len(images)
        for i in range(len(images)):
            try:
                s, m, _ = self._score(images[i : i + 1])
                scores[i], maps[i] = s[0], m[0]
            except Exception as e:
                errors[i] = f"scoring failed ({type(e).__name__}: {e})"
        return scores, maps, errors

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        self._maybe_exit()
        t0 = time.perf_counter()
        table = self._rows(batch)
        scored = table["error"].null_count  # rows without an error
        errors = table.num_rows - scored
        if self.metrics is not None:
            self.metrics.record(scored, errors, time.perf_counter() - t0)
        if self.tally is not None:
            self.tally.add.remote(scored, errors)  # fire and forget: the bar may lag, the job never waits
        return table

    def _rows(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["path"])
        errors = [str(e) or None for e in batch["error"]]
        ok = np.array([e is None for e in errors], bool)
        scores = np.full(n, np.nan)
        pngs: list[bytes | None] = [None] * n
        if ok.any():
            images = [torch.from_numpy(np.ascontiguousarray(batch["pixels"][i])) for i in np.flatnonzero(ok)]
            s, maps, failed = self._score(images)
            for j, i in enumerate(np.flatnonzero(ok)):
                if failed[j] is None and not np.isfinite(s[j]):
                    failed[j] = f"scoring gave a non-finite score ({s[j]})"
                if failed[j] is not None:
                    errors[i] = f"{_row_name(batch, i)}: {failed[j]}"
                    continue
                scores[i] = s[j]
                buf = io.BytesIO()
                Image.fromarray(maps[j]).save(buf, format="PNG", compress_level=3)
                pngs[i] = buf.getvalue()
        scored = np.array([e is None for e in errors], bool)
        width, height = batch["width"].astype(np.int32), batch["height"].astype(np.int32)
        return pa.table(
            {
                "path": pa.array([str(p) for p in batch["path"]], pa.string()),
                "member": pa.array([str(m) or None for m in batch["member"]], pa.string()),
                "image_score": pa.array(scores, pa.float64(), mask=~scored),
                "is_anomaly": pa.array(scores >= self.threshold, pa.bool_(), mask=~scored),
                "heatmap_png": pa.array(pngs, pa.binary()),
                "width": pa.array(width, pa.int32(), mask=width < 0),
                "height": pa.array(height, pa.int32(), mask=height < 0),
                "frames": pa.array(batch["frames"].astype(np.int32), pa.int32(), mask=batch["frames"] < 0),
                "checkpoint": pa.array([self.checkpoint_id] * n, pa.string()),
                "error": pa.array(errors, pa.string()),
                "error_kind": pa.array([error_kind(e) for e in errors], pa.string()),
            },
            schema=SCHEMA,
        )

    def _maybe_exit(self) -> None:
        self.batches += 1
        if not self.exit_after:
            return
        after, marker = self.exit_after.split(":", 1)
        if self.batches > int(after) and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # a hard crash: no cleanup, no exception for Ray to report


class ScoringMetrics:
    """The scoring actors' Ray metrics, exported by every node's metrics agent (Prometheus, Ray's dashboard) as
    ray_ssm_images_scored_total, ray_ssm_score_error_rows_total and ray_ssm_score_batch_seconds."""

    def __init__(self):
        from ray.util.metrics import Counter, Histogram

        self.images = Counter("ssm_images_scored", description="Images scored (rows without an error).")
        self.errors = Counter("ssm_score_error_rows", description="Rows written with an error instead of a score.")
        self.latency = Histogram("ssm_score_batch_seconds", description="Seconds to score one batch of images.",
                                 boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60])

    def record(self, scored: int, errors: int, seconds: float) -> None:
        if scored:
            self.images.inc(scored)
        if errors:
            self.errors.inc(errors)
        self.latency.observe(seconds)


def _row_name(batch: dict, i: int) -> str:
    member = str(batch["member"][i])
    return f"{member} in {batch['path'][i]}" if member else str(batch["path"][i])


# ----------------------------------------------------------------------------------------------------------
# Writing (Datasink)


class ParquetSink(Datasink):
    """Writes each write task's rows as one Parquet file carrying the b"ssm" metadata.

    The file name is a digest of the rows' keys: a retried write task replaces its own file. Local files
    appear atomically (temporary name, then rename); S3 objects appear whole when the upload completes.
    """

    def __init__(self, out: str, metadata: dict, run_id: str, rows_per_file: int):
        self.out, self.run_id, self.rows_per_file = out, run_id, rows_per_file
        self.metadata = {METADATA_KEY: json.dumps(metadata).encode()}
        self.results: list[dict] = []  # one per file written, set on the driver when the write completes

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def on_write_start(self, schema=None) -> None:
        if not storage.is_remote(self.out):
            os.makedirs(storage.filesystem_for(self.out)[1], exist_ok=True)

    def write(self, blocks, ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t.select(SCHEMA.names).cast(SCHEMA) for t in tables if t.num_rows]
        if not tables:
            return {"file": None, "rows": 0, "scored": 0, "errors": 0, "anomalies": 0}
        table = pa.concat_tables(tables).replace_schema_metadata(self.metadata)
        name = part_name(self.run_id, table["path"].to_pylist(), table["member"].to_pylist())
        write_part(self.out, name, table)
        return {"file": name, **summarize(table)}

    def on_write_complete(self, write_result) -> None:
        self.results = [r for r in write_result.write_returns if r and r["rows"]]


# ----------------------------------------------------------------------------------------------------------
# The job


@dataclass
class ScoreSummary:
    out: str
    inputs: int  # sources listed: image files and tar shards
    skipped: int  # images already in `out` from an earlier run
    retried: int = 0  # of those not skipped: rows with an error that may be transient, scored again
    superseded: int = 0  # files rewritten or removed to leave one row per image
    scored: int = 0
    errors: int = 0
    anomalies: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    s3_retries: int = 0  # S3 requests retried by botocore (s3fs) in the job's processes (storage.RetryCount)

    @property
    def images_per_s(self) -> float:
        return (self.scored + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        """`ssm score --json`: the keys README.md documents."""
        return {"out": self.out, "inputs": self.inputs, "scored": self.scored, "errors": self.errors,
                "anomalies": self.anomalies, "skipped": self.skipped, "retried": self.retried,
                "superseded": self.superseded, "seconds": round(self.seconds, 3),
                "images_per_s": round(self.images_per_s, 3), "files": list(self.files),
                "s3_retries": self.s3_retries}

    def describe(self) -> str:
        retried = f"\nS3 request retries: {self.s3_retries}" if self.s3_retries else ""
        if self.scored + self.errors == 0:
            return f"nothing left to score: all {self.skipped} images are already in {self.out}{retried}"
        resumed = f" ({self.skipped} already in the output)" if self.skipped else ""
        if self.retried:
            resumed += f" ({self.retried} earlier errors retried)"
        return (
            f"scored {self.scored} images, {self.errors} errors, {self.anomalies} anomalies{resumed}; "
            f"{self.images_per_s:.1f} images/s over {self.seconds:.1f} s\n"
            f"output: {self.out} ({len(self.files)} new Parquet files){retried}"
        )


def load_calibrated(checkpoint: str, backend: str = "torch"):
    """load_for_scoring(checkpoint, backend), which must carry a calibration (threshold and heatmap scale);
    CheckpointError otherwise."""
    ckpt = load_for_scoring(checkpoint, backend)
    if ckpt.calibration is None and backend == "onnxruntime":
        raise CheckpointError(
            f"--checkpoint {checkpoint} was exported from a checkpoint that is not calibrated (no threshold, no "
            f"heatmap scale); export the best checkpoint of a training run (RUN/best), which `ssm train` calibrates."
        )
    if ckpt.calibration is None:
        raise CheckpointError(
            f"checkpoint {checkpoint} is not calibrated (no threshold, no heatmap scale); score with the best "
            f"checkpoint of a training run (RUN/best), which `ssm train` calibrates."
        )
    return ckpt


def score(
    inputs: Sequence[str],
    checkpoint: str,
    out: str,
    *,
    workers: int = 1,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
    batch_size: int = 32,
    threshold: float | None = None,
    address: str | None = None,
    rows_per_file: int = 4096,
    progress: bool = True,
    runtime_env: dict | None = None,
    bf16: bool = False,
    retry_errors: bool = False,
    backend: str = "torch",
    manifest_stat: bool = True,
) -> ScoreSummary:
    """Score every image under `inputs` with `checkpoint` and write the rows to `out` (folder or s3://).

    Uses the running Ray, else connects to `address`, else starts Ray in this process (and stops it at
    the end). bf16: score under bf16 autocast (faster where bf16 is native; scores move slightly, so the
    output records it and a resume must use the same precision). gpus_per_worker defaults to 1 when the cluster has GPUs, else 0; cpus_per_worker defaults to
    1 with GPUs, else the cluster's CPUs less one, shared among the workers (also their torch threads).
    retry_errors: also retry rows with a permanent error (transient ones are always retried).
    backend "onnxruntime": `checkpoint` is a local .onnx file from `ssm export`, whose network onnxruntime runs
    on the CPU inside the same Scorer; the output records the backend and a resume must use the same one.
    manifest_stat=False: manifest lines are not looked at on disk while planning (jobs/score_plan.py).
    Raises DataError (inputs, output) or CheckpointError with a message meant for the user.
    """
    if workers < 1 or batch_size < 1:
        raise ValueError(f"--workers and --batch-size must be at least 1 (got {workers} and {batch_size}).")
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be at least 1, got {rows_per_file}.")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise ValueError(f"--gpus-per-worker must be 0 or more, got {gpus_per_worker}.")
    if backend == "onnxruntime" and (bf16 or gpus_per_worker):
        raise ValueError("--backend onnxruntime runs the exported network in float32 on the CPU: drop --bf16 and "
                         "--gpus-per-worker.")
    retries = storage.RetryCount()
    ckpt = load_calibrated(checkpoint, backend)
    cal = ckpt.calibration
    threshold = float(cal.threshold if threshold is None else threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"--threshold must be a finite number, got {threshold}.")
    metadata = {
        "threshold": threshold,
        "heatmap_vmin": cal.heatmap_vmin,
        "heatmap_vmax": cal.heatmap_vmax,
        "img_size": ckpt.model_config.img_size,
        "tiled": ckpt.model_config.tiled,
        "scale": ckpt.model_config.scale,
        "heatmap_max_side": MAX_HEATMAP_SIDE,
        "precision": "bf16" if bf16 else "float32",
        "backend": backend,
        "checkpoint": ckpt.id,
    }
    check_reachable(out)
    sources = list_sources(inputs, manifest_stat=manifest_stat)
    with OutputLock(out) as lock:
        state = read_output(out)
        check_same_run(out, state, metadata)
        plan = plan_units(sources, state, retry_errors)
        summary = ScoreSummary(out=out, inputs=len(sources), skipped=plan.skipped, retried=plan.retried.num_rows)
        del sources, state  # the plan holds what is left: the keys in it, once
        run = new_run_id()
        units = plan.units
        if units.num_rows:
            sink = ParquetSink(out, metadata, run, rows_per_file)
            _score_units(units, sink, summary, ckpt, checkpoint, threshold, workers=workers,
                         gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, batch_size=batch_size,
                         address=address, progress=progress, runtime_env=runtime_env, bf16=bf16,
                         backend=backend, retries=retries)
        lock.check()
        if units.num_rows or plan.duplicates:  # new rows, or duplicates left by a crash
            summary.superseded = supersede(out, run, plan.retried)
    summary.s3_retries = retries.total
    return summary


def _score_units(units: pa.Table, sink: ParquetSink, summary: ScoreSummary, ckpt, checkpoint: str,
                 threshold: float, *, workers: int, gpus_per_worker: float | None, cpus_per_worker: float | None,
                 batch_size: int, address: str | None, progress: bool, runtime_env: dict | None,
                 bf16: bool, backend: str = "torch", retries: storage.RetryCount | None = None) -> None:
    """The Ray Data chain over `units`, written through `sink`; counts go into `summary`, S3 retries of the
    Ray workers into `retries`."""
    # A local Ray gets one logical CPU more than the machine has cores: the scoring actors can hold every core
    # while the light decode and write tasks still get scheduled. Streaming keeps little in flight: a modest store.
    started = start_or_join(address, num_cpus=(os.cpu_count() or 1) + 1, object_store_mb=512)
    tally = ray.remote(num_cpus=0)(Tally).remote() if progress else None
    images = pc.equal(units.column("kind"), "images")
    listed = pc.sum(pc.list_value_length(units.column("uris").filter(images))).as_py() or 0
    bar = Progress("score", total=listed if pc.all(images).as_py() is not False else None, unit="images",
                   enabled=progress)  # the members of tar shards are counted only as they are read
    stop = threading.Event()

    def follow() -> None:  # the bar follows the actors' tally while the chain runs in the main thread
        shown = 0
        while tally is not None and not stop.wait(0.5):
            try:
                scored, errors = ray.get(tally.read.remote(), timeout=5)
            except Exception:  # a slow answer only delays the bar
                continue
            bar.update(scored + errors - shown, errors=errors)
            shown = scored + errors

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    try:
        storage.configure_ray_data()
        if retries is not None:
            retries.attach()
        cluster = ray.cluster_resources()
        gpus = (1.0 if cluster.get("GPU", 0) > 0 else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
        if backend != "torch":
            gpus = 0.0
        if cpus_per_worker is None:
            cpus_per_worker = 1.0 if gpus > 0 else max(1.0, (cluster.get("CPU", 2) - 1) // workers)
        t0 = time.perf_counter()
        ds = ray.data.from_arrow(units, override_num_blocks=units.num_rows)
        ds = ds.map_batches(
            decode_sources,
            batch_size=None,  # one work unit (a tar shard, or a few dozen files) per task
            batch_format="pyarrow",
            fn_kwargs={"model_config": ckpt.model_config, "rows": batch_size},
            num_cpus=1,
            memory=_decode_reservation(ckpt.model_config, batch_size),
            runtime_env=runtime_env,
        )
        ds = ds.map_batches(
            ScoreBatches,
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=workers),  # restarts dead actors, retries their batches
            num_cpus=cpus_per_worker,
            num_gpus=gpus,
            fn_constructor_kwargs={
                "checkpoint": checkpoint if storage.is_remote(checkpoint) else os.path.abspath(checkpoint),
                "checkpoint_id": ckpt.id,
                "threshold": threshold,
                "threads": int(cpus_per_worker),
                "use_gpu": gpus > 0,
                "bf16": bf16,
                "backend": backend,
                "tally": tally,
            },
            runtime_env=runtime_env,
        )
        ds.write_datasink(sink)
        summary.seconds = time.perf_counter() - t0
    finally:
        if retries is not None:
            retries.detach()
        stop.set()
        follower.join()
        if sink.results:  # the bar ends on the rows written (the tally may lag, or count a batch redone)
            bar.set(sum(r["rows"] for r in sink.results), errors=sum(r["errors"] for r in sink.results))
        bar.close()
        if started:
            ray.shutdown()
    for r in sink.results:
        summary.scored += r["scored"]
        summary.errors += r["errors"]
        summary.anomalies += r["anomalies"]
        summary.files.append(r["file"])
