"""Planning on the driver (jobs/score_plan.py) without Ray: manifests read a block at a time give what reading
them line by line gives, s3:// prefixes are listed across pages, and the plan leaves out exactly what OUT holds."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import score_plan
from jobs.score_output import METADATA_KEY, SCHEMA, read_output, supersede, write_part
from jobs.score_plan import _identity, _manifest_entry, list_sources, plan_units


def _by_line(manifest: str, stat: bool) -> list[str]:
    """The keys a manifest names when every line is read on its own (the slow path), each file once (with
    stat, a file reached through a symlinked folder is the same file)."""
    base = os.path.dirname(manifest)
    with open(manifest, encoding="utf-8-sig", errors="surrogateescape") as f:
        sources = [s for line in f for s in _manifest_entry(line, manifest, base, stat)]
    first = {}
    for s in sources:
        first.setdefault(_identity(s) if stat else s.key, s.key)
    return list(first.values())


@pytest.mark.parametrize("stat", [True, False])
def test_manifest_blocks_give_what_lines_give(tmp_path, monkeypatch, stat):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "real").mkdir()
    for name in ("d/a.png", "d/sub/b.png", "d/real/c.png", "d/t.tar"):
        (tmp_path / name).write_bytes(b"x")
    os.symlink(tmp_path / "d" / "real", tmp_path / "d" / "link")
    lines = ["d/a.png", "./d/a.png", " d/sub/b.png\t", "d/sub/../a.png", str(tmp_path / "d/t.tar"), "~/nothere.png",
             f"file://{tmp_path}/d/sub/b.png", "# a comment", "", "d/link/c.png", "d/real/c.png", "d/sub", "d/sub/",
             "d/*.png", "d/none*.png", "missing.png", "D/X.TGZ", "\u00a0d/a.png\u3000", "x\ry.png", "d//a.png",
             "d/caf\u00e9.png", "s3://bucket/k.png", "d/a.png"]
    manifest = tmp_path / "list.txt"
    manifest.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines * 7).encode() + b"\nd/\xe9t\xe9.png\n" + b"tail.png")
    monkeypatch.setattr(score_plan, "_MANIFEST_BLOCK_BYTES", 64)  # many blocks, lines cut across them
    got = [s.key for s in list_sources([str(manifest)], manifest_stat=stat)]
    assert got == _by_line(str(manifest), stat)
    assert (str(tmp_path / "d" / "real" / "c.png") in got) == (not stat)  # a symlinked folder's file: once, with stat
    assert str(tmp_path / "d") + "/\\xe9t\\xe9.png" in got and got[-1] == str(tmp_path / "tail.png")


def test_s3_prefix_and_manifest_across_pages(tmp_path, s3_server):
    bucket = s3_server.make_bucket()
    s3 = s3_server.client()
    names = [f"imgs/{i:04d}.png" for i in range(1003)] + ["imgs/.hidden/x.png", "imgs/notes.md", "imgs/sub/z.jpg"]
    for name in names:  # more than one page of 1000 keys
        s3.put_object(Bucket=bucket, Key=name, Body=b"x")
    s3.put_object(Bucket=bucket, Key="lists/l.txt", Body=b"../imgs/0001.png\nrel.png\ns3://other/y.tar\nfolder/\n")
    keys = [s.key for s in list_sources([f"s3://{bucket}/imgs/"])]
    assert keys == [f"s3://{bucket}/{n}" for n in sorted(names) if not n.endswith(".md") and ".hidden" not in n]
    listed = list(list_sources([f"s3://{bucket}/lists/l.txt"]))
    assert [(s.key, s.kind) for s in listed] == [
        (f"s3://{bucket}/lists/../imgs/0001.png", "image"), (f"s3://{bucket}/lists/rel.png", "image"),
        ("s3://other/y.tar", "tar"), (f"s3://{bucket}/lists/folder/", "image")]  # a folder naming nothing: a row


def _part(out, run: str, rows: list[tuple[str, str | None, str | None]], tag: str) -> None:
    n = len(rows)
    table = pa.table({
        "path": [r[0] for r in rows], "member": [r[1] for r in rows], "image_score": [None] * n,
        "is_anomaly": [None] * n, "heatmap_png": [None] * n, "width": [None] * n, "height": [None] * n,
        "frames": [None] * n, "checkpoint": ["c"] * n, "error": [r[2] for r in rows],
        "error_kind": [("transient" if "cannot be read (" in r[2] else "permanent") if r[2] else None for r in rows],
    }, schema=SCHEMA).replace_schema_metadata({METADATA_KEY: b"{}"})
    write_part(str(out), f"part-{run}-{tag * 16}.parquet", table)


def test_plan_leaves_out_what_out_holds_and_retries_errors(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png", "d.png", "s.tar", "u.tar", "v.tar"):
        (folder / name).write_bytes(b"x")
    p = {n: str(folder / n) for n in ("a.png", "b.png", "c.png", "d.png", "s.tar", "u.tar", "v.tar")}
    out = tmp_path / "out"
    gone = "x: cannot be read (OSError: gone); check that it exists."
    _part(out, "20260101000000-000000", [(p["a.png"], None, None), (p["b.png"], None, gone), (p["s.tar"], "m1", None),
                                         (p["s.tar"], "m2", gone), (p["u.tar"], None, "corrupt"),
                                         ("/elsewhere/e.png", None, gone)], "a")
    # A newer file holds b again, scored: the key's latest row is that one (a crash left both).
    _part(out, "20260102000000-000000", [(p["b.png"], None, None), (p["c.png"], None, "not an image")], "b")
    sources = list_sources([str(folder)])
    plan = plan_units(sources, read_output(str(out)))
    assert plan.duplicates and plan.skipped == 3 + 1 + 1  # a, b, c; s.tar's m1; u.tar whole
    assert sorted(zip(plan.retried["path"].to_pylist(), plan.retried["member"].to_pylist())) == [(p["s.tar"], "m2")]
    units = plan.units.to_pylist()
    assert units == [{"kind": "tar", "uris": [p["s.tar"].encode()], "skip": ["m1"]},
                     {"kind": "tar", "uris": [p["v.tar"].encode()], "skip": []},
                     {"kind": "images", "uris": [p["d.png"].encode()], "skip": []}]
    again = plan_units(sources, read_output(str(out)), retry_errors=True)  # the permanent errors too
    assert again.skipped == 3 and again.retried.num_rows == 3  # c.png, u.tar, s.tar's m2
    # Superseding leaves one row per key, keeping /elsewhere (not listed this time) as it was.
    supersede(str(out), "20260103000000-000000", plan.retried)
    rows = pq.read_table(str(out)).select(["path", "member", "error"]).to_pylist()
    assert sorted((r["path"], r["member"] or "") for r in rows) == sorted(
        [(p["a.png"], ""), (p["b.png"], ""), (p["c.png"], ""), (p["s.tar"], "m1"), (p["u.tar"], ""),
         ("/elsewhere/e.png", "")])
