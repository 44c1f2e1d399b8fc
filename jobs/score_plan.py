"""Planning a scoring job on the driver: list the inputs, read what OUT holds, cut what is left into work units.

    inputs --list_sources--> Sources: one key per image file or tar shard, as Arrow string chunks
           --plan_units(Sources, OutputState)--> Plan: a units table (one row per decode task) and the counts

Everything that grows with the number of inputs stays columnar: manifests are read in blocks of lines and
turned into keys by pyarrow.compute, s3:// prefixes are listed page by page, repeated inputs are found through
Python's hash of each key (only keys whose hash repeats are compared in full), and what OUT already holds is
matched with pyarrow.compute.is_in. Ten million manifest lines with five million rows already in OUT plan in
the time and memory README ("Planning ten million inputs") gives; benchmarks/plan_scale.py measures it.

Listing rules (README, "Inputs of ssm score"): symlinked folders are followed, each folder once; names that are
not UTF-8 are written escaped (row_key); a manifest line naming nothing is an error row; an argument that yields
no image at all is refused before any work. A manifest line is looked at on disk (is it a folder? which real
folder holds it?) unless manifest_stat is False: then a line is a file unless it ends with "/" or holds a glob.
"""

from __future__ import annotations

import codecs
import functools
import glob
import os
import posixpath
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import storage
from jobs.score_output import TRANSIENT, OutputState, first_of_each_key, is_in_large
from ssm.data import IMAGE_EXTENSIONS, DataError

TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
MANIFEST_EXTENSIONS = (".txt", ".lst")
FILES_PER_UNIT = 32  # image files per decode task; each tar shard gets a task of its own
_GLOB_CHARS = "*?["
_CHUNK_ROWS = 1 << 16  # sources listed one by one (folders, prefixes, globs) become Arrow chunks of this many
_MANIFEST_BLOCK_BYTES = 16 << 20  # a manifest is read and parsed this many bytes of whole lines at a time
_PLAN_ROWS = 1 << 20  # keys are grouped into units this many at a time (bounds the copies made)
_STRIP = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"  # the ASCII characters str.strip() removes
_WIDE_SPACE = r"\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"  # and the others
_TAR_NAME = r"(?i)\.(tar|tar\.gz|tgz)$"


def row_key(name: str) -> str:
    """`name` (a path, URI or tar member name) as written in the output's path and member columns.

    Names that are valid UTF-8 are written as they are. A name that is not (a local file name or tar
    member holding other bytes, which Python reads as surrogate escapes) is written with its bytes that are
    not UTF-8 as \\xNN and its backslashes doubled, Python's escape form: the original bytes are
    codecs.escape_decode(key.encode())[0], e.g. os.fsdecode(...) of them opens the file.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        try:
            raw = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # lone surrogates that are not escaped bytes
            raw = name.encode("utf-8", "surrogatepass")
        return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Source:
    uri: str  # absolute local path or scheme://bucket/key, as read (may hold surrogate escapes)
    kind: str  # "image" or "tar"

    @property
    def key(self) -> str:
        """The output's path for this source (see row_key)."""
        return row_key(self.uri)


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


@dataclass
class Sources:
    """The image files and tar shards listed, each once, in listing order: their keys (the output's path)
    as Arrow string chunks, and the URI of each key that differs from it (a name that is not UTF-8)."""

    keys: pa.ChunkedArray
    uris: dict[str, str]

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[Source]:
        """One Source at a time (for a look at a few; planning works on the columns)."""
        for chunk in self.keys.chunks:
            for key in chunk.to_pylist():
                yield _named(self.uris.get(key, key))


# ----------------------------------------------------------------------------------------------------------
# Folders, globs, prefixes


def _walk_local(root: str) -> Iterator[Source]:
    """Image and tar files under `root`, following symlinked folders; a folder reached twice (a link
    back up the tree, two links to one folder) is read only the first time. A folder that cannot be
    listed (permissions) raises, so that list_sources names it instead of skipping its images."""
    visited: set[tuple[int, int]] = set()

    def unreadable(e: OSError):  # a folder that cannot be listed stops the job, naming it, not skipped
        raise e

    for folder, subdirs, files in os.walk(root, followlinks=True, onerror=unreadable):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in visited:
            subdirs[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for f in sorted(files):
            kind = _kind(f)
            if kind:
                yield Source(os.path.join(folder, f), kind)


def _folders_once(root: str) -> Iterator[str]:
    """`root` and the folders under it, following symlinked folders, each real folder once, shallowest first;
    hidden folders are skipped (as glob's `**` skips them)."""
    seen: set[str] = set()
    queue = [root]
    for folder in queue:  # grows while it is read: breadth first
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        yield folder
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        queue.extend(e.path for e in entries if not e.name.startswith(".") and e.is_dir())


def _glob_local(pattern: str) -> list[str]:
    """glob.glob(pattern, recursive=True), except that each `**` visits every real folder once: glob's own
    `**` follows a symlink loop until the path is too long, and with two links back up that is 2**40 paths."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return glob.glob(pattern)
    i = parts.index("**")
    base = os.sep.join(parts[:i]) or (os.sep if pattern.startswith(os.sep) else os.curdir)
    rest = os.sep.join(parts[i + 1 :])
    bases = [b for b in (glob.glob(base) if any(c in base for c in _GLOB_CHARS) else [base]) if os.path.isdir(b)]
    if not rest:  # "DIR/**": the folders themselves, walked as folders are
        return bases
    return [m for b in bases for d in _folders_once(b) for m in _glob_local(os.path.join(glob.escape(d), rest))]


def _find_remote(fs, path: str) -> Iterator[str]:
    """The files under a remote folder, in key order; S3 is listed a page (1000 keys) at a time rather than
    all at once, other stores through fsspec's find."""
    if not hasattr(fs, "call_s3"):
        yield from sorted(fs.find(path))
        return
    bucket, prefix, _ = fs.split_path(path.rstrip("/") + "/")
    page = {"Bucket": bucket, "Prefix": prefix}
    while True:
        listed = fs.call_s3("list_objects_v2", **page)
        for item in listed.get("Contents", []):  # S3 lists keys in UTF-8 byte order: sorted()'s order
            if not item["Key"].endswith("/"):  # a folder marker
                yield f"{bucket}/{item['Key']}"
        if not listed.get("IsTruncated"):
            return
        page["ContinuationToken"] = listed["NextContinuationToken"]


def _expand(given: str, stat: bool = True) -> Iterator[Source | pa.Array]:
    """What one argument (or manifest line) names: Sources, or Arrow arrays of keys from a manifest."""
    remote = storage.is_remote(given)
    fs, path = storage.fsspec_for(given)
    scheme = given.split("://", 1)[0] + "://" if remote else ""

    def uri(p: str) -> str:
        return scheme + p if remote else os.path.abspath(p)

    if any(c in path for c in _GLOB_CHARS) and not (not remote and os.path.isfile(path)):
        if remote:  # one listing with the types, not one request per match
            matches = sorted((p, info["type"] == "directory") for p, info in fs.glob(path, detail=True).items())
        else:
            # Shallowest first: a file also reached through a loop of symlinked folders keeps its short path.
            found = sorted(_glob_local(path), key=lambda p: (p.count(os.sep), p))
            matches = [(p, os.path.isdir(p)) for p in found]
        for m, is_dir in matches:
            if is_dir:
                yield from _expand(uri(m), stat)
            elif _kind(m):
                yield Source(uri(m), _kind(m))
        return
    if not remote and os.path.isdir(path):
        yield from _walk_local(path)
        return
    if remote and fs.isdir(path):
        root = path.rstrip("/") + "/"
        for p in _find_remote(fs, path):
            hidden = any(part.startswith(".") for part in p[len(root):].split("/")[:-1])
            if not hidden and _kind(p):
                yield Source(uri(p), _kind(p))
        return
    if fs.isfile(path):
        if path.lower().endswith(MANIFEST_EXTENSIONS):
            yield from _read_manifest(fs, path, uri(path), stat)
        else:
            yield _named(uri(path))
        return
    raise DataError(f"{row_key(given)}: input not found; check the path or URI.")


# ----------------------------------------------------------------------------------------------------------
# Manifests


def _manifest_line(uri: str, stat: bool) -> Iterator[Source]:
    """What one manifest line names: a file (scored whatever its extension), or the images of a folder
    (local; s3:// when the line ends with "/") or glob. A line that names nothing is still yielded as a
    file, so that it becomes an error row saying so."""
    remote = storage.is_remote(uri)
    path = uri.split("://", 1)[1] if remote else uri
    pattern = any(c in path for c in _GLOB_CHARS) and not (not remote and stat and os.path.isfile(uri))
    folder = uri.endswith("/") if remote or not stat else os.path.isdir(uri)
    if not (pattern or folder):
        yield _named(uri)
        return
    found = False
    try:
        for source in _expand(uri, stat):
            found = True
            yield source
    except DataError:
        pass
    if not found:
        yield Source(uri, "image")


def _manifest_entry(line: str, uri: str, base: str, stat: bool) -> Iterator[Source]:
    """The sources one manifest line names, the line read one at a time (see _manifest_keys for the rest)."""
    line = line.strip()
    if not line or line.startswith("#"):
        return
    if storage.is_remote(line):
        yield from _manifest_line(line, stat)
    elif "://" in line:  # file://
        yield from _manifest_line(os.path.abspath(line.split("://", 1)[1]), stat)
    elif storage.is_remote(uri):  # relative to the manifest's prefix
        yield from _manifest_line(f"{base}/{line.lstrip('/')}", stat)
    else:  # relative to the manifest's folder, unless absolute
        path = os.path.abspath(os.path.join(base, os.path.expanduser(line)))
        folder = not stat and line.endswith("/") and path != "/"  # unlooked-at lines: a folder says so
        yield from _manifest_line(path + "/" if folder else path, stat)


def _manifest_blocks(f) -> Iterator[bytes]:
    """The manifest's bytes in blocks that end at a line end; a byte-order mark at the start is dropped."""
    rest, first = b"", True
    while True:
        block = f.read(_MANIFEST_BLOCK_BYTES)
        if first:
            block, first = block.removeprefix(codecs.BOM_UTF8), False
        if not block:
            if rest:
                yield rest
            return
        block = rest + block
        cut = block.rfind(b"\n") + 1
        rest, block = block[cut:], block[:cut]
        if block:
            yield block


def _manifest_keys(lines: pa.Array, uri: str, base: str, stat: bool, subfolders: dict
                   ) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """One block's lines (UTF-8) as keys, worked out for all lines at once: (keys, kept, slow).

    kept: the line names something (not blank, not a comment). slow: the line is read as _manifest_entry
    reads it, one at a time: a glob, a folder, a file:// or ~ line, a path that needs normalising (.., //),
    whitespace beyond ASCII, a line with a carriage return in it. The keys of the other kept lines are final:
    the absolute path or the URI, which for a UTF-8 name is also its key.
    """
    lines = pc.ascii_trim(lines, _STRIP)
    kept = pc.and_(pc.not_equal(lines, ""), pc.invert(pc.starts_with(lines, "#")))
    slow = pc.match_substring_regex(lines, f"^[{_WIDE_SPACE}]|[{_WIDE_SPACE}]$|\r")
    has_scheme = pc.match_substring(lines, "://")
    remote = pc.and_(has_scheme, pc.invert(pc.match_substring_regex(lines, r"^(?i:file|local)?://")))
    slow = pc.or_(slow, pc.and_(has_scheme, pc.invert(remote)))  # file://
    if storage.is_remote(uri):  # relative lines are under the manifest's prefix
        joined = pc.binary_join_element_wise(base, pc.utf8_ltrim(lines, "/"), "/")
    else:  # relative to the manifest's folder, unless absolute; normalising is left to the slow path
        relative = pc.binary_join_element_wise(base.rstrip("/"), lines, "/")
        joined = pc.if_else(pc.starts_with(lines, "/"), lines, relative)
        slow = pc.or_(slow, pc.starts_with(lines, "~"))
        slow = pc.or_(slow, pc.and_(pc.invert(remote), pc.match_substring_regex(joined, r"(^|/)\.\.?(/|$)|//|/$")))
    keys = pc.if_else(remote, lines, joined)
    slow = pc.or_(slow, pc.match_substring_regex(keys, "[" + re.escape(_GLOB_CHARS) + "]"))  # a glob
    slow = pc.or_(slow, pc.ends_with(keys, "/"))  # a folder or prefix
    kept, slow = kept.to_numpy(zero_copy_only=False), slow.to_numpy(zero_copy_only=False)
    if stat and not storage.is_remote(uri):  # a local line naming a folder lists its images
        rows = np.flatnonzero(kept & ~slow & ~remote.to_numpy(zero_copy_only=False))
        slow[rows[_are_folders(keys.take(rows), subfolders)]] = True
    return keys, kept, slow


def _are_folders(paths: pa.Array, subfolders: dict[str, list[str] | None]) -> np.ndarray:
    """os.path.isdir of each absolute path, from one listing of each distinct parent folder (os.scandir gives
    each entry's type with the listing, and stats only symlinks) rather than one stat per path. `subfolders`
    keeps the listings (parent -> its subfolders' paths; None when it cannot be listed) across calls."""
    parents = pc.replace_substring_regex(paths, r"/[^/]*$", "")
    found, unlisted = [], []
    for parent in pc.unique(parents).to_pylist():
        if parent not in subfolders:
            try:
                with os.scandir(parent or "/") as entries:
                    names = [os.path.join(parent, e.name) for e in entries if e.is_dir()]
                subfolders[parent] = [p for p in names if row_key(p) == p]  # a UTF-8 line names UTF-8 folders
            except (FileNotFoundError, NotADirectoryError):
                subfolders[parent] = []
            except OSError:  # a folder that cannot be listed: its lines are looked at one by one
                subfolders[parent] = None
        if subfolders[parent] is None:
            unlisted.append(parent)
        else:
            found.extend(subfolders[parent])
    folders = pc.is_in(paths, value_set=pa.array(found, pa.string())).to_numpy(zero_copy_only=False)
    if unlisted:
        look = pc.is_in(parents, value_set=pa.array(unlisted, pa.string())).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(look):
            folders[i] = os.path.isdir(paths[i].as_py())
    return folders


def _read_manifest(fs, path: str, uri: str, stat: bool = True) -> Iterator[Source | pa.Array]:
    """The sources named by a manifest: UTF-8 (a byte-order mark is ignored; bytes that are not UTF-8 are
    kept as surrogate escapes, so such file names still open), one path, URI, folder or glob a line.

    Read in blocks: the lines of a block become keys all at once (_manifest_keys), yielded as Arrow arrays
    in line order, with the lines that need reading one at a time (_manifest_entry) yielded where they stand.
    """
    base = uri.rsplit("/", 1)[0] if storage.is_remote(uri) else os.path.dirname(path)
    subfolders: dict[str, list[str] | None] = {}  # see _are_folders
    with fs.open(path, "rb") as f:
        for block in _manifest_blocks(f):
            raw = pc.split_pattern(pa.array([block], pa.binary()), pattern=b"\n").flatten()
            try:
                lines = raw.cast(pa.string())
            except pa.ArrowInvalid:  # bytes that are not UTF-8: this block line by line
                for line in re.split(r"\r\n?|\n", block.decode("utf-8", "surrogateescape")):
                    yield from _manifest_entry(line, uri, base, stat)
                continue
            keys, kept, slow = _manifest_keys(lines, uri, base, stat, subfolders)
            start = 0
            for i in [*np.flatnonzero(kept & slow), len(lines)]:
                if i > start:
                    yield keys.slice(start, i - start).filter(pa.array(kept[start:i] & ~slow[start:i]))
                if i < len(lines):
                    for line in re.split(r"\r\n?", lines[i].as_py()):
                        yield from _manifest_entry(line, uri, base, stat)
                start = i + 1


# ----------------------------------------------------------------------------------------------------------
# Listing


def _identity(source: Source) -> str:
    """What makes two listed sources the same file: the URI, or for a local file its real folder and
    name (a file reached through symlinked folders or a loop of them is listed once, under the first path
    found; a symlink to a file in another folder is a file of its own)."""
    if storage.is_remote(source.uri):
        return source.key
    folder, name = os.path.split(source.uri)
    return row_key(os.path.join(_realpath(folder), name))


_realpath = functools.lru_cache(maxsize=4096)(os.path.realpath)


def _identities(keys: pa.Array) -> pa.Array:
    """_identity of UTF-8 keys, for all at once: the keys themselves unless a local key's folder is reached
    through a symlink (each distinct folder is resolved once)."""
    local = pc.starts_with(keys, "/")  # local keys are absolute paths; the others are URIs
    folders = pc.replace_substring_regex(keys, r"/[^/]*$", "")
    moved = [f for f in pc.unique(folders.filter(local)).to_pylist() if _realpath(f or "/") != (f or "/")]
    if not moved:
        return keys
    moved = pc.and_(local, pc.is_in(folders, value_set=pa.array(moved, pa.string())))
    rows = np.flatnonzero(moved.to_numpy(zero_copy_only=False))
    idents = [row_key(os.path.join(_realpath(os.path.dirname(k)), os.path.basename(k)))
              for k in keys.take(rows).to_pylist()]
    mask = np.zeros(len(keys), bool)
    mask[rows] = True
    return pc.replace_with_mask(keys, pa.array(mask), pa.array(idents, pa.string()))


class _Listing:
    """Collects what the inputs name, in order, as Arrow chunks of keys and of their identities."""

    def __init__(self, stat: bool):
        self.stat = stat
        self.keys: list[pa.Array] = []
        self.idents: list[pa.Array] = []
        self.uris: dict[str, str] = {}
        self.pending: list[Source] = []

    def add(self, item: Source | pa.Array) -> int:
        """Adds a Source or an array of keys (from a manifest); returns how many sources that was."""
        if isinstance(item, Source):
            self.pending.append(item)
            if len(self.pending) >= _CHUNK_ROWS:
                self.flush()
            return 1
        self.flush()
        if len(item):
            self.keys.append(item)
            self.idents.append(_identities(item) if self.stat else item)
        return len(item)

    def flush(self) -> None:
        if not self.pending:
            return
        keys = [s.key for s in self.pending]
        self.uris.update((k, s.uri) for k, s in zip(keys, self.pending) if k != s.uri)
        self.keys.append(pa.array(keys, pa.string()))
        self.idents.append(pa.array([_identity(s) for s in self.pending], pa.string()))
        self.pending = []


def list_sources(inputs: Sequence[str], manifest_stat: bool = True) -> Sources:
    """The image files and tar shards named by `inputs`, each once, in a stable order.

    Raises DataError naming the first input that yields no image or tar at all (a glob that matches
    nothing, an empty folder or manifest), before anything is scored. manifest_stat=False: manifest lines
    are not looked at on disk (see the module docstring).
    """
    listing = _Listing(manifest_stat)
    for given in inputs:
        given = os.fspath(given)
        if isinstance(given, bytes):
            given = os.fsdecode(given)
        n = 0
        try:
            for item in _expand(given, manifest_stat):
                n += listing.add(item)
        except DataError:
            raise
        except Exception as e:  # permissions, a missing bucket, bad credentials...
            raise DataError(
                f"{row_key(given)}: cannot list this input ({type(e).__name__}: {e}); check the path and access."
            ) from e
        if n == 0:
            raise DataError(
                f"{row_key(given)}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)}, or tar archives); "
                f"check the input."
            )
    listing.flush()
    pa.default_memory_pool().release_unused()  # what parsing the manifests held, back to the system
    keys = pa.chunked_array(listing.keys, pa.string())
    first = first_of_each_key(pa.chunked_array(listing.idents, pa.string()))
    if not first.all():
        keys = keys.filter(pa.array(first))
    return Sources(keys, listing.uris)


# ----------------------------------------------------------------------------------------------------------
# Resuming: what is left to score (what OUT holds: jobs/score_output.py)


@dataclass
class Plan:
    units: pa.Table  # one row per decode task: kind ("tar" or "images"), uris (list of UTF-8 bytes, surrogate
    #                  escapes kept), skip (a tar's member keys already done)
    skipped: int  # images already in OUT
    retried: pa.Table  # path, member ("" for plain files): keys whose error row is scored again
    duplicates: bool  # OUT holds a key more than once (left by a crash): supersede must run


def _unit_uris(keys: pa.Array, uris: dict[str, str]) -> pa.Array:
    """Keys as the URI bytes a decode task opens: the key itself, or for a name that is not UTF-8 its URI."""
    raw = keys.cast(pa.binary())
    odd = [k for k in uris if k != uris[k]]
    if not odd:
        return raw
    mask = pc.is_in(keys, value_set=pa.array(odd, pa.string())).fill_null(False)
    fixed = [uris[k].encode("utf-8", "surrogateescape") for k in keys.filter(mask).to_pylist()]
    return pc.replace_with_mask(raw, mask, pa.array(fixed, pa.binary()))


def _lists(values: pa.Array, counts: np.ndarray, value_type: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(counts) + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values.cast(value_type))


def plan_units(sources: Sources, state: OutputState, retry_errors: bool = False) -> Plan:
    """Work units for the decode tasks, leaving out the keys OUT holds, except those to retry.

    A unit is a tar shard, or a group of FILES_PER_UNIT image files; each becomes one block and one decode
    task. A tar whose archive-level error row is done is skipped whole; otherwise its done members are passed
    along, so that only the missing ones are decoded. Rows whose latest error may be transient (or any error,
    with retry_errors) are retried when their file is among the sources listed; rows of inputs not given
    this time are left as they are.
    """
    latest = state.latest()
    duplicates = latest.num_rows < state.rows.num_rows
    kinds = latest["error_kind"]
    retryable = (pc.is_valid(kinds) if retry_errors else pc.equal(kinds, TRANSIENT)).fill_null(False)
    maybe = pc.unique(latest["path"].filter(retryable))
    listed = pc.unique(sources.keys.filter(pc.is_in(sources.keys, value_set=maybe)))
    retry = pc.and_(retryable, pc.is_in(latest["path"], value_set=listed))
    retried = latest.filter(retry).select(["path", "member"])
    plain = pc.equal(latest["member"], "")
    members = latest.filter(pc.and_(pc.invert(plain), pc.invert(retry))).select(["path", "member"])
    # Images and tars whose own row (a tar's archive-level error) is done: the one large set lookup (by hash), against
    # every plain row (no copy of the paths when all rows are plain), less the retried ones.
    paths = latest["path"] if pc.all(plain).as_py() is not False else latest["path"].filter(plain)
    del latest
    finished = pa.array(is_in_large(sources.keys, pa.chunked_array([paths]) if isinstance(paths, pa.Array) else paths))
    del paths
    again = retried["path"].filter(pc.equal(retried["member"], ""))
    if len(again):
        finished = pc.and_(finished, pc.invert(pc.is_in(sources.keys, value_set=again)))
    skipped = pc.sum(finished).as_py() or 0
    tar = pc.match_substring_regex(sources.keys, _TAR_NAME)
    tars = sources.keys.filter(pc.and_(pc.invert(finished), tar)).combine_chunks()
    members = members.filter(pc.is_in(members["path"], value_set=tars))
    skipped += members.num_rows
    # A tar's done members, grouped in the tars' order (a stable sort of their tar's index).
    owner = pc.index_in(members["path"], value_set=tars).to_numpy(zero_copy_only=False)
    order = np.argsort(owner, kind="stable")
    skip = members["member"].take(pa.array(order)).combine_chunks() if len(order) else pa.array([], pa.string())
    tables = [pa.table({
        "kind": pa.array(["tar"] * len(tars), pa.string()),
        "uris": _lists(_unit_uris(tars, sources.uris), np.ones(len(tars), np.int64), pa.binary()),
        "skip": _lists(skip, np.bincount(owner, minlength=len(tars)), pa.string()),
    })]
    images = pc.invert(pc.or_(finished, tar))
    for start in range(0, len(sources), _PLAN_ROWS):  # a slice at a time: one copy of the keys, in the units
        keys = sources.keys.slice(start, _PLAN_ROWS).filter(images.slice(start, _PLAN_ROWS)).combine_chunks()
        if not len(keys):
            continue
        counts = np.diff(np.r_[0:len(keys):FILES_PER_UNIT, len(keys)])
        tables.append(pa.table({
            "kind": pa.array(["images"] * len(counts), pa.string()),
            "uris": _lists(_unit_uris(keys, sources.uris), counts, pa.binary()),
            "skip": _lists(pa.array([], pa.string()), np.zeros(len(counts), np.int64), pa.string()),
        }))
    return Plan(pa.concat_tables(tables), skipped, retried, duplicates)
