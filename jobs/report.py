"""One self-contained HTML page that summarises a scoring run.

Input is the Parquet dataset the scoring job writes (a directory of .parquet files, local or s3://),
one row per input image: path, member (name inside a tar shard, or null), image_score, is_anomaly,
heatmap_png (8-bit grayscale PNG at model resolution, 0 = calibrated vmin, 255 = vmax), width, height,
checkpoint, error. The files' schema metadata may carry b"ssm": {"threshold", "heatmap_vmin",
"heatmap_vmax", "img_size", "checkpoint"}.

The page shows the counts, a score histogram split at the threshold, the `top` highest-scoring images
with their heatmaps overlaid, and the rows that failed. Every image is inlined as a data: URI, so the
file can be mailed or opened offline. Only the shown rows' heatmaps are read: a first pass reads the
small columns of every row, a second pass reads `heatmap_png` from just the row groups that hold the
top rows, a few hundred rows at a time.

Example (also: python -m jobs.report SCORES OUT.html --top 24):

    counts = write_report("s3://bucket/scores/", "report.html", top=24)
    print(counts["anomalies"], "anomalies,", counts["errors"], "errors")
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import posixpath
import tarfile
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from jobs.score_output import is_part

# Everything but heatmap_png: these are small, so reading them for 100k rows is cheap.
ROW_COLUMNS = ("path", "member", "image_score", "is_anomaly", "width", "height", "checkpoint", "error")
MAX_ERROR_ROWS = 1000  # the table lists this many, then says how many more there are
_HEATMAP_BATCH = 256  # rows of heatmap_png decoded at once while looking for the shown rows


def _jet_lut() -> np.ndarray:
    """256x3 uint8 jet colour map: dark blue (vmin) -> cyan -> yellow -> dark red (vmax)."""
    x = np.linspace(0.0, 1.0, 256)[:, None]
    centres = np.array([3.0, 2.0, 1.0])  # red, green, blue peaks on the 4x scale
    return (np.clip(1.5 - np.abs(4.0 * x - centres), 0.0, 1.0) * 255).round().astype(np.uint8)


JET = _jet_lut()
NORMAL_COLOUR, ANOMALY_COLOUR = "#4c78a8", "#e4572e"


@dataclass
class Card:
    rank: int
    path: str
    member: str | None
    score: float
    is_anomaly: bool | None
    width: int | None
    height: int | None
    heatmap_png: bytes | None = None


def write_report(scores: str, out: str, top: int = 24) -> dict:
    """Write the HTML report for the scoring output `scores` to `out`; return the counts.

    Returns {"images", "scored", "errors", "anomalies", "shown", "threshold"}; threshold is None when
    the files carry no b"ssm" metadata.
    """
    fs, root = fsspec.core.url_to_fs(scores)
    files = _parquet_files(fs, root, scores)
    rows, meta = _read_rows(fs, files)

    score = pc.fill_null(rows["image_score"].cast(pa.float64()), float("nan")).to_numpy()
    scored = np.isfinite(score)
    n_errors, errors = _error_rows(rows)
    threshold = meta.get("threshold")
    anomalous = _anomaly_flags(rows, score, threshold)

    # The most anomalous rows, highest score first; ties keep file order.
    order = np.flatnonzero(scored)[np.argsort(-score[scored], kind="stable")][: max(top, 0)]
    picked = rows.take(pa.array(order, pa.int64())).to_pylist()
    cards = [
        Card(rank=i + 1, path=r["path"], member=r.get("member"), score=r["image_score"],
             is_anomaly=r.get("is_anomaly"), width=r.get("width"), height=r.get("height"))
        for i, r in enumerate(picked)
    ]
    wanted = {(r["_file"], r["_row"]): card for r, card in zip(picked, cards)}
    for key, png in _read_heatmaps(fs, files, list(wanted)).items():
        wanted[key].heatmap_png = png

    counts = {
        "images": rows.num_rows,
        "scored": int(scored.sum()),
        "errors": n_errors,
        "anomalies": int(anomalous[scored].sum()),
        "shown": len(cards),
        "threshold": threshold,
    }
    with contextlib.ExitStack() as open_files:
        tars: dict[str, tarfile.TarFile] = {}  # each tar shard is opened once for all its cards
        card_html = "".join(_card_html(card, tars, open_files) for card in cards)
    checkpoint = meta.get("checkpoint") or _first_valid(rows, "checkpoint")
    page = _page(scores, counts, meta, checkpoint, score[scored], anomalous[scored], card_html, errors)

    out_fs, out_path = fsspec.core.url_to_fs(out)
    if "file" in out_fs.protocol and posixpath.dirname(out_path):
        out_fs.makedirs(posixpath.dirname(out_path), exist_ok=True)
    with out_fs.open(out_path, "w", encoding="utf-8") as f:
        f.write(page)
    return counts


# --- reading ------------------------------------------------------------------------------------


def _parquet_files(fs, root: str, scores: str) -> list[str]:
    if fs.isfile(root):
        return [root]
    own = sorted(p for p in fs.ls(root, detail=False) if is_part(p, fs))
    if own:  # the scoring job's output folder: the user's other files there are not read
        return own
    files = sorted(
        p for p in fs.find(root)
        if p.endswith(".parquet") and not posixpath.basename(p).startswith(("_", "."))
    )
    if not files:
        raise FileNotFoundError(
            f"No .parquet files under {scores}: pass the output directory of the scoring job."
        )
    return files


def _read_rows(fs, files: list[str]) -> tuple[pa.Table, dict]:
    """All rows without heatmap_png, plus _file/_row (where each row lives) and the b"ssm" metadata."""
    tables, meta = [], None
    for i, path in enumerate(files):
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            schema = pf.schema_arrow
            if meta is None and b"ssm" in (schema.metadata or {}):
                meta = json.loads(schema.metadata[b"ssm"])
            table = pf.read(columns=[c for c in ROW_COLUMNS if c in schema.names])
        n = table.num_rows
        table = table.append_column("_file", pa.array(np.full(n, i, np.int64)))
        tables.append(table.append_column("_row", pa.array(np.arange(n, dtype=np.int64))))
    rows = pa.concat_tables(tables, promote_options="permissive")
    for name in ROW_COLUMNS:  # a column no file has reads as all-null
        if name not in rows.column_names:
            kind = pa.float64() if name == "image_score" else pa.string()
            rows = rows.append_column(name, pa.nulls(rows.num_rows, kind))
    return rows, meta or {}


def _read_heatmaps(fs, files: list[str], wanted: list[tuple[int, int]]) -> dict:
    """heatmap_png of the (file, row) pairs in `wanted`, reading only the row groups that hold them."""
    found: dict[tuple[int, int], bytes | None] = {}
    by_file: dict[int, set[int]] = {}
    for file_index, row in wanted:
        by_file.setdefault(file_index, set()).add(row)
    for file_index, rows in sorted(by_file.items()):
        with fs.open(files[file_index], "rb") as fh:
            pf = pq.ParquetFile(fh)
            if "heatmap_png" not in pf.schema_arrow.names:
                continue
            start = 0
            for group in range(pf.metadata.num_row_groups):
                stop = start + pf.metadata.row_group(group).num_rows
                if any(start <= r < stop for r in rows):
                    offset = start
                    for batch in pf.iter_batches(
                        batch_size=_HEATMAP_BATCH, row_groups=[group], columns=["heatmap_png"]
                    ):
                        column = batch.column(0)
                        for r in rows:
                            if offset <= r < offset + batch.num_rows:
                                found[(file_index, r)] = column[r - offset].as_py()
                        offset += batch.num_rows
                start = stop
    return found


def _error_rows(rows: pa.Table) -> tuple[int, list[dict]]:
    """How many rows failed, and the first MAX_ERROR_ROWS of them (path, member, error)."""
    has_error = pc.not_equal(pc.fill_null(rows["error"], ""), "")
    failed = rows.filter(has_error)
    listed = failed.slice(0, MAX_ERROR_ROWS).select(["path", "member", "error"])
    return failed.num_rows, listed.to_pylist()


def _anomaly_flags(rows: pa.Table, score: np.ndarray, threshold: float | None) -> np.ndarray:
    """The scorer's is_anomaly where it wrote one, else score >= threshold (else False)."""
    by_threshold = score >= threshold if threshold is not None else np.zeros(len(score), bool)
    flag = rows["is_anomaly"]
    if flag.null_count == len(flag):
        return by_threshold
    known = pc.is_valid(flag).to_numpy(zero_copy_only=False)
    value = pc.fill_null(flag.cast(pa.bool_()), False).to_numpy(zero_copy_only=False)
    return np.where(known, value, by_threshold)


def _first_valid(rows: pa.Table, name: str):
    values = pc.drop_null(rows[name])
    return values[0].as_py() if len(values) else None


def _open_original(
    path: str, member: str | None, tars: dict, open_files: contextlib.ExitStack
) -> Image.Image:
    """The input image, from a plain file or from `member` of the tar archive at `path`."""
    if member:
        if path not in tars:
            fs, local = fsspec.core.url_to_fs(path)
            fileobj = open_files.enter_context(fs.open(local, "rb"))
            tars[path] = open_files.enter_context(tarfile.open(fileobj=fileobj, mode="r:*"))
        extracted = tars[path].extractfile(member)
        if extracted is None:
            raise FileNotFoundError(f"{member} is not a regular file in {path}")
        data = extracted.read()
    else:
        fs, local = fsspec.core.url_to_fs(path)
        data = fs.cat_file(local)
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


# --- images -------------------------------------------------------------------------------------


def colourise(heatmap: np.ndarray) -> np.ndarray:
    """uint8 heatmap (H, W) -> jet-coloured uint8 RGB (H, W, 3)."""
    return JET[heatmap]


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Blend the coloured heatmap over an RGB image of the same size; hotter pixels blend more."""
    alpha = (0.3 + 0.4 * heatmap.astype(np.float32) / 255.0)[..., None]
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colourise(heatmap).astype(np.float32)
    return blended.round().astype(np.uint8)


def _data_uri(array: np.ndarray, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


# --- HTML ---------------------------------------------------------------------------------------

esc = html.escape


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _card_html(card: Card, tars: dict, open_files: contextlib.ExitStack) -> str:
    name = posixpath.basename(card.member or "") or posixpath.basename(card.path.rstrip("/"))
    where = f"{card.path} :: {card.member}" if card.member else card.path
    images, notes = [], []
    heatmap = None
    if card.heatmap_png is not None:
        try:
            heatmap = np.asarray(Image.open(io.BytesIO(card.heatmap_png)).convert("L"))
        except Exception as exc:  # a corrupt heatmap still leaves the card's text useful
            notes.append(f"heatmap not readable: {type(exc).__name__}: {exc}")
    else:
        notes.append("no heatmap stored for this row")
    try:
        original = _open_original(card.path, card.member, tars, open_files)
    except Exception as exc:
        original = None
        notes.append(f"original not readable: {type(exc).__name__}: {exc}")

    if original is not None and heatmap is not None:
        resized = np.asarray(original.resize(heatmap.shape[::-1], Image.Resampling.BILINEAR))
        images.append((_data_uri(overlay(resized, heatmap), "JPEG"), "image with heatmap overlay"))
    elif original is not None:
        images.append((_data_uri(np.asarray(original), "JPEG"), "image"))
    if heatmap is not None:
        images.append((_data_uri(colourise(heatmap)), "heatmap"))

    if card.is_anomaly is None:
        badge = '<span class="badge unknown">unflagged</span>'
    elif card.is_anomaly:
        badge = '<span class="badge anomaly">anomaly</span>'
    else:
        badge = '<span class="badge normal">normal</span>'
    size = f"{card.width}&times;{card.height} px" if card.width and card.height else ""
    imgs = "".join(f'<img src="{uri}" alt="{esc(alt)}" title="{esc(alt)}">' for uri, alt in images)
    note_html = "".join(f'<div class="note">{esc(n[:300])}</div>' for n in notes)
    css = "card anomalous" if card.is_anomaly else "card"
    return (
        f'<figure class="{css}"><div class="pair">{imgs}</div>{note_html}'
        f'<figcaption><div class="row"><span class="rank">#{card.rank}</span>{badge}'
        f'<span class="score">{_fmt(card.score)}</span></div>'
        f'<div class="name" title="{esc(where)}">{esc(name)}</div>'
        f'<div class="sub">{size}</div></figcaption></figure>'
    )


def _nice_ticks(lo: float, hi: float, target: int = 6) -> tuple[np.ndarray, int]:
    """Round tick values (1, 2 or 5 times a power of ten) inside [lo, hi], and the decimals to print."""
    raw = (hi - lo) / target
    power = 10.0 ** np.floor(np.log10(raw))
    step = power * min((m for m in (1, 2, 5, 10) if m * power >= raw), default=10)
    ticks = np.arange(np.ceil(lo / step), np.floor(hi / step) + 1) * step + 0.0  # + 0.0: no '-0'
    return ticks, max(0, int(-np.floor(np.log10(step))))


def _histogram_svg(
    scores: np.ndarray, anomalous: np.ndarray, threshold: float | None, bins: int = 40
) -> str:
    """Stacked histogram (normal below, anomalous above) with the threshold as a dashed line.

    Heavy-tailed runs (the usual case: many normal images, a thin anomalous tail) switch the count
    axis to a log scale so the tail stays visible.
    """
    if scores.size == 0:
        return '<p class="muted">No scored images.</p>'
    width, height, left, right, top, bottom = 880, 250, 56, 24, 28, 42
    lo, hi = float(scores.min()), float(scores.max())
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi <= lo:
        hi = lo + max(abs(lo) * 0.01, 1e-6)
    edges = np.linspace(lo, hi, bins + 1)
    normal_counts, _ = np.histogram(scores[~anomalous], edges)
    anomaly_counts, _ = np.histogram(scores[anomalous], edges)
    totals = normal_counts + anomaly_counts
    ymax = max(int(totals.max()), 1)
    log_scale = ymax > 50 * max(int(totals[totals > 0].min()), 1)
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * plot_w

    def y(count: float) -> float:
        share = np.log10(1 + count) / np.log10(1 + ymax) if log_scale else count / ymax
        return top + plot_h - share * plot_h

    parts = [f'<svg class="hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="score histogram">']
    for i in range(bins):
        x0, x1 = x(edges[i]) + 0.5, x(edges[i + 1]) - 0.5
        tip = (f"{_fmt(edges[i])} to {_fmt(edges[i + 1])}: "
               f"{normal_counts[i]} normal, {anomaly_counts[i]} anomalous")
        base = 0
        for count, colour in ((normal_counts[i], NORMAL_COLOUR), (anomaly_counts[i], ANOMALY_COLOUR)):
            if count:
                parts.append(
                    f'<rect x="{x0:.1f}" y="{y(base + count):.1f}" width="{max(x1 - x0, 0.5):.1f}" '
                    f'height="{y(base) - y(base + count):.1f}" fill="{colour}"><title>{esc(tip)}</title></rect>'
                )
                base += count
    axis_y = top + plot_h
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{width - right}" y2="{axis_y}" stroke="#333"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{axis_y}" stroke="#333"/>')
    ticks, decimals = _nice_ticks(lo, hi)
    for v in ticks:
        parts.append(f'<line x1="{x(v):.1f}" y1="{axis_y}" x2="{x(v):.1f}" y2="{axis_y + 5}" stroke="#333"/>'
                     f'<text x="{x(v):.1f}" y="{axis_y + 18}" text-anchor="middle">{v:.{decimals}f}</text>')
    count_ticks = [10**k for k in range(int(np.log10(ymax)) + 1)] if log_scale else [0, ymax]
    for count in count_ticks:
        parts.append(f'<text x="{left - 6}" y="{y(count) + 4:.1f}" text-anchor="end">{count:,}</text>')
    axis_label = "image score" + ("  (counts on a log scale)" if log_scale else "")
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">{axis_label}</text>')
    if threshold is not None:
        tx = x(threshold)
        parts.append(f'<line x1="{tx:.1f}" y1="{top - 8}" x2="{tx:.1f}" y2="{axis_y}" stroke="#111" '
                     'stroke-width="2" stroke-dasharray="5 3"/>')
        anchor, dx = ("end", -4) if tx > left + plot_w * 0.7 else ("start", 4)
        parts.append(f'<text x="{tx + dx:.1f}" y="{top - 2}" text-anchor="{anchor}" '
                     f'font-weight="bold">threshold {_fmt(threshold)}</text>')
    for i, (label, colour) in enumerate((("normal", NORMAL_COLOUR), ("anomalous", ANOMALY_COLOUR))):
        lx = width - right - 200 + i * 100
        parts.append(f'<rect x="{lx}" y="4" width="12" height="12" fill="{colour}"/>'
                     f'<text x="{lx + 16}" y="14">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _colourbar_svg(vmin, vmax) -> str:
    colours = [JET[round(i * 255 / 8)] for i in range(9)]
    stops = "".join(
        f'<stop offset="{i / 8:.3f}" stop-color="rgb({r},{g},{b})"/>' for i, (r, g, b) in enumerate(colours)
    )
    return (
        '<svg class="cbar" width="320" height="34" xmlns="http://www.w3.org/2000/svg">'
        f'<defs><linearGradient id="jet">{stops}</linearGradient></defs>'
        '<rect x="10" y="2" width="300" height="14" fill="url(#jet)"/>'
        f'<text x="10" y="30">{esc(_fmt(vmin))}</text>'
        f'<text x="310" y="30" text-anchor="end">{esc(_fmt(vmax))}</text></svg>'
    )


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px 32px;color:#1d1d1f;background:#fafafa}
h1{margin:0 0 4px;font-size:24px} h2{margin:28px 0 10px;font-size:18px}
.meta{color:#555;margin:2px 0} code{background:#eee;padding:1px 4px;border-radius:3px;word-break:break-all}
.stats{display:flex;gap:12px;margin:16px 0}
.stat{background:#fff;border:1px solid #ddd;border-radius:8px;padding:10px 18px;min-width:120px}
.stat b{display:block;font-size:26px} .stat.alert b{color:#c0392b}
.hist text,.cbar text{font-size:12px;fill:#333} .cbar{vertical-align:middle}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
.card{margin:0;background:#fff;border:1px solid #ddd;border-radius:8px;padding:8px}
.card.anomalous{border-color:#e4572e;box-shadow:0 0 0 1px #e4572e inset}
.pair{display:flex;gap:6px} .pair img{width:calc(50% - 3px);aspect-ratio:1;object-fit:contain;background:#222;border-radius:4px}
figcaption{margin-top:6px} .row{display:flex;gap:8px;align-items:center}
.rank{color:#777} .score{margin-left:auto;font-weight:bold;font-variant-numeric:tabular-nums}
.badge{border-radius:10px;padding:0 8px;font-size:12px;color:#fff}
.badge.anomaly{background:#c0392b} .badge.normal{background:#2e7d32} .badge.unknown{background:#888}
.name{font-family:ui-monospace,monospace;font-size:12px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.sub,.muted{color:#777;font-size:12px} .note{color:#8a4b00;background:#fff4e0;font-size:12px;padding:4px;margin-top:4px;border-radius:4px}
table{border-collapse:collapse;background:#fff} td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
td{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
"""


def _page(scores, counts, meta, checkpoint, scored, anomalous, card_html, errors) -> str:
    threshold = counts["threshold"]

    meta_lines = [f"scores: <code>{esc(scores)}</code>"]
    if checkpoint:
        meta_lines.append(f"checkpoint: <code>{esc(str(checkpoint))}</code>")
    if meta.get("img_size"):
        meta_lines.append(f"model resolution: {esc(str(meta['img_size']))} px")
    if not meta:
        meta_lines.append('no calibration metadata (b"ssm") in the files: threshold and heatmap scale unknown')
    anomaly_label = "flagged anomalies" if threshold is None else f"anomalies (threshold {esc(_fmt(threshold))})"
    stats = "".join(
        f'<div class="stat{cls}"><b>{value:,}</b>{label}</div>'
        for value, label, cls in (
            (counts["images"], "images", ""),
            (counts["scored"], "scored", ""),
            (counts["errors"], "errors", " alert" if counts["errors"] else ""),
            (counts["anomalies"], anomaly_label, " alert" if counts["anomalies"] else ""),
        )
    )
    if "heatmap_vmin" in meta and "heatmap_vmax" in meta:
        colourbar = _colourbar_svg(meta["heatmap_vmin"], meta["heatmap_vmax"])
        scale = f"Heatmap colours use one fixed scale for every image: {colourbar}"
    else:
        scale = f"Heatmap colours, from low to high anomaly: {_colourbar_svg(None, None)}"
    if errors:
        body = "".join(
            f"<tr><td>{esc(r['path'] or '')}</td><td>{esc(r['member'] or '')}</td><td>{esc(r['error'])}</td></tr>"
            for r in errors
        )
        hidden = counts["errors"] - len(errors)
        more = f'<p class="muted">and {hidden:,} more.</p>' if hidden else ""
        error_html = f"<table><tr><th>path</th><th>member</th><th>error</th></tr>{body}</table>{more}"
    else:
        error_html = '<p class="muted">No errors.</p>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>SSM anomaly report</title><style>{_CSS}</style></head>
<body>
<h1>SSM anomaly report</h1>
{"".join(f'<p class="meta">{line}</p>' for line in meta_lines)}
<div class="stats">{stats}</div>
<h2>Score distribution</h2>
{_histogram_svg(scored, anomalous, threshold)}
<h2>Top {counts["shown"]} most anomalous</h2>
<p class="meta">{scale}</p>
<div class="grid">{card_html or '<p class="muted">No scored images.</p>'}</div>
<h2>Errors ({counts["errors"]:,})</h2>
{error_html}
</body></html>
"""


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write an HTML report for a scoring output.")
    parser.add_argument("scores", help="directory (or s3:// prefix) of the scoring job's Parquet files")
    parser.add_argument("out", help="HTML file to write")
    parser.add_argument("--top", type=int, default=24, help="how many of the highest scores to show")
    args = parser.parse_args()
    print(json.dumps(write_report(args.scores, args.out, args.top)))
