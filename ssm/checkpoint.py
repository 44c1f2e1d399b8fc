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
import math
import os
from dataclasses import MISSING, dataclass, field
from pathlib import Path

import torch

from .calibration import Calibration
from .model import UPSAMPLE_MODES, ModelConfig, SSMUNet
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
    if not isinstance(doc, dict):
        raise CheckpointError(f"{p / DESCRIPTION}: expected a JSON object, got {type(doc).__name__}")
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
    model_config, scoring, calibration = validate_description(doc, p / DESCRIPTION)
    check_weights(state, model_config, weights)
    return Checkpoint(
        model_config=model_config,
        scoring=scoring,
        calibration=calibration,
        state_dict=state,
        meta=doc.get("meta") or {},
        path=str(p),
        id=f"{p.parent.name}/{p.name}@{digest}" if p.parent.name else f"{p.name}@{digest}",
    )


# ----------------------------------------------------------------------------------------------------------
# Validation: a damaged or hand-edited checkpoint is refused here, with one line naming the file and the key,
# before any cluster work starts.

# Bounds of a plausible model; beyond them the description is damaged rather than a model to build.
MAX_WIDTH = 512  # W = 64 (the paper) has 33 M parameters; they grow with W^2, so W = 512 is about 2 G
MAX_IMG_SIZE = 4096  # the network's input side (whole image or tile); the paper uses 128
MAX_SCALE = 16.0  # tiled models: the resize factor applied before tiling

_TOP_KEYS = {"format", "version", "model", "scoring", "calibration", "meta"}
_REQUIRED_TOP = ("format", "version", "model")
# The model keys that every checkpoint has had; `tiled` and `scale` came later and default to whole images.
_REQUIRED_MODEL = ("width", "channels", "upsample", "img_size")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _rule(kind, ok=lambda v: True):
    return lambda v: kind(v) and ok(v)


# section -> key -> (check, what a valid value is)
_SCHEMA: dict[str, dict[str, tuple]] = {
    "model": {
        "width": (_rule(_whole, lambda v: 1 <= v <= MAX_WIDTH), f"a whole number from 1 to {MAX_WIDTH}"),
        "channels": (_rule(_whole, lambda v: v in (1, 3)), "1 or 3"),
        "upsample": (lambda v: v in UPSAMPLE_MODES, " or ".join(map(repr, UPSAMPLE_MODES))),
        "img_size": (_rule(_whole, lambda v: 16 <= v <= MAX_IMG_SIZE and v % 16 == 0),
                     f"a multiple of 16 from 16 to {MAX_IMG_SIZE}"),
        "tiled": (lambda v: isinstance(v, bool), "true or false"),
        "scale": (_rule(_number, lambda v: 0 < v <= MAX_SCALE), f"a number above 0 and at most {MAX_SCALE:g}"),
    },
    "scoring": {
        "k_values": (lambda v: isinstance(v, list) and len(v) > 0 and all(_whole(k) and k >= 1 for k in v),
                     "a non-empty list of positive whole numbers"),
        "n_masks": (_rule(_whole, lambda v: v >= 1), "a positive whole number"),
        "refine_passes": (_rule(_whole, lambda v: v >= 1), "a positive whole number"),
        "ratio": (_rule(_number, lambda v: 0 <= v <= 1), "a number from 0 to 1"),
        "refine_cell": (_rule(_whole, lambda v: v >= 1), "a positive whole number"),
        "sigma": (_rule(_number, lambda v: v > 0), "a positive number"),
        "seed": (_whole, "a whole number"),
        "tau": (lambda v: v is None or (_number(v) and v >= 0), "null or a number of 0 or more"),
        "early_exit": (lambda v: isinstance(v, bool), "true or false"),
        "tile_overlap": (_rule(_number, lambda v: 0 <= v < 1), "a number from 0 up to (not including) 1"),
        "max_forward_batch": (_rule(_whole, lambda v: v >= 1), "a positive whole number"),
    },
    "calibration": {
        **{k: (_number, "a finite number") for k in ("tau", "max_loc", "mse_loc", "threshold", "heatmap_vmin")},
        **{k: (_rule(_number, lambda v: v > 0), "a positive number")
           for k in ("max_scale", "mse_scale", "heatmap_vmax")},
        "n_images": (_rule(_whole, lambda v: v >= 1), "a positive whole number"),
        "pixel_quantile": (_rule(_number, lambda v: 0 < v < 1), "a number between 0 and 1"),
        "image_quantile": (_rule(_number, lambda v: 0 < v < 1), "a number between 0 and 1"),
    },
}
_REQUIRED = {
    "model": _REQUIRED_MODEL,
    "scoring": (),  # every scoring setting has a default
    "calibration": tuple(k for k, f in Calibration.__dataclass_fields__.items() if f.default is MISSING),
}


def _check_section(doc: dict, section: str, file: Path) -> dict:
    value = doc[section]
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: \"{section}\" must be an object, got {type(value).__name__}")
    schema = _SCHEMA[section]
    unknown = sorted(set(value) - set(schema))
    if unknown:
        raise CheckpointError(f"{file}: unknown key {section}.{unknown[0]} (known: {', '.join(schema)})")
    missing = [k for k in _REQUIRED[section] if k not in value]
    if missing:
        raise CheckpointError(f"{file}: {section}.{missing[0]} is missing")
    for key, v in value.items():
        ok, want = schema[key]
        if not ok(v):
            raise CheckpointError(f"{file}: {section}.{key} is {json.dumps(v)}; expected {want}")
    return value


def validate_description(doc, file: Path) -> tuple[ModelConfig, ScoringConfig, Calibration | None]:
    """The configurations an ssm.json describes, every key checked; CheckpointError naming the key if not."""
    if not isinstance(doc, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(doc).__name__}")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise CheckpointError(f"{file}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    missing = [k for k in _REQUIRED_TOP if k not in doc]
    if missing:
        raise CheckpointError(f"{file}: {missing[0]!r} is missing")
    model = _check_section(doc, "model", file)
    scoring = _check_section(doc, "scoring", file) if doc.get("scoring") is not None else {}
    cal = _check_section(doc, "calibration", file) if doc.get("calibration") is not None else None
    if doc.get("meta") is not None and not isinstance(doc["meta"], dict):
        raise CheckpointError(f"{file}: \"meta\" must be an object, got {type(doc['meta']).__name__}")
    if cal is not None and cal["heatmap_vmax"] <= cal["heatmap_vmin"]:
        raise CheckpointError(f"{file}: calibration.heatmap_vmax ({cal['heatmap_vmax']}) must be above "
                              f"calibration.heatmap_vmin ({cal['heatmap_vmin']})")
    try:  # the combinations each configuration refuses (e.g. a scale without tiles)
        return ModelConfig(**model), ScoringConfig.from_dict(scoring), Calibration.from_dict(cal) if cal else None
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from e


def check_weights(state, config: ModelConfig, file: Path) -> None:
    """The state_dict must be exactly the one of the model `config` describes: the same keys, the same
    shapes, finite values. Built on the meta device, so nothing is allocated."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    with torch.device("meta"):
        expected = SSMUNet(config).state_dict()
    described = (f"the model in {DESCRIPTION} (width {config.width}, {config.channels} channel(s), "
                 f"{config.upsample} upsampling)")
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{file}: no weights for {missing[0]} ({len(missing)} missing), which {described} has")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{file}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected), which "
                              f"{described} does not have")
    for key, want in expected.items():
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{file}: {key} is a {type(t).__name__}, not a tensor")
        if t.shape != want.shape:
            raise CheckpointError(f"{file}: {key} has shape {tuple(t.shape)} but {described} needs "
                                  f"{tuple(want.shape)}; the weights and {DESCRIPTION} do not belong together")
        if t.is_floating_point() != want.is_floating_point():
            raise CheckpointError(f"{file}: {key} has dtype {t.dtype}, expected {want.dtype}")
        # NaN and infinities survive a sum (as does an absurd magnitude that overflows it): one cheap pass
        if t.is_floating_point() and not bool(torch.isfinite(t.sum())):
            raise CheckpointError(f"{file}: {key} holds NaN or infinite values; the model diverged or the file "
                                  "is damaged")
