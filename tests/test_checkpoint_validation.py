"""A damaged or hand-edited checkpoint is refused with one line naming the file and the key, before any Ray
work; an unreachable storage endpoint fails within seconds."""

import json
import socket
import time

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from ssm.calibration import Calibration
from ssm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ssm.model import ModelConfig, SSMUNet
from ssm.scoring import ScoringConfig

CFG = ModelConfig(width=4, img_size=32)
CAL = Calibration(tau=0.1, max_loc=0.2, max_scale=0.05, mse_loc=0.01, mse_scale=0.002, threshold=2.5,
                  heatmap_vmin=0.0, heatmap_vmax=0.4, n_images=10)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "ck", SSMUNet(CFG), CFG, ScoringConfig(), CAL, {"epoch": 1})


def _edit_json(ck, change):
    doc = json.loads((ck / "ssm.json").read_text())
    change(doc)
    (ck / "ssm.json").write_text(json.dumps(doc))


def _set(section, key, value):
    return lambda doc: doc[section].__setitem__(key, value)


def _weights_from(cfg):
    return lambda ck: torch.save(SSMUNet(cfg).state_dict(), ck / "model.pt")


def _nan_weights(ck):
    state = torch.load(ck / "model.pt", weights_only=True)
    state["head.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, ck / "model.pt")


def _extra_weight(ck):
    state = torch.load(ck / "model.pt", weights_only=True)
    torch.save({**state, "extra.weight": torch.zeros(3)}, ck / "model.pt")


# (how the checkpoint is damaged, what the one line must say besides the file)
JSON_CASES = {
    "width_changed": (_set("model", "width", 8), "encoder.0.0.0.weight has shape (4, 3, 3, 3)"),
    "channels_changed": (_set("model", "channels", 1), "has shape"),
    "upsample_changed": (_set("model", "upsample", "transpose"), "no weights for decoder.0.up.weight"),
    "unknown_model_key": (_set("model", "depth", 5), "unknown key model.depth"),
    "unknown_top_key": (lambda d: d.__setitem__("extra", 1), "unknown key 'extra'"),
    "missing_key": (lambda d: d["model"].pop("width"), "model.width is missing"),
    "missing_model": (lambda d: d.pop("model"), "'model' is missing"),
    "absurd_img_size": (_set("model", "img_size", 1048576), "model.img_size is 1048576; expected a multiple of 16"),
    "img_size_not_multiple": (_set("model", "img_size", 100), "model.img_size is 100"),
    "width_as_text": (_set("model", "width", "4"), 'model.width is "4"; expected a whole number'),
    "width_fractional": (_set("model", "width", 4.5), "model.width is 4.5"),
    "width_zero": (_set("model", "width", 0), "model.width is 0"),
    "scale_without_tiles": (_set("model", "scale", 2.0), "scale applies to tiled models only"),
    "bad_k_values": (_set("scoring", "k_values", []), "scoring.k_values is []"),
    "unknown_scoring_key": (_set("scoring", "nmasks", 3), "unknown key scoring.nmasks"),
    "calibration_zero_scale": (_set("calibration", "max_scale", 0.0), "calibration.max_scale is 0.0"),
    "calibration_missing_key": (lambda d: d["calibration"].pop("threshold"), "calibration.threshold is missing"),
    "calibration_nan": (_set("calibration", "threshold", float("nan")), "calibration.threshold is NaN"),
    "model_not_object": (lambda d: d.__setitem__("model", [4]), '"model" must be an object'),
}
WEIGHT_CASES = {
    "weights_of_wider_model": (_weights_from(ModelConfig(width=8, img_size=32)), "has shape (8, 3, 3, 3)"),
    "weights_nan": (_nan_weights, "head.weight holds NaN"),
    "weights_extra_key": (_extra_weight, "unexpected key 'extra.weight'"),
}


@pytest.mark.parametrize("case", [*JSON_CASES, *WEIGHT_CASES])
def test_each_kind_of_damage_is_one_clear_error(case, ckpt):
    if case in JSON_CASES:
        change, expected = JSON_CASES[case]
        _edit_json(ckpt, change)
    else:
        change, expected = WEIGHT_CASES[case]
        change(ckpt)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    message = str(err.value)
    assert str(ckpt) in message and expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize("case", ["width_changed", "unknown_model_key", "missing_key", "absurd_img_size"])
def test_cli_refuses_a_tampered_checkpoint_before_ray(case, ckpt, tmp_path):
    change, expected = JSON_CASES[case]
    _edit_json(ckpt, change)
    (tmp_path / "images").mkdir()
    # --address names a port nobody listens on: reaching Ray at all would fail with a different message
    address = f"127.0.0.1:{_closed_port()}"
    for args in (["score", str(tmp_path / "images"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"),
                  "--address", address],
                 ["evaluate", str(tmp_path / "nodata"), "--checkpoint", str(ckpt)]):
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 2, (out.output, out.exception)
        lines = out.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), out.output
        assert str(ckpt) in lines[0] and expected in lines[0], lines[0]
        assert not (tmp_path / "out").exists()


def test_unreachable_s3_checkpoint_fails_fast(tmp_path, monkeypatch):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    for var, value in {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                       "AWS_EC2_METADATA_DISABLED": "true", "SSM_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", raising=False)
    t0 = time.perf_counter()
    out = CliRunner().invoke(app, ["score", str(tmp_path), "--checkpoint", "s3://bucket/runs/bottle",
                                   "--out", str(tmp_path / "out")])
    seconds = time.perf_counter() - t0
    assert out.exit_code == 2, (out.output, out.exception)
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and "s3://bucket/runs/bottle: cannot reach the storage at " + endpoint in lines[0], lines
    assert seconds < 15, f"took {seconds:.1f} s"  # the default retries with backoff took about 40 s


def test_missing_s3_checkpoint_is_one_line(s3_server, tmp_path, monkeypatch):
    bucket = s3_server.make_bucket()
    monkeypatch.setenv("SSM_CACHE_DIR", str(tmp_path / "cache"))
    for uri, expected in ((f"s3://{bucket}/runs/none", "nothing there"),
                          ("s3://no-such-bucket-ssm/runs/x", "s3://no-such-bucket-ssm/runs/x")):
        out = CliRunner().invoke(app, ["score", str(tmp_path), "--checkpoint", uri, "--out", str(tmp_path / "out")])
        assert out.exit_code == 2, (out.output, out.exception)
        lines = out.output.strip().splitlines()
        assert len(lines) == 1 and uri in lines[0] and expected in lines[0], lines


def test_damaged_s3_checkpoint_names_the_key(s3_server, ckpt, tmp_path, monkeypatch):
    bucket = s3_server.make_bucket()
    monkeypatch.setenv("SSM_CACHE_DIR", str(tmp_path / "cache"))
    _edit_json(ckpt, _set("model", "width", 8))
    client = s3_server.client()
    for f in ("ssm.json", "model.pt"):
        client.upload_file(str(ckpt / f), bucket, f"runs/a/best/{f}")
    out = CliRunner().invoke(app, ["score", str(tmp_path), "--checkpoint", f"s3://{bucket}/runs/a",
                                   "--out", str(tmp_path / "out")])
    assert out.exit_code == 2, (out.output, out.exception)
    assert "has shape (4, 3, 3, 3)" in out.output and "best/model.pt" in out.output, out.output
