"""The scoring job's output contract: reruns converge to one row per key, files under --out that are not the
job's are never touched, one job per --out (local and s3://), and the checkpoint id covers every setting
that changes a score."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
from typer.testing import CliRunner

import jobs.score_output as score_output
from cli import app
from jobs.report import write_report
from jobs.score import decode_sources, score
from jobs.score_output import LOCK_NAME, OutputLock, error_kind
from ssm.checkpoint import load_checkpoint
from ssm.data import DataError
from test_score_job import _bad_files, _good_images, _rows, _tar, _write, checkpoint  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


def _broken_tar(files: dict[str, bytes], after: int) -> bytes:
    """The tar of `files` with the header of member number `after` overwritten: the rest cannot be read."""
    whole = _tar(files)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        at = tar.getmembers()[after].offset
    return whole[:at] + b"\x07" * 512 + whole[at + 512 :]


def _plain_read(out: Path, with_ray: bool = False) -> list[tuple[str, str | None, str | None]]:
    """(path, member, error_kind) of every row a plain Parquet read of the folder sees (pyarrow's, and Ray's)."""
    table = pads.dataset(str(out), format="parquet").to_table(columns=["path", "member", "error_kind"])
    keys = sorted(zip(*(table[c].to_pylist() for c in ("path", "member", "error_kind"))), key=str)
    if with_ray:
        ray_rows = ray.data.read_parquet(str(out)).select_columns(["path", "member", "error_kind"]).take_all()
        assert sorted(((r["path"], r["member"], r["error_kind"]) for r in ray_rows), key=str) == keys
    return keys


def test_error_kinds_follow_how_each_error_is_produced(tmp_path, checkpoint):
    """Every error the decode stage writes is classified: storage and archive problems transient, bytes permanent."""
    rng = np.random.default_rng(20)
    bad = _write(tmp_path / "bad", _bad_files(rng))
    (tmp_path / "not_a_tar.tar").write_bytes(rng.bytes(3000))
    (tmp_path / "broken.tar").write_bytes(_broken_tar(_good_images(3, seed=21), after=1))
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")  # its target may appear later
    (tmp_path / "empty_folder").mkdir()
    later = [str(tmp_path / n) for n in ("missing.png", "dangling.png", "empty_folder", "new_*.png")]
    units = pa.table({  # work units as jobs/score_plan.plan_units writes them: URIs as bytes
        "kind": ["images", "tar", "tar"],
        "uris": [[p.encode() for p in [*bad, *later]], [str(tmp_path / "not_a_tar.tar").encode()],
                 [str(tmp_path / "broken.tar").encode()]],
        "skip": pa.array([[], [], []], pa.list_(pa.string())),
    })
    config = load_checkpoint(checkpoint).model_config
    rows = [(p, m, e) for b in decode_sources(units, config, rows=64) for p, m, e in zip(b["path"], b["member"], b["error"])]
    kinds = {(Path(p).name, m): error_kind(e or None) for p, m, e in rows}
    assert kinds == {
        **{(Path(p).name, ""): "permanent" for p in bad},
        **{(Path(p).name, ""): "transient" for p in later},
        ("not_a_tar.tar", ""): "transient",
        ("broken.tar", "img_21_000.png"): None,
        ("broken.tar", ""): "transient",
    }
    assert error_kind("x.png: scoring failed (RuntimeError: out of memory)") == "transient"
    assert error_kind("x.png: scoring gave a non-finite score (nan)") == "permanent"


@pytest.mark.slow
def test_rerun_retries_transient_errors_and_converges(tmp_path, checkpoint, ray_local):
    images = _write(tmp_path / "images", _good_images(3, seed=22))
    shard = _good_images(4, seed=23)
    (tmp_path / "shard.tar").write_bytes(_broken_tar(shard, after=2))  # two members, then unreadable
    (tmp_path / "bad.jpg").write_bytes(b"not an image\n")
    later = tmp_path / "later.png"  # named in the manifest, not there yet
    (tmp_path / "list.txt").write_text("\n".join([*images, "later.png", "bad.jpg", "shard.tar"]) + "\n")
    inputs, out = [str(tmp_path / "list.txt")], tmp_path / "scores"
    tar, bad = str(tmp_path / "shard.tar"), str(tmp_path / "bad.jpg")

    first = score(inputs, checkpoint, str(out), batch_size=4, progress=False)
    assert (first.scored, first.errors) == (3 + 2, 3)
    assert {(p, m, k) for p, m, k in _plain_read(out) if k} == {
        (str(later), None, "transient"), (tar, None, "transient"), (bad, None, "permanent")}
    files_before = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}

    later.write_bytes(_good_images(1, seed=24)["img_24_000.png"])
    (tmp_path / "shard.tar").write_bytes(_tar(shard))  # re-created whole
    second = score(inputs, checkpoint, str(out), batch_size=4, progress=False)
    assert (second.scored, second.errors, second.retried, second.skipped) == (1 + 2, 0, 2, 3 + 2 + 1)
    expected = sorted([(p, None, None) for p in [*images, str(later)]] + [(tar, n, None) for n in shard]
                      + [(bad, None, "permanent")], key=str)
    assert _plain_read(out) == expected  # one row per key; the retried errors are gone
    assert not (out / LOCK_NAME).exists()

    # A crash after the new rows were written but before the old ones were removed leaves both: the next
    # run removes the old ones (and re-reads the archive whose old error row came back: it reads cleanly).
    for name, data in files_before.items():
        (out / name).write_bytes(data)
    assert len(_plain_read(out)) > len(expected)
    third = score(inputs, checkpoint, str(out), batch_size=4, progress=False)
    assert (third.scored, third.errors, third.retried) == (0, 0, 1) and third.superseded >= 1
    assert _plain_read(out) == expected

    # A permanent error is kept until asked for: --retry-errors scores the replaced file.
    (tmp_path / "bad.jpg").write_bytes(_good_images(1, seed=25)["img_25_000.png"])
    assert score(inputs, checkpoint, str(out), batch_size=4, progress=False).scored == 0
    result = CliRunner().invoke(app, ["score", *inputs, "--checkpoint", checkpoint, "--out", str(out), "--retry-errors"])
    assert result.exit_code == 0 and "scored 1 images, 0 errors" in result.output, result.output
    assert _plain_read(out, with_ray=True) == sorted([(p, m, None) for p, m, _ in expected], key=str)
    rows, _, _ = _rows(str(out))  # the job's files: same schema and metadata throughout
    assert len(rows) == len(expected)


def test_files_under_out_that_are_not_the_jobs_are_left_alone(tmp_path, checkpoint, ray_local):
    images = _write(tmp_path / "images", _good_images(2, seed=26))
    out = tmp_path / "scores"
    theirs = {
        "sub/.editor-swap.tmp": b"swap",
        "archive/export-2023.parquet": b"an export, not Parquet",
        "notes.txt": b"notes",
        ".part-mine.parquet.tmp": b"not the job's naming scheme",
    }
    for name, data in theirs.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    buf = io.BytesIO()
    pq.write_table(pa.table({"a": [1, 2]}), buf)  # valid Parquet without path/member: not the job's
    theirs["other.parquet"] = theirs["part-20240101000000-000000-0123456789abcdef.parquet"] = buf.getvalue()
    for name in ("other.parquet", "part-20240101000000-000000-0123456789abcdef.parquet"):
        (out / name).write_bytes(buf.getvalue())

    for _ in range(2):  # the first run scores, the second finds nothing left
        summary = score([str(tmp_path / "images")], checkpoint, str(out), batch_size=4, progress=False)
    assert (summary.scored, summary.skipped) == (0, 2)
    assert {name: (out / name).read_bytes() for name in theirs} == theirs
    files = set(out.glob("part-*.parquet")) - {out / "part-20240101000000-000000-0123456789abcdef.parquet"}
    assert len(files) == 1
    assert sorted(pq.read_table(files.pop())["path"].to_pylist()) == sorted(images)
    counts = write_report(str(out), str(tmp_path / "report.html"))  # reads the job's files only
    assert (counts["images"], counts["scored"]) == (2, 2)

    # Resuming with another scoring rule is refused: same weights, another ssm.json; a non-finite threshold.
    other = tmp_path / Path(checkpoint).parent.name / "best"  # the same name: only the content differs
    shutil.copytree(checkpoint, other)
    doc = json.loads((other / "ssm.json").read_text())
    doc["scoring"]["refine_passes"] = 1
    (other / "ssm.json").write_text(json.dumps(doc))
    assert load_checkpoint(other).id != load_checkpoint(checkpoint).id
    with pytest.raises(DataError, match="already holds scores from checkpoint"):
        score([str(tmp_path / "images")], str(other), str(out), progress=False)
    result = CliRunner().invoke(app, ["score", str(tmp_path / "images"), "--checkpoint", checkpoint, "--out", str(out),
                                      "--threshold", "nan"])
    assert result.exit_code == 2 and "--threshold must be a finite number" in result.output, result.output
    assert len(list(out.glob("part-*.parquet"))) == 2


def test_checkpoint_id_covers_scoring_config_and_calibration(tmp_path, checkpoint):
    base = load_checkpoint(checkpoint).id
    ids = {base}
    for section, key, value in [("scoring", "tau", 0.123), ("calibration", "heatmap_vmax", 9.0),
                                ("model", "upsample", "nearest")]:
        copy = tmp_path / f"{section}-{key}" / Path(checkpoint).parent.name / "best"  # only the content differs
        shutil.copytree(checkpoint, copy)
        doc = json.loads((copy / "ssm.json").read_text())
        doc[section][key] = value
        doc["meta"] = {"note": "meta does not change a score"}
        (copy / "ssm.json").write_text(json.dumps(doc, indent=1))
        ids.add(load_checkpoint(copy).id)
    # model.upsample is unchanged ("nearest" is the default) and meta is not part of the id
    assert len(ids) == 3 and base in ids


def test_one_job_per_local_out(tmp_path, checkpoint):
    out = tmp_path / "scores"
    images = _write(tmp_path / "images", _good_images(1, seed=27))
    with OutputLock(str(out)):
        with pytest.raises(DataError, match="being written by another ssm score run") as e:
            score(images, checkpoint, str(out), progress=False)
        assert str(os.getpid()) in str(e.value)  # who holds it
        result = CliRunner().invoke(app, ["score", *images, "--checkpoint", checkpoint, "--out", str(out)])
        assert result.exit_code == 2 and "being written by another ssm score run" in result.output
    assert not (out / LOCK_NAME).exists()

    # A run killed while holding the lock does not block the next one.
    code = ("import sys, time; from jobs.score_output import OutputLock; "
            f"OutputLock({str(out)!r}).__enter__(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(DataError, match=f"'pid': {holder.pid}|\"pid\": {holder.pid}"):
            OutputLock(str(out)).__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_NAME).exists()  # left behind by the crash
    with OutputLock(str(out)):
        pass


def test_one_job_per_s3_out(s3_server, monkeypatch):
    bucket = s3_server.make_bucket()
    out = f"s3://{bucket}/scores"
    monkeypatch.setattr(score_output, "LOCK_HEARTBEAT_S", 0.2)
    monkeypatch.setattr(score_output, "LOCK_STALE_S", 2.0)  # S3 times have 1 s resolution
    with OutputLock(out) as held:
        time.sleep(2.5)  # longer than LOCK_STALE_S: the heartbeat keeps it fresh
        with pytest.raises(DataError, match="being written by another ssm score run"):
            OutputLock(out).__enter__()
        assert not held.lost
    assert s3_server.list_keys(bucket) == []

    # A holder that died: its lock object stops being renewed and is taken over once stale.
    s3_server.client().put_object(Bucket=bucket, Key=f"scores/{LOCK_NAME}", Body=b'{"pid": 1, "host": "gone"}')
    with pytest.raises(DataError, match="gone"):
        OutputLock(out).__enter__()
    time.sleep(3.2)
    with OutputLock(out) as taker:
        # Someone overwrites the lock behind the holder's back: the holder notices and says so.
        s3_server.client().put_object(Bucket=bucket, Key=f"scores/{LOCK_NAME}", Body=b"intruder")
        time.sleep(0.6)
        assert taker.lost
        with pytest.raises(DataError, match="lock on .* was lost"):
            taker.check()
    assert s3_server.list_keys(bucket) == [f"scores/{LOCK_NAME}"]  # the intruder's, not removed by the loser


def test_threshold_must_be_finite(tmp_path, checkpoint):
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="--threshold must be a finite number"):
            score([str(tmp_path)], checkpoint, str(tmp_path / "out"), threshold=bad, progress=False)
    assert not (tmp_path / "out").exists()


def test_rerun_retries_transient_errors_of_files_whose_names_are_not_utf8(tmp_path, checkpoint, ray_local):
    """The output's path escapes such a name (\\xNN): the retry must still match it to the file listed."""
    folder = tmp_path / "images"
    _write(folder, _good_images(1, seed=26))
    name = os.fsdecode(b"caf\xe9.png")
    (folder / name).symlink_to(folder / "later.png")  # dangling until the target appears: transient
    out = tmp_path / "scores"
    first = score([str(folder)], checkpoint, str(out), batch_size=4, progress=False)
    assert (first.scored, first.errors) == (1, 1)
    (folder / "later.png").write_bytes(_good_images(1, seed=27)["img_27_000.png"])
    second = score([str(folder)], checkpoint, str(out), batch_size=4, progress=False)
    assert (second.retried, second.scored, second.errors) == (1, 2, 0)
    escaped = str(folder / "caf\\xe9.png")
    assert [k for k in _plain_read(out) if k[0] == escaped] == [(escaped, None, None)]


def test_unreachable_s3_out_is_one_line(tmp_path, checkpoint, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    for var, value in {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", raising=False)
    images = _write(tmp_path / "images", _good_images(1, seed=28))
    result = CliRunner().invoke(app, ["score", *images, "--checkpoint", checkpoint, "--out", "s3://bucket/scores"])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"--out s3://bucket/scores: cannot reach the storage at {endpoint}" in lines[0], lines


def test_out_that_cannot_be_created_is_one_line(tmp_path, checkpoint):
    images = _write(tmp_path / "images", _good_images(1, seed=29))
    (tmp_path / "a_file").write_bytes(b"x")
    out = tmp_path / "a_file" / "scores"  # under a file: cannot be made a folder
    result = CliRunner().invoke(app, ["score", *images, "--checkpoint", checkpoint, "--out", str(out)])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"--out {out}: cannot write there (NotADirectoryError" in lines[0], lines


def test_pipes_devices_and_huge_files_are_error_rows_not_hangs(tmp_path, checkpoint):
    """A named pipe would block the decode task forever, a link to /dev/zero or a huge file fill its memory."""
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "zeros.png").symlink_to("/dev/zero")
    with open(tmp_path / "huge.png", "wb") as f:  # sparse: takes no disk
        f.truncate((1 << 30) + 1)
    names = ["pipe.png", "zeros.png", "huge.png"]
    units = pa.table({"kind": ["images"], "uris": [[str(tmp_path / n).encode() for n in names]],
                      "skip": pa.array([[]], pa.list_(pa.string()))})
    rows = [(Path(p).name, e) for b in decode_sources(units, load_checkpoint(checkpoint).model_config, rows=8)
            for p, e in zip(b["path"], b["error"])]
    assert [(n, error_kind(e)) for n, e in rows] == [(n, "permanent") for n in names]
    assert "not a regular file" in rows[0][1] and "not a regular file" in rows[1][1]
    assert "file of 1,073,741,825 bytes is too large to score" in rows[2][1]
    os.mkfifo(tmp_path / "pipe.tar")
    units = pa.table({"kind": ["tar"], "uris": [[str(tmp_path / "pipe.tar").encode()]],
                      "skip": pa.array([[]], pa.list_(pa.string()))})
    [batch] = decode_sources(units, load_checkpoint(checkpoint).model_config, rows=8)
    assert list(batch["member"]) == [""] and "pipe.tar: not a regular file" in batch["error"][0]
