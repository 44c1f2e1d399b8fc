"""Bulk scoring on Ray Data: image files and tar shards in, one Parquet row per image out.

The job is one chain, in the order the data flows:

    inputs --list (driver)--> work units: a tar shard (its image members are rows) or a group of files
           --decode_sources (CPU tasks)--> pixels as the model takes them (img_size square, or the image at
                                           its scaled size for a tiled model), or the row's error
           --ScoreBatches (actor pool; each actor loads the checkpoint once)--> scores, heatmap PNGs
           --ParquetSink--> OUT/part-<run>-<rows digest>.parquet

Inputs can be local folders (searched recursively), globs, s3:// prefixes, tar archives (local or s3://,
the WebDataset convention) and .txt/.lst manifests with one path or URI per line. Folders, prefixes and
globs keep files with an image extension (ssm.data.IMAGE_EXTENSIONS) or a tar extension.

Every input image ends up in exactly one row: scored, or with `error` saying why not (corrupt, truncated,
empty, not an image, too many pixels, unreadable, a corrupt tar). Rerunning the same command resumes: the
keys (path, member) already in OUT are skipped, unreadable files there are set aside, and new files get
new names. Retried tasks rewrite the same file name (it is a digest of the rows' keys), so a write that
is repeated after a crash replaces itself instead of doubling its rows.

Example (the CLI: ssm score INPUT... --checkpoint CKPT --out OUT):

    summary = score(["s3://bucket/images/", "shards/*.tar"], "runs/ssm/best", "s3://bucket/scores/")
    print(summary.describe())

Each file's schema metadata holds b"ssm": {"threshold", "heatmap_vmin", "heatmap_vmax", "img_size", "tiled",
"scale", "heatmap_max_side", "precision", "checkpoint"}: the scale on which every heatmap PNG was written (0 = vmin,
255 = vmax) and the resolution it was scored at.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import posixpath
import tarfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image
from ray.data import Datasink
from ray.data.block import BlockAccessor

from jobs import storage
from ssm.calibration import heatmap_to_uint8
from ssm.checkpoint import CheckpointError, load_checkpoint
from ssm.data import IMAGE_EXTENSIONS, DataError, decode_for

log = logging.getLogger(__name__)

TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
MANIFEST_EXTENSIONS = (".txt", ".lst")
METADATA_KEY = b"ssm"
SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # the image file, or the tar archive holding it
        ("member", pa.string()),  # the member name inside the tar; null for plain files
        ("image_score", pa.float64()),  # null when the row has an error
        ("is_anomaly", pa.bool_()),
        ("heatmap_png", pa.binary()),  # 8-bit grayscale PNG at the scored resolution, calibrated fixed scale
        ("width", pa.int32()),  # original size of the image; null when it could not be read
        ("height", pa.int32()),
        ("checkpoint", pa.string()),
        ("error", pa.string()),  # null when scored
    ]
)

_FILES_PER_UNIT = 32  # image files per decode task; each tar shard gets a task of its own
# Memory reserved per decode task: the worker holds torch (ssm imports it) and a unit's decoded images,
# about 400 MB measured. Declaring it also keeps Ray from fusing decoding into the scoring actors, which
# it does when both ask for the same resources.
_DECODE_MEMORY = 512 << 20
_MAX_MEMBER_BYTES = 1 << 30  # a tar member larger than this is an error row, not read into memory
_GLOB_CHARS = "*?["
# Fault injection for the tests: "N:MARKER" makes a scoring actor exit hard after N batches, once (the
# marker file records that it happened, so the restarted actor carries on).
_EXIT_AFTER_ENV = "SSM_SCORE_EXIT_AFTER_BATCHES"


# ----------------------------------------------------------------------------------------------------------
# Listing the inputs (driver)


@dataclass(frozen=True)
class Source:
    uri: str  # absolute local path or scheme://bucket/key
    kind: str  # "image" or "tar"


def _kind(name: str) -> str | None:
    """"image", "tar" or None (not ours) by the file name; hidden files are not ours."""
    base = posixpath.basename(name.replace(os.sep, "/")).lower()
    if base.startswith("."):
        return None
    if base.endswith(TAR_EXTENSIONS):
        return "tar"
    if base.endswith(IMAGE_EXTENSIONS):
        return "image"
    return None


def _named(uri: str) -> Source:
    """An input named explicitly (argument or manifest line): scored whatever its extension."""
    return Source(uri, "tar" if uri.lower().endswith(TAR_EXTENSIONS) else "image")


def _walk_local(root: str) -> Iterator[Source]:
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for f in sorted(files):
            kind = _kind(f)
            if kind:
                yield Source(os.path.join(folder, f), kind)


def _read_manifest(fs, path: str, uri: str) -> Iterator[Source]:
    base = uri.rsplit("/", 1)[0] if storage.is_remote(uri) else os.path.dirname(path)
    with fs.open(path, "r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if storage.is_remote(line):
                yield _named(line)
            elif "://" in line:  # file://
                yield _named(os.path.abspath(line.split("://", 1)[1]))
            elif storage.is_remote(uri):  # relative to the manifest's prefix
                yield _named(f"{base}/{line.lstrip('/')}")
            else:  # relative to the manifest's folder, unless absolute
                yield _named(os.path.abspath(os.path.join(base, os.path.expanduser(line))))


def _expand(given: str) -> Iterator[Source]:
    remote = storage.is_remote(given)
    fs, path = storage.fsspec_for(given)
    scheme = given.split("://", 1)[0] + "://" if remote else ""

    def uri(p: str) -> str:
        return scheme + p if remote else os.path.abspath(p)

    if any(c in path for c in _GLOB_CHARS):
        if remote:  # one listing with the types, not one request per match
            matches = sorted((p, info["type"] == "directory") for p, info in fs.glob(path, detail=True).items())
        else:
            matches = [(p, os.path.isdir(p)) for p in sorted(glob.glob(path, recursive=True))]
        for m, is_dir in matches:
            if is_dir:
                yield from _expand(uri(m))
            elif _kind(m):
                yield Source(uri(m), _kind(m))
        return
    if not remote and os.path.isdir(path):
        yield from _walk_local(path)
        return
    if remote and fs.isdir(path):
        root = path.rstrip("/") + "/"
        for p in sorted(fs.find(path)):
            hidden = any(part.startswith(".") for part in p[len(root):].split("/")[:-1])
            if not hidden and _kind(p):
                yield Source(uri(p), _kind(p))
        return
    if fs.isfile(path):
        if path.lower().endswith(MANIFEST_EXTENSIONS):
            yield from _read_manifest(fs, path, uri(path))
        else:
            yield _named(uri(path))
        return
    raise DataError(f"{given}: input not found; check the path or URI.")


def list_sources(inputs: Sequence[str]) -> list[Source]:
    """The image files and tar shards named by `inputs`, each once, in a stable order."""
    found: dict[str, Source] = {}
    for given in inputs:
        try:
            for source in _expand(os.fspath(given)):
                found.setdefault(source.uri, source)
        except DataError:
            raise
        except Exception as e:  # permissions, a missing bucket, bad credentials...
            raise DataError(
                f"{given}: cannot list this input ({type(e).__name__}: {e}); check the path and access."
            ) from e
    if not found:
        raise DataError(
            f"no images found in {', '.join(map(str, inputs))} (extensions {', '.join(IMAGE_EXTENSIONS)}, "
            f"or tar archives); check the inputs."
        )
    return list(found.values())


# ----------------------------------------------------------------------------------------------------------
# Resuming: what OUT already holds


def read_done(out: str) -> tuple[set[tuple[str, str]], dict | None]:
    """Keys (path, member or "") of the rows already in `out`, and the b"ssm" metadata of its files.

    A .parquet file that cannot be read (a write torn by a crash) is renamed to <name>.unreadable, so
    nothing reads it and its images are scored again; temporary files of interrupted writes are removed.
    """
    fs, root = storage.fsspec_for(out)
    if not fs.exists(root):
        return set(), None
    if not fs.isdir(root):
        raise DataError(f"--out {out} is a file; give a folder or an s3:// prefix for the Parquet files.")
    done: set[tuple[str, str]] = set()
    meta = None
    for p in sorted(fs.find(root)):
        base = posixpath.basename(p)
        if base.startswith(".") and base.endswith(".tmp"):
            fs.rm(p)
            continue
        if not base.endswith(".parquet") or base.startswith(("_", ".")):
            continue
        try:
            with fs.open(p, "rb") as f:
                pf = pq.ParquetFile(f)
                file_meta = (pf.schema_arrow.metadata or {}).get(METADATA_KEY)
                keys = pf.read(columns=["path", "member"])
        except Exception as e:
            log.warning("setting aside unreadable output file %s (%s: %s); its images are scored again",
                        p, type(e).__name__, e)
            fs.mv(p, p + ".unreadable")
            continue
        if meta is None and file_meta:
            meta = json.loads(file_meta)
        members = keys["member"].to_pylist()
        done.update(zip(keys["path"].to_pylist(), (m or "" for m in members)))
    return done, meta


def _check_same_run(out: str, old: dict | None, new: dict) -> None:
    if old is None:
        return
    if old.get("checkpoint") != new["checkpoint"] or old.get("threshold") != new["threshold"]:
        raise DataError(
            f"{out} already holds scores from checkpoint {old.get('checkpoint')} with threshold "
            f"{old.get('threshold')}; resume with the same --checkpoint and --threshold, or choose a new --out."
        )
    if old.get("precision", "float32") != new["precision"]:
        raise DataError(
            f"{out} already holds scores computed in {old.get('precision', 'float32')}; resume "
            f"{'with' if old.get('precision') == 'bf16' else 'without'} --bf16, or choose a new --out."
        )


def _plan_units(sources: Sequence[Source], done: set[tuple[str, str]]) -> tuple[list[dict], int]:
    """Work units for the decode tasks, leaving out what `done` holds; also how many images were skipped.

    A unit is a tar shard, or a group of image files; each becomes one block and one decode task. A tar
    whose archive-level error row is done is skipped whole; otherwise its done members are passed along,
    so that only the missing ones are decoded. Lists travel as JSON strings.
    """
    by_tar: dict[str, list[str]] = {}
    tars = {s.uri for s in sources if s.kind == "tar"}
    for path, member in done:
        if member and path in tars:
            by_tar.setdefault(path, []).append(member)
    images, units, skipped = [], [], 0
    for s in sources:
        if (s.uri, "") in done:
            skipped += 1
        elif s.kind == "image":
            images.append(s.uri)
        else:
            members = sorted(by_tar.get(s.uri, []))
            skipped += len(members)
            units.append({"kind": "tar", "uris": json.dumps([s.uri]), "skip": json.dumps(members)})
    for i in range(0, len(images), _FILES_PER_UNIT):
        units.append({"kind": "images", "uris": json.dumps(images[i : i + _FILES_PER_UNIT]), "skip": "[]"})
    return units, skipped


# ----------------------------------------------------------------------------------------------------------
# Decoding (CPU tasks)


def _read_bytes(uri: str) -> bytes:
    if not storage.is_remote(uri):
        with open(uri, "rb") as f:
            return f.read()
    fs, path = storage.fsspec_for(uri)
    return fs.cat_file(path)


def _open_binary(uri: str):
    if not storage.is_remote(uri):
        return open(uri, "rb")
    fs, path = storage.fsspec_for(uri)
    return fs.open(path, "rb")


def _tar_members(uri: str, skip: set[str]) -> Iterator[tuple[str | None, bytes | None, str | None]]:
    """(member, bytes, None) for each image member of the tar not in `skip`; (member or None, None, error)
    for a member or an archive that cannot be read. Reading stops at the first archive-level problem."""
    count = 0
    try:
        with _open_binary(uri) as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
            while True:
                info = tar.next()
                if info is None:
                    break
                tar.members.clear()  # tarfile keeps every header it saw; we never look back
                if not info.isfile() or not _kind(info.name) == "image":
                    continue
                count += 1
                if info.name in skip:
                    continue
                if info.size > _MAX_MEMBER_BYTES:
                    yield info.name, None, f"{info.name} in {uri}: member of {info.size:,} bytes is too large to score."
                    continue
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    yield info.name, None, f"{info.name} in {uri}: the archive is truncated; re-create the tar."
                    return
                yield info.name, data, None
            # tarfile ends quietly at a header it cannot parse: tell that apart from the end of the archive.
            tar.fileobj.seek(tar.offset)
            rest = tar.fileobj.read(1024)
            if rest.strip(b"\0"):
                yield None, None, (
                    f"{uri}: corrupt tar archive (invalid header at byte {tar.offset} after {count} image "
                    f"members); the rest was not read: re-create the archive."
                )
    except Exception as e:  # tarfile.ReadError, EOFError, zlib/gzip errors, OSError from storage
        yield None, None, (
            f"{uri}: cannot read the tar archive ({type(e).__name__}: {e}) after {count} image members; "
            f"it is corrupt or truncated: re-create it."
        )


def _decode(data: bytes, model_config, name: str) -> tuple[np.ndarray | None, int, int, str | None]:
    try:
        pixels, (w, h) = decode_for(data, model_config, name=name)
        return pixels, w, h, None
    except DataError as e:
        return None, -1, -1, str(e)
    except Exception as e:  # never let one odd file fail the job
        return None, -1, -1, f"{name}: cannot be decoded ({type(e).__name__}: {e}); replace or remove it."


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of arrays that may differ in shape (Ray Data stores it as a variable-shaped tensor)."""
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column


def decode_sources(batch: dict[str, np.ndarray], model_config, rows: int) -> Iterator[dict]:
    """Read and decode the work units of one block; yield batches of `rows` rows (fewer at the end).

    Columns out: path, member ("" for plain files), pixels float32 (C, S, S) as the model takes them, or
    (C, H, W) at the image's scaled size for a tiled model (zeros on error rows), width, height (original
    size, -1 when unknown), error ("" when decoded). Empty strings rather than None: a column of nothing but
    None does not survive Ray's block conversions as strings.
    """
    out: dict[str, list] = {k: [] for k in ("path", "member", "pixels", "width", "height", "error")}
    side = 1 if model_config.tiled else model_config.img_size
    blank = np.zeros((model_config.channels, side, side), np.float32)

    def add(path, member, pixels, w, h, error):
        row = (path, member or "", blank if pixels is None else pixels, w, h, error or "")
        for k, v in zip(out, row):
            out[k].append(v)

    def flush() -> dict:
        b = {
            "path": np.array(out["path"], dtype=str),
            "member": np.array(out["member"], dtype=str),
            "pixels": _ragged(out["pixels"]) if model_config.tiled else np.stack(out["pixels"]),
            "width": np.array(out["width"], np.int32),
            "height": np.array(out["height"], np.int32),
            "error": np.array(out["error"], dtype=str),
        }
        for v in out.values():
            v.clear()
        return b

    for kind, uris, skip in zip(batch["kind"], batch["uris"], batch["skip"]):
        if kind == "tar":
            uri = json.loads(uris)[0]
            for member, data, error in _tar_members(uri, set(json.loads(skip))):
                if error is None:
                    add(uri, member, *_decode(data, model_config, f"{member} in {uri}"))
                else:
                    add(uri, member, None, -1, -1, error)
                if len(out["path"]) >= rows:
                    yield flush()
            continue
        for uri in json.loads(uris):
            try:
                data = _read_bytes(uri)
            except Exception as e:
                add(uri, None, None, -1, -1, f"{uri}: cannot be read ({type(e).__name__}: {e}); check that it exists.")
            else:
                add(uri, None, *_decode(data, model_config, uri))
            if len(out["path"]) >= rows:
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


class ScoreBatches:
    """The scoring actor: loads the checkpoint once, then turns decoded batches into output rows."""

    def __init__(self, checkpoint: str, checkpoint_id: str, threshold: float, threads: int, use_gpu: bool,
                 bf16: bool = False):
        torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        ckpt = load_checkpoint(_local_checkpoint(checkpoint), map_location=device)
        self.scorer = ckpt.scorer(device, amp=bf16)
        self.calibration = ckpt.calibration
        self.checkpoint_id = checkpoint_id
        self.threshold = threshold
        self.batches = 0
        self.exit_after = os.environ.get(_EXIT_AFTER_ENV)

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
                "checkpoint": pa.array([self.checkpoint_id] * n, pa.string()),
                "error": pa.array(errors, pa.string()),
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
        keys = hashlib.sha256()
        for path, member in zip(table["path"].to_pylist(), table["member"].to_pylist()):
            keys.update(f"{path}\0{member or ''}\n".encode())
        name = f"part-{self.run_id}-{keys.hexdigest()[:16]}.parquet"
        fs, root = storage.filesystem_for(self.out)
        if fs is None:
            tmp = os.path.join(root, f".{name}.tmp")
            pq.write_table(table, tmp, row_group_size=512)
            os.replace(tmp, os.path.join(root, name))
        else:
            pq.write_table(table, f"{root}/{name}", filesystem=fs, row_group_size=512)
        scored = table["error"].null_count
        return {
            "file": name,
            "rows": table.num_rows,
            "scored": scored,
            "errors": table.num_rows - scored,
            "anomalies": int(pc.sum(table["is_anomaly"]).as_py() or 0),
        }

    def on_write_complete(self, write_result) -> None:
        self.results = [r for r in write_result.write_returns if r and r["rows"]]


# ----------------------------------------------------------------------------------------------------------
# The job


@dataclass
class ScoreSummary:
    out: str
    inputs: int  # sources listed: image files and tar shards
    skipped: int  # images already in `out` from an earlier run
    scored: int = 0
    errors: int = 0
    anomalies: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return (self.scored + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        if self.scored + self.errors == 0:
            return f"nothing left to score: all {self.skipped} images are already in {self.out}"
        resumed = f" ({self.skipped} already in the output)" if self.skipped else ""
        return (
            f"scored {self.scored} images, {self.errors} errors, {self.anomalies} anomalies{resumed}; "
            f"{self.images_per_s:.1f} images/s over {self.seconds:.1f} s\n"
            f"output: {self.out} ({len(self.files)} new Parquet files)"
        )


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_mb: int = 512) -> bool:
    """Connect to `address`, or start Ray in this process; True when this call started or connected it.

    A local Ray gets one logical CPU more than the machine has cores: the scoring actors can hold every
    core while the light decode and write tasks still get scheduled.
    """
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):  # a given cluster, or the one a submitted job runs on
        ray.init(address=address)
    else:
        ray.init(
            num_cpus=num_cpus or (os.cpu_count() or 1) + 1,
            object_store_memory=object_store_mb << 20,  # streaming keeps little in flight: stay modest
            include_dashboard=False,
        )
    return True


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
) -> ScoreSummary:
    """Score every image under `inputs` with `checkpoint` and write the rows to `out` (folder or s3://).

    Uses the running Ray, else connects to `address`, else starts Ray in this process (and stops it at
    the end). bf16: score under bf16 autocast (faster where bf16 is native; scores move slightly, so the
    output records it and a resume must use the same precision). gpus_per_worker defaults to 1 when the cluster has GPUs, else 0; cpus_per_worker defaults to
    1 with GPUs, else the cluster's CPUs less one, shared among the workers (also their torch threads).
    Raises DataError (inputs, output) or CheckpointError with a message meant for the user.
    """
    if workers < 1 or batch_size < 1:
        raise ValueError(f"--workers and --batch-size must be at least 1 (got {workers} and {batch_size}).")
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be at least 1, got {rows_per_file}.")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise ValueError(f"--gpus-per-worker must be 0 or more, got {gpus_per_worker}.")
    ckpt = load_checkpoint(_local_checkpoint(checkpoint))
    if ckpt.calibration is None:
        raise CheckpointError(
            f"checkpoint {checkpoint} is not calibrated (no threshold, no heatmap scale); score with the best "
            f"checkpoint of a training run (RUN/best), which `ssm train` calibrates."
        )
    cal = ckpt.calibration
    threshold = float(cal.threshold if threshold is None else threshold)
    metadata = {
        "threshold": threshold,
        "heatmap_vmin": cal.heatmap_vmin,
        "heatmap_vmax": cal.heatmap_vmax,
        "img_size": ckpt.model_config.img_size,
        "tiled": ckpt.model_config.tiled,
        "scale": ckpt.model_config.scale,
        "heatmap_max_side": MAX_HEATMAP_SIDE,
        "precision": "bf16" if bf16 else "float32",
        "checkpoint": ckpt.id,
    }
    sources = list_sources(inputs)
    done, old_metadata = read_done(out)
    _check_same_run(out, old_metadata, metadata)
    units, skipped = _plan_units(sources, done)
    summary = ScoreSummary(out=out, inputs=len(sources), skipped=skipped)
    if not units:
        return summary

    started = init_ray(address)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = progress
        cluster = ray.cluster_resources()
        gpus = (1.0 if cluster.get("GPU", 0) > 0 else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
        if cpus_per_worker is None:
            cpus_per_worker = 1.0 if gpus > 0 else max(1.0, (cluster.get("CPU", 2) - 1) // workers)
        sink = ParquetSink(out, metadata, f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}", rows_per_file)
        t0 = time.perf_counter()
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        ds = ds.map_batches(
            decode_sources,
            batch_size=None,  # one work unit (a tar shard, or a few dozen files) per task
            fn_kwargs={"model_config": ckpt.model_config, "rows": batch_size},
            num_cpus=1,
            memory=_DECODE_MEMORY,
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
            },
            runtime_env=runtime_env,
        )
        ds.write_datasink(sink)
        summary.seconds = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    for r in sink.results:
        summary.scored += r["scored"]
        summary.errors += r["errors"]
        summary.anomalies += r["anomalies"]
        summary.files.append(r["file"])
    return summary
