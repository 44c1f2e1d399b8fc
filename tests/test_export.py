"""ssm export: ONNX run by onnxruntime and TorchScript run by torch give the PyTorch scorer's heatmaps and image
scores on real MVTec AD bottle images, through the whole progressive refinement (and tiling); the metadata
round-trips; `ssm score --backend onnxruntime` writes the scores `--backend torch` writes; bad requests fail
in one line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from jobs.score import METADATA_KEY
from ssm.calibration import calibrate
from ssm.checkpoint import load_checkpoint, save_checkpoint
from ssm.data import decode_for
from ssm.export import EXTRA_FILE, ONNX_OPSET, ExportError, export_checkpoint, load_exported
from ssm.model import ModelConfig, SSMUNet
from ssm.scoring import Scorer, ScoringConfig

BOTTLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_bottle"
pytestmark = pytest.mark.skipif(not BOTTLE.is_dir(), reason=f"shared dataset {BOTTLE} is not present here")

# The tolerance the README states. Measured on these images: heatmaps differ by at most 9e-8 (ONNX) and
# 3e-8 (TorchScript), on heatmaps reaching 0.34; image scores were equal (tiled: heatmaps 3e-8, image scores
# 2.9e-6 on scores up to 4.8 in size). Float32 rounding only: the
# refinement's cell decisions (heatmap < tau) came out the same, as they do unless a cell sits within
# rounding of tau.
HEATMAP_ATOL = 1e-5
SCORE_TOL = {"rel": 1e-5, "abs": 1e-5}
SIZE = 64


def _bottle(n_train: int = 0, test: int = 0) -> tuple[list[str], list[str]]:
    train = sorted(str(p) for p in (BOTTLE / "train" / "good").glob("*.png"))[:n_train]
    tests = sorted(str(p) for p in (BOTTLE / "test").glob("*/*.png"))
    return train, tests[:: max(1, len(tests) // test)][:test] if test else []


def _pixels(paths: list[str], cfg: ModelConfig) -> list[torch.Tensor]:
    return [torch.from_numpy(decode_for(p, cfg)[0]) for p in paths]


def _checkpoint(out: Path, cfg: ModelConfig) -> str:
    """A tiny model with batch-norm statistics from real images (folding them into the convolutions is part
    of what is exported), calibrated on other real normal images."""
    torch.manual_seed(0)
    model = SSMUNet(cfg)
    train, _ = _bottle(n_train=8)
    crop = cfg.img_size
    x = torch.stack([t[:, :crop, :crop] for t in _pixels(train[:4], cfg)])
    masks = (torch.rand(len(x), 1, crop, crop) > 0.5).float()
    with torch.no_grad():
        model.train()(x * masks, masks)
    model.eval()
    scoring = ScoringConfig()
    cal_images = _pixels(train[4:], cfg)
    cal = calibrate(Scorer(model, scoring), [torch.stack(cal_images)] if not cfg.tiled else [cal_images],
                    min_images=2)
    return str(save_checkpoint(out / "run" / "best", model, cfg, scoring, cal))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("export"), ModelConfig(width=4, img_size=SIZE))


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    return {fmt: export_checkpoint(checkpoint, fmt, folder / name) for fmt, name in
            (("onnx", "model.onnx"), ("torchscript", "model.pt"))}


def _assert_same_scores(ref, out) -> None:
    assert out.passes == ref.passes  # the same images ran each refinement pass
    for a, b in zip(out.heatmaps, ref.heatmaps):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= HEATMAP_ATOL
    assert out.image_scores.tolist() == pytest.approx(ref.image_scores.tolist(), **SCORE_TOL)


def test_exported_files_score_like_the_torch_scorer_on_real_images(checkpoint, exported):
    ckpt = load_checkpoint(checkpoint)
    _, tests = _bottle(test=6)
    images = _pixels(tests, ckpt.model_config)
    ref = ckpt.scorer().score_images(images)
    assert len(ref.passes) == 2 and ref.passes[1] > 0  # refinement ran: the comparison covers it
    for fmt, result in exported.items():
        assert result.max_abs_diff <= HEATMAP_ATOL
        model = load_exported(result.path)
        scorer = model.scorer()
        assert scorer.backend == {"onnx": "onnxruntime", "torchscript": "torchscript"}[fmt]
        _assert_same_scores(ref, scorer.score_images(images))


def test_tiled_model_through_onnxruntime_stitches_the_same_heatmaps(tmp_path):
    cfg = ModelConfig(width=4, img_size=32, tiled=True, scale=0.25)  # bottle 256 px -> 64 px: overlapping 32 px tiles
    ckpt = load_checkpoint(_checkpoint(tmp_path, cfg))
    result = export_checkpoint(ckpt, "onnx", tmp_path / "tiled.onnx")
    _, tests = _bottle(test=3)
    images = _pixels(tests, cfg)
    assert images[0].shape[-1] > cfg.img_size
    model = load_exported(result.path)
    assert model.metadata["tiling"] == {"tile": 32, "scale": 0.25, "overlap": ckpt.scoring.tile_overlap}
    _assert_same_scores(ckpt.scorer().score_images(images), model.scorer().score_images(images))


def test_onnx_graph_has_a_dynamic_batch_and_the_trained_size(exported, checkpoint):
    path = exported["onnx"].path
    graph = onnx.load(str(path)).graph
    assert onnx.load(str(path)).opset_import[0].version == ONNX_OPSET
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    assert dims == {"masked_images": ["N", 3, SIZE, SIZE], "masks": ["N", 1, SIZE, SIZE],
                    "reconstruction": ["N", 3, SIZE, SIZE]}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    net = load_checkpoint(checkpoint).build_model().eval()
    for n in (1, 5):
        m = (torch.rand(n, 1, SIZE, SIZE) > 0.5).float()
        x = torch.rand(n, 3, SIZE, SIZE) * m
        (recon,) = session.run(None, {"masked_images": x.numpy(), "masks": m.numpy()})
        with torch.no_grad():
            expected = net(x, m)[0].numpy()
        assert recon.shape == (n, 3, SIZE, SIZE)
        assert np.abs(recon - expected).max() <= HEATMAP_ATOL


def test_metadata_round_trip(checkpoint, exported):
    ckpt = load_checkpoint(checkpoint)
    description = json.loads((Path(checkpoint) / "ssm.json").read_text())
    raw = {
        "onnx": {p.key: p.value for p in onnx.load(str(exported["onnx"].path)).metadata_props}["ssm"],
        "torchscript": _torchscript_extra(exported["torchscript"].path),
    }
    for fmt, result in exported.items():
        doc = json.loads(raw[fmt])
        assert doc["checkpoint"] == ckpt.id == result.checkpoint
        for section in ("model", "scoring", "calibration"):  # as ssm.json has them: the id still names them
            assert doc[section] == description[section]
        assert doc["tiling"] is None
        model = load_exported(result.path)
        assert (model.format, model.id, model.metadata) == (fmt, ckpt.id, doc)
        assert model.model_config == ckpt.model_config
        assert model.scoring.to_dict() == ckpt.scoring.to_dict()
        assert model.calibration == ckpt.calibration
        assert model.calibration.threshold == description["calibration"]["threshold"]


def _torchscript_extra(path) -> str:
    extra = {EXTRA_FILE: ""}
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, still the way to load it
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), _extra_files=extra)
    return extra[EXTRA_FILE].decode()


def test_score_backend_onnxruntime_writes_the_torch_backend_scores(tmp_path, checkpoint, exported, ray_local):
    _, tests = _bottle(test=5)
    runner = CliRunner()
    scores, metadata = {}, {}
    for backend, model in (("torch", checkpoint), ("onnxruntime", str(exported["onnx"].path))):
        out = tmp_path / backend
        result = runner.invoke(app, ["score", *tests, "--checkpoint", model, "--out", str(out),
                                     "--backend", backend, "--batch-size", "2"])
        assert result.exit_code == 0, result.output
        assert "scored 5 images, 0 errors" in result.output
        table = pq.read_table(next(out.glob("part-*.parquet")))
        assert table.num_rows == 5
        metadata[backend] = json.loads(table.schema.metadata[METADATA_KEY])
        scores[backend] = dict(zip(table["path"].to_pylist(), table["image_score"].to_pylist()))
        assert set(table["checkpoint"].to_pylist()) == {load_checkpoint(checkpoint).id}
    assert metadata["torch"]["backend"] == "torch" and metadata["onnxruntime"]["backend"] == "onnxruntime"
    assert {k: v for k, v in metadata["torch"].items() if k != "backend"} == \
           {k: v for k, v in metadata["onnxruntime"].items() if k != "backend"}
    assert set(scores["torch"]) == set(scores["onnxruntime"]) == set(tests)
    for path, s in scores["torch"].items():
        assert scores["onnxruntime"][path] == pytest.approx(s, **SCORE_TOL)

    # One output holds one backend's scores: resuming with the other is refused before any work.
    result = runner.invoke(app, ["score", *tests, "--checkpoint", str(exported["onnx"].path),
                                 "--out", str(tmp_path / "torch"), "--backend", "onnxruntime"])
    assert result.exit_code == 2
    assert "already holds scores computed with --backend torch" in result.output


def test_bad_requests_fail_in_one_line(tmp_path, checkpoint, exported):
    runner = CliRunner()

    def fails(args: list[str], *expected: str) -> None:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        for text in expected:
            assert text in result.output, result.output

    fails(["export", checkpoint, "--format", "tflite", "--out", str(tmp_path / "m.tflite")], "--format", "tflite")
    fails(["export", str(tmp_path / "missing"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
          f"checkpoint {tmp_path / 'missing'} does not exist")
    fails(["export", checkpoint, "--format", "onnx", "--out", str(tmp_path / "m.pt")], "--out", "*.onnx")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.pt").exists()

    images = _bottle(test=1)[1]
    score = ["score", *images, "--out", str(tmp_path / "scores"), "--checkpoint"]
    fails([*score, checkpoint, "--backend", "onnxruntime"], "is a folder", "ssm export")
    fails([*score, str(exported["torchscript"].path), "--backend", "onnxruntime"], "is a torchscript file")
    fails([*score, str(exported["onnx"].path)], "is a file", "--backend onnxruntime")
    fails([*score, str(exported["onnx"].path), "--backend", "onnxruntime", "--bf16"], "drop --bf16")
    fails([*score, str(exported["onnx"].path), "--backend", "tensorrt"], "--backend")
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a model\n")
    fails([*score, str(not_onnx), "--backend", "onnxruntime"], str(not_onnx), "neither an ONNX model")

    # An uncalibrated checkpoint exports (with a warning), and scoring the file says what to export instead.
    cfg = ModelConfig(width=4, img_size=32)
    raw = save_checkpoint(tmp_path / "raw" / "best", SSMUNet(cfg).eval(), cfg, ScoringConfig())
    result = runner.invoke(app, ["export", str(raw), "--format", "onnx", "--out", str(tmp_path / "raw.onnx")])
    assert result.exit_code == 0 and "is not calibrated" in result.output, result.output
    fails([*score, str(tmp_path / "raw.onnx"), "--backend", "onnxruntime"], "exported from a checkpoint that is "
          "not calibrated", "export the best checkpoint")

    # A torch state_dict (a zip like TorchScript) and an ONNX file without ssm metadata
    with pytest.raises(ExportError, match="not a TorchScript model"):
        load_exported(Path(checkpoint) / "model.pt")
    bare = onnx.load(str(exported["onnx"].path))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ExportError, match="without ssm metadata"):
        load_exported(tmp_path / "bare.onnx")


def test_export_reads_and_writes_s3(tmp_path, checkpoint, s3_server, monkeypatch):
    """`ssm export s3://.../run --out s3://.../model.onnx` downloads the checkpoint and uploads the file (a Path
    would have made a local folder named "s3:"), and names --out by its URI when refusing it."""
    monkeypatch.setenv("SSM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    bucket = s3_server.make_bucket()
    s3 = s3_server.client()
    for f in Path(checkpoint).iterdir():
        s3.upload_file(str(f), bucket, f"runs/bottle/best/{f.name}")
    runner = CliRunner()
    out = f"s3://{bucket}/exports/bottle.onnx"
    result = runner.invoke(app, ["export", f"s3://{bucket}/runs/bottle", "--format", "onnx", "--out", out])
    assert result.exit_code == 0, result.output
    assert f"as onnx: {out}" in result.output
    assert not (tmp_path / "s3:").exists()
    s3.download_file(bucket, "exports/bottle.onnx", str(tmp_path / "bottle.onnx"))
    # the same weights and rules (the name before @ is the download cache's folder, as for `ssm score`)
    assert load_exported(tmp_path / "bottle.onnx").id.split("@")[1] == load_checkpoint(checkpoint).id.split("@")[1]

    result = runner.invoke(app, ["export", checkpoint, "--format", "onnx", "--out", f"s3://{bucket}/m.pt"])
    assert result.exit_code == 2 and f"--out s3://{bucket}/m.pt: a onnx file is named *.onnx" in result.output
    assert s3_server.list_keys(bucket, "m.") == []
    result = runner.invoke(app, ["export", checkpoint, "--format", "onnx", "--out", "s3://no-such-bucket/m.onnx"])
    assert result.exit_code == 2 and "--out s3://no-such-bucket/m.onnx: cannot upload" in result.output
    with pytest.raises(ExportError, match="writes a local file"):
        export_checkpoint(checkpoint, "onnx", out)
