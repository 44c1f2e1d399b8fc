"""The scoring job's output folder: which files are the job's, what a rerun does, one job at a time.

The contract (README, "Parquet output of ssm score"):

* A key is (path, member): the image file, or the tar archive and the member inside it (member null for
  plain files; a tar's archive-level error row has a null member too).
* The job's files are the files directly in OUT named part-<run>-<digest>.parquet whose Parquet schema
  metadata holds b"ssm". Nothing else under OUT is read as output, renamed or removed: other files and
  sub-folders are left byte-identical. The job also writes, and removes, .ssm-score.lock (one job per OUT)
  and .part-*.parquet.tmp (a local write in progress); a part file that cannot be parsed (torn by an
  outside copy) is renamed .<name>.unreadable and its images are scored again.
* A rerun scores the keys that are missing and retries the keys whose row holds a transient error
  (error_kind "transient": a file missing or unreadable, a storage error, a tar archive that could not be
  read to its end, a scoring failure). When it has written the new rows, every older row of a key it
  retried, or of a key that appears more than once, is removed by rewriting that file: the new file is
  written first, then the old one removed, so a crash leaves at worst a duplicate that the next run
  removes, never a missing row. Afterwards a plain Parquet read of OUT sees exactly one row per key.
  Permanent errors (not an image, corrupt, truncated, too large) stay; --retry-errors retries them too.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import storage
from ssm.data import DataError

log = logging.getLogger(__name__)

METADATA_KEY = b"ssm"
TRANSIENT, PERMANENT = "transient", "permanent"
SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # the image file, or the tar archive holding it
        ("member", pa.string()),  # the member name inside the tar; null for plain files
        ("image_score", pa.float64()),  # null when the row has an error
        ("is_anomaly", pa.bool_()),
        ("heatmap_png", pa.binary()),  # 8-bit grayscale PNG at the scored resolution, calibrated fixed scale
        ("width", pa.int32()),  # original size of the image, EXIF orientation applied; null when unread
        ("height", pa.int32()),
        ("frames", pa.int32()),  # frames in the file (multi-frame GIF/TIFF/WebP: frame 0 is scored); null on errors
        ("checkpoint", pa.string()),
        ("error", pa.string()),  # null when scored
        ("error_kind", pa.string()),  # "transient" (a rerun retries it), "permanent", null when scored
    ]
)
_PART = re.compile(r"part-(\d{14}-[0-9a-f]{6})-[0-9a-f]{16}\.parquet")  # group 1: the run, sortable by time
_TMP = re.compile(r"\.(part-\d{14}-[0-9a-f]{6}-[0-9a-f]{16}\.parquet)\.tmp")
LOCK_NAME = ".ssm-score.lock"
# s3:// lock: the holder rewrites the lock object this often; a lock not rewritten for LOCK_STALE_S
# (by the storage's clock) belongs to a run that died and is taken over.
LOCK_HEARTBEAT_S = 20.0
LOCK_STALE_S = 120.0

# The error messages jobs/score.py writes whose cause may go away on its own (storage, I/O, a file not
# there yet, an archive being re-created, the scorer running out of memory). Every other error is about
# the image's bytes and is permanent.
_TRANSIENT_ERRORS = re.compile(
    r"cannot be read \(|cannot read the tar archive|corrupt tar archive|the archive is truncated|scoring failed \("
    r"|cannot read this tar inside the archive|file not found; |matches no image file"
    r"|which does not exist; fix or remove the link|a folder with no images in it"
)

def is_part(path: str, fs) -> bool:
    """Whether the file at `path` is one of the job's files: named like one, with the b"ssm" metadata."""
    if not _PART.fullmatch(posixpath.basename(path)):
        return False
    with fs.open(path, "rb") as f:
        return METADATA_KEY in (pq.ParquetFile(f).schema_arrow.metadata or {})


def error_kind(error: str | None) -> str | None:
    """"transient", "permanent" or None (no error) for an error message written by the job."""
    if not error:
        return None
    return TRANSIENT if _TRANSIENT_ERRORS.search(error) else PERMANENT


def new_run_id() -> str:
    """Names one run's files; sorts in start order (microseconds after the second, in decimal)."""
    now = time.time()
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(now)) + f"-{int(now % 1 * 1e6):06d}"


def part_name(run: str, paths: Iterable[str], members: Iterable[str | None]) -> str:
    """part-<run>-<digest of the rows' keys>.parquet: a retried write of the same rows replaces itself."""
    keys = hashlib.sha256()
    for path, member in zip(paths, members):
        keys.update(f"{path}\0{member or ''}\n".encode())
    return f"part-{run}-{keys.hexdigest()[:16]}.parquet"


def write_part(out: str, name: str, table: pa.Table) -> None:
    """Local files appear atomically (temporary name, then rename); S3 objects appear whole on completion."""
    fs, root = storage.filesystem_for(out)
    if fs is None:
        os.makedirs(root, exist_ok=True)
        tmp = os.path.join(root, f".{name}.tmp")
        pq.write_table(table, tmp, row_group_size=512)
        os.replace(tmp, os.path.join(root, name))
    else:
        pq.write_table(table, f"{root}/{name}", filesystem=fs, row_group_size=512)


def with_error_kind(table: pa.Table) -> pa.Table:
    """Files written before error_kind existed get it from their error messages."""
    if "error_kind" in table.column_names:
        return table
    kinds = pa.array([error_kind(e) for e in table["error"].to_pylist()], pa.string())
    return table.append_column("error_kind", kinds)


# ----------------------------------------------------------------------------------------------------------
# What OUT holds


@dataclass
class Part:
    name: str
    run: str
    rows: int


_EMPTY_ROWS = pa.schema([("path", pa.string()), ("member", pa.string()), ("error_kind", pa.string())]).empty_table()


@dataclass
class OutputState:
    parts: list[Part] = field(default_factory=list)  # the job's files, oldest run first
    metadata: list[dict] = field(default_factory=list)  # the distinct b"ssm" metadata among them
    # Every row of those files, part after part: path, member ("" for plain files), error_kind.
    rows: pa.Table = field(default_factory=lambda: _EMPTY_ROWS)
    _latest: np.ndarray | None = field(default=None, repr=False)

    def latest_mask(self) -> np.ndarray:
        """Which rows count: each key's row in the newest file (name order within a run)."""
        if self._latest is None:
            self._latest = first_of_each_key(self.rows["path"], self.rows["member"], keep="last")
        return self._latest

    def latest(self) -> pa.Table:
        """The rows that count (latest_mask), one per key."""
        mask = self.latest_mask()
        return self.rows if mask.all() else self.rows.filter(pa.array(mask))


_HASH_ROWS = 1 << 17  # keys turned into Python objects at a time, to hash them


def _hashes(*columns: pa.ChunkedArray) -> np.ndarray:
    """Python's hash of each row's key (the values of `columns` together), _HASH_ROWS rows at a time."""
    n = len(columns[0])
    hashes = np.empty(n, np.int64)
    for start in range(0, n, _HASH_ROWS):
        values = [c.slice(start, _HASH_ROWS).to_pylist() for c in columns]
        count = len(values[0])
        hashes[start : start + count] = np.fromiter(map(hash, values[0] if len(values) == 1 else zip(*values)),
                                                    np.int64, count)
    return hashes


def is_in_large(values: pa.ChunkedArray, value_set: pa.ChunkedArray) -> np.ndarray:
    """pyarrow.compute.is_in(values, value_set) as a NumPy mask, for a value_set of millions: pc.is_in builds a
    hash table holding a copy of every string (about 120 bytes a value); this keeps 16 bytes a value (hashes,
    sorted) and compares in full only the values whose hash is found."""
    hashes = _hashes(value_set)
    order = np.argsort(hashes, kind="stable")
    hashes = hashes[order]
    found = np.zeros(len(values), bool)
    if not len(hashes):
        return found
    for start in range(0, len(values), _HASH_ROWS):
        chunk = values.slice(start, _HASH_ROWS)
        mine = _hashes(chunk)
        at = np.searchsorted(hashes, mine).clip(max=len(hashes) - 1)
        rows = np.flatnonzero(hashes[at] == mine)
        if not len(rows):
            continue
        same = pc.equal(chunk.take(pa.array(rows)), value_set.take(pa.array(order[at[rows]])))
        same = same.to_numpy(zero_copy_only=False) if isinstance(same, pa.Array) else same.to_numpy()
        found[start + rows[same]] = True
        for i in rows[~same]:  # a hash that several values share (rare): the others, one by one
            j, value = at[i] + 1, chunk[int(i)].as_py()
            while j < len(hashes) and hashes[j] == mine[i] and not found[start + i]:
                found[start + i] = value_set[int(order[j])].as_py() == value
                j += 1
    return found


def first_of_each_key(*columns: pa.ChunkedArray, keep: str = "first") -> np.ndarray:
    """A mask of the rows that are the first (keep="last": the last) of their key, the values of `columns`
    taken together. Keys are compared by Python's hash of each, _HASH_ROWS at a time; only the rows whose
    hash repeats are then compared in full, so memory stays about 16 bytes per row beyond the columns."""
    n = len(columns[0])
    hashes = _hashes(*columns)
    ordered = np.sort(hashes)
    repeats = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])  # hashes held by more than one row
    del ordered
    first = np.ones(n, bool)
    rows = np.flatnonzero(np.isin(hashes, repeats)) if len(repeats) else np.array([], np.int64)
    if len(rows):
        if keep == "last":
            rows = rows[::-1]
        values = [c.take(pa.array(rows)).to_pylist() for c in columns]
        seen = set()
        for row, key in zip(rows, values[0] if len(values) == 1 else zip(*values)):
            if key in seen:
                first[row] = False
            else:
                seen.add(key)
    return first


def check_reachable(out: str) -> None:
    """A remote OUT whose storage is down or refuses fails here, in seconds and in one line."""
    if storage.is_remote(out):
        try:
            storage.probe(out)
        except FileNotFoundError:
            pass  # a new prefix
        except ConnectionError as e:
            raise DataError(f"--out {e}") from None


def _check_folder(out: str):
    fs, root = storage.fsspec_for(out)
    if fs.exists(root) and not fs.isdir(root):
        raise DataError(f"--out {out} is a file; give a folder or an s3:// prefix for the Parquet files.")
    return fs, root.rstrip("/")


def read_output(out: str) -> OutputState:
    """The job's files in `out` (see the module docstring) with their keys and error kinds.

    Removes its own temporary files and sets aside its own files that cannot be parsed; leaves every
    other file alone (a file with the job's name but no b"ssm" metadata is not the job's: logged, ignored).
    """
    fs, root = _check_folder(out)
    state = OutputState()
    tables: list[tuple[Part, pa.Table]] = []
    fs.invalidate_cache()  # files written since the last listing (by pyarrow, or by another run)
    if not fs.exists(root):
        return state
    for p in sorted(info["name"] for info in fs.ls(root, detail=True) if info["type"] == "file"):
        base = posixpath.basename(p)
        if _TMP.fullmatch(base):
            fs.rm(p)
            continue
        match = _PART.fullmatch(base)
        if not match:
            continue
        try:
            with fs.open(p, "rb") as f:
                pf = pq.ParquetFile(f)
                meta = (pf.schema_arrow.metadata or {}).get(METADATA_KEY)
                names = pf.schema_arrow.names
                columns = [c for c in ("path", "member", "error", "error_kind") if c in names]
                table = pf.read(columns=columns) if meta and {"path", "member", "error"} <= set(names) else None
        except Exception as e:
            log.warning("setting aside unreadable output file %s (%s: %s); its images are scored again",
                        p, type(e).__name__, e)
            fs.mv(p, posixpath.join(posixpath.dirname(p), f".{base}.unreadable"))
            continue
        if table is None:
            log.warning("ignoring %s: named like a scoring output file but it has no ssm metadata or no "
                        "path/member/error columns", p)
            continue
        table = with_error_kind(table)
        tables.append((Part(base, match.group(1), table.num_rows), table.select(["path", "member", "error_kind"])))
        meta = json.loads(meta)
        if meta not in state.metadata:
            state.metadata.append(meta)
    tables.sort(key=lambda t: (t[0].run, t[0].name))
    state.parts = [part for part, _ in tables]
    if tables:
        rows = pa.concat_tables([t.cast(_EMPTY_ROWS.schema) for _, t in tables])
        state.rows = rows.set_column(1, "member", rows["member"].fill_null(""))
        pa.default_memory_pool().release_unused()
    return state


def check_same_run(out: str, state: OutputState, new: dict) -> None:
    """Refuse to add rows scored under other rules to an output (checkpoint id, threshold, backend, precision)."""
    for old in state.metadata:
        if old.get("checkpoint") != new["checkpoint"] or old.get("threshold") != new["threshold"]:
            raise DataError(
                f"{out} already holds scores from checkpoint {old.get('checkpoint')} with threshold "
                f"{old.get('threshold')}, not {new['checkpoint']} with {new['threshold']} (the id covers the "
                f"weights, model, scoring and calibration); resume with the same --checkpoint and --threshold, "
                f"or choose a new --out."
            )
        if old.get("backend", "torch") != new["backend"]:
            # The same checkpoint run by another backend agrees only to float rounding (README, "Export"): one
            # output holds one backend's scores, so that a comparison of two outputs compares the backends.
            raise DataError(
                f"{out} already holds scores computed with --backend {old.get('backend', 'torch')}; resume with "
                f"that backend, or choose a new --out to score with --backend {new['backend']}."
            )
        if old.get("precision", "float32") != new["precision"]:
            raise DataError(
                f"{out} already holds scores computed in {old.get('precision', 'float32')}; resume "
                f"{'with' if old.get('precision') == 'bf16' else 'without'} --bf16, or choose a new --out."
            )


def supersede(out: str, run: str, retried: pa.Table) -> int:
    """Leave one row per key: drop every row that is not its key's latest, and the rows of `retried` keys
    (path, member "" for plain files) that this run (`run`) did not write. Each file concerned is rewritten
    without those rows, under a name of the same run, before the old one is removed. Returns the number of
    files rewritten or removed."""
    state = read_output(out)
    drop = ~state.latest_mask()
    retried_rows = np.zeros(len(drop), bool)
    if retried.num_rows:  # rows of a retried key: by path first, then (path, member) for those
        rows = np.flatnonzero(pc.is_in(state.rows["path"], value_set=pc.unique(retried["path"])).to_numpy())
        if len(rows):
            found = state.rows.take(pa.array(rows))
            both = pc.is_in(pc.binary_join_element_wise(found["path"], found["member"], "\0"),
                            value_set=pc.binary_join_element_wise(retried["path"], retried["member"], "\0"))
            retried_rows[rows[both.to_numpy()]] = True
    fs, root = _check_folder(out)
    changed, start = 0, 0
    for part in state.parts:
        span, start = slice(start, start + part.rows), start + part.rows
        mine = drop[span] | retried_rows[span] if part.run != run else drop[span]
        if not mine.any():
            continue
        with fs.open(f"{root}/{part.name}", "rb") as f:
            pf = pq.ParquetFile(f)
            metadata = pf.schema_arrow.metadata
            table = with_error_kind(pf.read())
        table = table.filter(pa.array(~mine))
        if table.num_rows:
            table = table.select(SCHEMA.names).cast(SCHEMA).replace_schema_metadata(metadata)
            name = part_name(part.run, table["path"].to_pylist(), table["member"].to_pylist())
            write_part(out, name, table)
        fs.rm(f"{root}/{part.name}")
        changed += 1
    return changed


def summarize(table: pa.Table) -> dict:
    scored = table["error"].null_count
    return {"rows": table.num_rows, "scored": scored, "errors": table.num_rows - scored,
            "anomalies": int(pc.sum(table["is_anomaly"]).as_py() or 0)}


# ----------------------------------------------------------------------------------------------------------
# One job per OUT


class OutputLock:
    """Held while a job reads and writes `out`; a second job on the same `out` is refused.

    Local folders: an flock on OUT/.ssm-score.lock, released by the kernel when the process ends however
    it ends (so a crashed run never blocks the next; on NFS this relies on the server's lock support).
    s3://: the object OUT/.ssm-score.lock, created only if absent (a conditional put), rewritten every
    LOCK_HEARTBEAT_S by its holder and taken over when it has not been rewritten for LOCK_STALE_S (a run
    that died); every rewrite, take-over and the final delete is conditional on the object being the one
    this run wrote, so two runs never both hold it. Needs a store with conditional writes (AWS S3, MinIO,
    moto); a holder whose storage clock gap or pause exceeds LOCK_STALE_S loses the lock and is told so.
    """

    def __init__(self, out: str):
        self.out = out
        self.owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "run": uuid.uuid4().hex,
                                 "started": datetime.datetime.now(datetime.timezone.utc).isoformat()})
        self.lost = False
        self._fd: int | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _busy(self, owner: str, age: float | None = None) -> DataError:
        stale = "" if age is None else (
            f" (its lock was renewed {age:.0f} s ago; one not renewed for {LOCK_STALE_S:.0f} s is a crashed run's "
            f"and is taken over)")
        return DataError(
            f"{self.out} is being written by another ssm score run ({owner.strip() or 'owner unknown'}){stale}; "
            f"wait for it to finish, or choose another --out."
        )

    def __enter__(self) -> OutputLock:
        fs, root = _check_folder(self.out)
        if storage.is_remote(self.out) and not hasattr(fs, "call_s3"):  # gs://, az://...: no conditional puts here
            log.warning("%s is not local or s3://: no lock; make sure no other run writes there", self.out)
        elif storage.is_remote(self.out):
            self._acquire_remote(fs, f"{root}/{LOCK_NAME}")
        else:
            try:
                self._acquire_local(os.path.join(root, LOCK_NAME))
            except OSError as e:  # a path under a file, a read-only or missing mount
                raise DataError(f"--out {self.out}: cannot write there ({type(e).__name__}: {e.strerror or e}); "
                                f"give a folder you can write to.") from None
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _acquire_local(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                raise self._busy(owner) from None
            try:  # the holder before us may have removed the file between our open and our lock
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, self.owner.encode())
        self._fd, self._path = fd, path

    def _acquire_remote(self, fs, path: str) -> None:
        bucket, key, _ = fs.split_path(path)
        self._fs, self._bucket, self._key = fs, bucket, key
        try:
            self._etag = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self.owner.encode(),
                                    IfNoneMatch="*")["ETag"]
        except FileExistsError:
            try:
                head = fs.call_s3("head_object", Bucket=bucket, Key=key)
                owner = fs.cat_file(path).decode(errors="replace")
            except FileNotFoundError:  # released meanwhile: try once more from the start
                return self._acquire_remote(fs, path)
            if owner == self.owner:  # our own put went through, its answer was lost, and the retry was refused
                self._etag = head["ETag"]
                return self._start_heartbeat()
            age = time.time() - head["LastModified"].timestamp()
            if age < LOCK_STALE_S:
                raise self._busy(owner, age) from None
            try:
                self._etag = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self.owner.encode(),
                                        IfMatch=head["ETag"])["ETag"]
            except OSError:  # another run took it over first
                raise self._busy("another run took over a stale lock") from None
            log.warning("took over the lock on %s: its holder (%s) stopped renewing it %.0f s ago",
                        self.out, owner, age)
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="ssm-score-lock")
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                self._etag = self._fs.call_s3("put_object", Bucket=self._bucket, Key=self._key,
                                              Body=self.owner.encode(), IfMatch=self._etag)["ETag"]
            except Exception as e:
                self.lost = True
                log.error("lost the lock on %s (%s: %s); another run may be writing there", self.out,
                          type(e).__name__, e)
                return

    def check(self) -> None:
        if self.lost:
            raise DataError(
                f"the lock on {self.out} was lost mid-run (not renewed for {LOCK_STALE_S:.0f} s); the rows written "
                f"are kept, but rerun the same command once no other run writes there to finish the output."
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if not self.lost:
                try:
                    self._fs.call_s3("delete_object", Bucket=self._bucket, Key=self._key, IfMatch=self._etag)
                except Exception as e:  # it goes stale and is taken over
                    log.warning("could not remove the lock on %s (%s)", self.out, e)
        if self._fd is not None:
            os.unlink(self._path)  # while still holding it: a waiting run then locks a new file
            os.close(self._fd)
            self._fd = None
