"""How long does `ssm score` take to plan a very large manifest, and how much memory does the driver need?

For each size N it writes, into a temporary folder (removed at the end), a manifest of N image paths (files
that do not exist: planning never opens an input) and an OUT holding N/2 of them already, as the job writes it:
part-<run>-<digest>.parquet files of 4096 rows with the b"ssm" metadata and jobs/score_output.SCHEMA, 1% of
them transient error rows (so a rerun retries them). Then a fresh Python process plans the rerun, exactly as
jobs/score.score does before any scoring (list the inputs, read OUT, plan the units), and reports its time
and its peak resident memory (ru_maxrss: the whole driver process, imports included).

    python benchmarks/plan_scale.py                           # 1M and 10M, each with and without --no-manifest-stat
    python benchmarks/plan_scale.py --sizes 1000000 --old     # plus the planner before columns, at the first size

--old also plans with the planner of commit --old-rev (every key a Python object), taken from git into a
temporary copy of the package; the ratios printed are old / new at the same size. The last line printed is
one JSON object: one entry per run (planner, manifest_stat, inputs, done, units, plan_s, driver_peak_rss_mb,
import_rss_mb), and the old / new ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS_PER_FILE = 4096  # the job's default rows per Parquet file


def _paths(start: int, stop: int) -> list[str]:
    return [f"/data/ssm-plan-scale/class_{i // 10_000:04d}/img_{i:08d}.png" for i in range(start, stop)]


def generate(folder: Path, n: int) -> tuple[str, str]:
    """A manifest of n paths and an OUT holding every other one of them; returns (manifest, out)."""
    import numpy as np
    import pyarrow as pa

    from jobs.score_output import METADATA_KEY, SCHEMA, error_kind, part_name, write_part

    manifest, out = folder / f"list-{n}.txt", folder / f"out-{n}"
    step = 1 << 20
    with open(manifest, "w") as f:
        for start in range(0, n, step):
            f.write("\n".join(_paths(start, min(n, start + step))) + "\n")
    metadata = {METADATA_KEY: json.dumps({"threshold": 0.5, "heatmap_vmin": 0.0, "heatmap_vmax": 1.0, "img_size": 256,
                                          "tiled": False, "scale": 1.0, "heatmap_max_side": 1024,
                                          "precision": "float32", "checkpoint": "plan-scale"}).encode()}
    rng = np.random.default_rng(0)
    done = np.arange(0, n, 2)
    rng.shuffle(done)  # a run writes its rows in the order its tasks finish
    run = "20260101000000-000000"
    transient = "cannot be read (OSError: storage timeout); check that it exists."
    for start in range(0, len(done), ROWS_PER_FILE):
        rows = done[start : start + ROWS_PER_FILE]
        paths = [f"/data/ssm-plan-scale/class_{i // 10_000:04d}/img_{i:08d}.png" for i in rows]
        failed = rng.random(len(rows)) < 0.01
        scores = rng.random(len(rows))
        errors = [transient if e else None for e in failed]
        table = pa.table({
            "path": pa.array(paths, pa.string()),
            "member": pa.nulls(len(rows), pa.string()),
            "image_score": pa.array(scores, pa.float64(), mask=failed),
            "is_anomaly": pa.array(scores >= 0.5, pa.bool_(), mask=failed),
            "heatmap_png": pa.nulls(len(rows), pa.binary()),
            "width": pa.array(np.full(len(rows), 900), pa.int32(), mask=failed),
            "height": pa.array(np.full(len(rows), 900), pa.int32(), mask=failed),
            "frames": pa.array(np.ones(len(rows)), pa.int32(), mask=failed),
            "checkpoint": pa.array(["plan-scale"] * len(rows), pa.string()),
            "error": pa.array(errors, pa.string()),
            "error_kind": pa.array([error_kind(e) for e in errors], pa.string()),
        }, schema=SCHEMA).replace_schema_metadata(metadata)
        write_part(str(out), part_name(run, paths, [None] * len(paths)), table)
    return str(manifest), str(out)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def plan_here(manifest: str, out: str, planner: str, manifest_stat: bool) -> dict:
    """Plans in this process as jobs/score.score does (new) or did (old); the caller is a fresh process."""
    import jobs.score  # noqa: F401  (the driver's imports, torch and Ray included, count in its memory)

    imported = _peak_mb()
    t0 = time.perf_counter()
    if planner == "new":
        from jobs.score_output import read_output
        from jobs.score_plan import list_sources, plan_units

        sources = list_sources([manifest], manifest_stat=manifest_stat)
        inputs = len(sources)
        plan = plan_units(sources, read_output(out))
        units, done, retried = plan.units.num_rows, plan.skipped, plan.retried.num_rows
    else:
        from jobs.score import _plan_units, list_sources, read_output

        sources = list_sources([manifest])
        inputs = len(sources)
        state = read_output(out)
        listed = {s.key for s in sources}
        retry = {key for key in state.to_retry(False) if key[0] in listed}
        units, done = _plan_units(sources, set(state.latest()) - retry)
        units, retried = len(units), len(retry)
    return {"planner": planner, "manifest_stat": manifest_stat, "inputs": inputs, "done": done, "retried": retried,
            "units": units, "plan_s": round(time.perf_counter() - t0, 1), "driver_peak_rss_mb": round(_peak_mb()),
            "import_rss_mb": round(imported)}


def _old_tree(folder: Path, rev: str) -> Path:
    """The package at `rev`, from git, with today's ssm/ (the planner only needs its data helpers)."""
    tree = folder / "old"
    (tree / "jobs").mkdir(parents=True)
    for name in ("__init__.py", "score.py", "score_output.py", "storage.py"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:jobs/{name}"], check=True,
                              capture_output=True, text=True).stdout
        (tree / "jobs" / name).write_text(text)
    os.symlink(ROOT / "ssm", tree / "ssm")
    return tree


def run_fresh(manifest: str, out: str, planner: str, manifest_stat: bool, tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
            f"from plan_scale import plan_here; sys.path.insert(0, {str(tree)!r}); "
            f"print(json.dumps(plan_here({manifest!r}, {out!r}, {planner!r}, {manifest_stat!r})))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tree)
    if done.returncode:
        raise RuntimeError(f"the {planner} planner failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--old", action="store_true", help="also plan with the old planner at the first size")
    parser.add_argument("--old-rev", default="618ac10", help="the commit of the old planner")
    parser.add_argument("--stat-only", action="store_true", help="skip the --no-manifest-stat runs")
    parser.add_argument("--work", default=None, help="folder for the temporary data (default: the system's)")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="ssm-plan-scale-", dir=args.work))
    runs = []
    try:
        old = _old_tree(folder, args.old_rev) if args.old else None
        for i, n in enumerate(args.sizes):
            t0 = time.perf_counter()
            manifest, out = generate(folder, n)
            print(f"{n:,} inputs: data written in {time.perf_counter() - t0:.0f} s", flush=True)
            for stat in (True,) if args.stat_only else (True, False):
                runs.append(run_fresh(manifest, out, "new", stat, ROOT))
                print(json.dumps(runs[-1]), flush=True)
            if old is not None and i == 0:
                runs.append(run_fresh(manifest, out, "old", True, old))
                print(json.dumps(runs[-1]), flush=True)
            os.remove(manifest)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ratios = {}
    for r in runs:
        if r["planner"] == "old":
            new = next(x for x in runs if x["planner"] == "new" and x["inputs"] == r["inputs"] and x["manifest_stat"])
            ratios[str(r["inputs"])] = {
                "plan_s_old_over_new": round(r["plan_s"] / max(new["plan_s"], 1e-9), 2),
                "rss_old_over_new": round(r["driver_peak_rss_mb"] / new["driver_peak_rss_mb"], 2)}
    print(json.dumps({"runs": runs, "old_over_new": ratios, "load_average": os.getloadavg()[0],
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
