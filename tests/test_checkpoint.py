import json

import pytest
import torch

from ssm.calibration import Calibration
from ssm.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from ssm.model import ModelConfig, SSMUNet
from ssm.scoring import ScoringConfig

CAL = Calibration(tau=0.1, max_loc=0.2, max_scale=0.05, mse_loc=0.01, mse_scale=0.002, threshold=2.5,
                  heatmap_vmin=0.0, heatmap_vmax=0.4, n_images=10)


def _save(path):
    torch.manual_seed(0)
    cfg = ModelConfig(width=8, channels=1, upsample="transpose", img_size=64)
    model = SSMUNet(cfg)
    save_checkpoint(path, model, cfg, ScoringConfig(k_values=(4, 8), ratio=0.7, seed=3), CAL, {"epoch": 4})
    return model


def test_round_trip(tmp_path):
    model = _save(tmp_path / "ck")
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.model_config == ModelConfig(width=8, channels=1, upsample="transpose", img_size=64)
    assert ck.scoring.k_values == (4, 8) and ck.scoring.ratio == 0.7 and ck.scoring.seed == 3
    assert ck.calibration == CAL
    assert ck.meta["epoch"] == 4
    assert ck.id.endswith(ck.id.split("@")[1]) and len(ck.id.split("@")[1]) == 12
    rebuilt = ck.build_model()
    x, m = torch.rand(1, 1, 64, 64), torch.ones(1, 1, 64, 64)
    model.eval()
    assert torch.equal(rebuilt(x, m)[0], model(x, m)[0])
    scorer = ck.scorer()
    assert scorer.tau == 0.1 and scorer.config.k_values == (4, 8)


def test_run_directory_resolves_to_best(tmp_path):
    _save(tmp_path / "run" / "best")
    assert resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / "best"
    assert load_checkpoint(tmp_path / "run").calibration == CAL


def test_newer_or_unknown_versions_are_refused(tmp_path):
    _save(tmp_path / "ck")
    doc_path = tmp_path / "ck" / "ssm.json"
    doc = json.loads(doc_path.read_text())
    doc_path.write_text(json.dumps({**doc, "version": 99}))
    with pytest.raises(CheckpointError, match="version 99.*upgrade"):
        load_checkpoint(tmp_path / "ck")
    doc_path.write_text(json.dumps({**doc, "format": "something-else"}))
    with pytest.raises(CheckpointError, match="not an ssm checkpoint"):
        load_checkpoint(tmp_path / "ck")


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        load_checkpoint(tmp_path / "empty")
    _save(tmp_path / "ck")
    (tmp_path / "ck" / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot load weights"):
        load_checkpoint(tmp_path / "ck")


def test_weights_only_loading_refuses_pickled_code(tmp_path):
    _save(tmp_path / "ck")

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Evil()}, tmp_path / "ck" / "model.pt")
    with pytest.raises(CheckpointError, match="cannot load weights"):
        load_checkpoint(tmp_path / "ck")
