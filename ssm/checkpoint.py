"""The one checkpoint format: a directory with the weights and a JSON description.

    CKPT/model.pt   the model's state_dict (loaded with torch.load(weights_only=True))
    CKPT/ssm.json   {"format": "ssm-checkpoint", "version": 1, "model": {...}, "scoring": {...},
                     "calibration": {...} | null, "meta": {...}}

Training, evaluation and scoring all read this. A training run's output directory holds its best
checkpoint as RUN/best, so either path can be given wherever a checkpoint is expected.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .calibration import Calibration
from .model import ModelConfig, SSMUNet
from .scoring import Scorer, ScoringConfig

FORMAT = "ssm-checkpoint"
VERSION = 1
WEIGHTS = "model.pt"
DESCRIPTION = "ssm.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of an unknown format or version."""


@dataclass
class Checkpoint:
    model_config: ModelConfig
    scoring: ScoringConfig
    calibration: Calibration | None
    state_dict: dict
    meta: dict = field(default_factory=dict)
    path: str = ""
    id: str = ""  # short hash of everything that sets a score (score_digest): names it in every output row

    def build_model(self, device: str | torch.device = "cpu") -> SSMUNet:
        model = SSMUNet(self.model_config)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()

    def scorer(self, device: str | torch.device = "cpu", **kwargs) -> Scorer:
        return Scorer(self.build_model(device), ScoringConfig.from_dict(self.scoring.to_dict()), self.calibration, **kwargs)


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    model_config: ModelConfig,
    scoring: ScoringConfig | None = None,
    calibration: Calibration | None = None,
    meta: dict | None = None,
) -> Path:
    """Write a checkpoint directory atomically enough for a crash: the JSON is written last."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    module = getattr(model, "module", model)  # unwrap DDP
    module = getattr(module, "_orig_mod", module)  # unwrap torch.compile
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    torch.save(state, path / WEIGHTS)
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_config.to_dict(),
        "scoring": (scoring or ScoringConfig()).to_dict(),
        "calibration": calibration.to_dict() if calibration is not None else None,
        "meta": meta or {},
    }
    tmp = path / (DESCRIPTION + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path / DESCRIPTION)
    return path


def score_digest(weights: bytes, doc: dict) -> str:
    """12 hex digits naming what decides a score: the weights and the model, scoring and calibration
    sections of ssm.json (not `meta`). Any change to them gives a new id, so a scoring output never mixes
    two rules; a change in how ssm.json merely spells the same values (key order aside) does too."""
    rules = json.dumps({k: doc.get(k) for k in ("model", "scoring", "calibration")}, sort_keys=True)
    return hashlib.sha256(weights + b"\0" + rules.encode()).hexdigest()[:12]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a training run's output directory (its best checkpoint)."""
    p = Path(path)
    for candidate in (p, p / "best"):
        if (candidate / DESCRIPTION).is_file():
            return candidate
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    raise CheckpointError(
        f"{p} is neither a checkpoint (no {DESCRIPTION}) nor a training run directory (no best/{DESCRIPTION})"
    )


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    p = resolve_checkpoint(path)
    try:
        doc = json.loads((p / DESCRIPTION).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {p / DESCRIPTION}: {e}") from e
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{p / DESCRIPTION} is not an ssm checkpoint (format {doc.get('format')!r})")
    version = doc.get("version")
    if not isinstance(version, int) or version > VERSION or version < 1:
        raise CheckpointError(
            f"{p} has checkpoint version {version!r}; this ssm reads versions 1..{VERSION}: upgrade ssm to load it"
        )
    weights = p / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {p} has no {WEIGHTS}")
    digest = score_digest(weights.read_bytes(), doc)
    try:
        state = torch.load(weights, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"cannot load weights {weights}: {e}") from e
    cal = doc.get("calibration")
    return Checkpoint(
        model_config=ModelConfig(**doc["model"]),
        scoring=ScoringConfig.from_dict(doc.get("scoring") or {}),
        calibration=Calibration.from_dict(cal) if cal else None,
        state_dict=state,
        meta=doc.get("meta") or {},
        path=str(p),
        id=f"{p.parent.name}/{p.name}@{digest}" if p.parent.name else f"{p.name}@{digest}",
    )
