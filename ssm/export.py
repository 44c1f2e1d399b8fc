"""Export a checkpoint's scoring network to ONNX or TorchScript, and score with an exported file.

    ssm export CKPT --format onnx --out model.onnx            (or: export_checkpoint(CKPT, "onnx", "model.onnx"))
    ssm export CKPT --format torchscript --out model.pt

The exported network is the one the scorer runs (scoring.inference_net: batch norm folded into the
convolutions), reconstruction output only:

    masked_images (N, C, S, S) float32, the image in [0, 1] times its mask
    masks         (N, 1, S, S) float32, 1 = visible, 0 = hidden        ->  reconstruction (N, C, S, S)

N is free (the batch axis is dynamic); S is the size the model was trained at (img_size, the tile side of a
tiled model). Masks, refinement passes, fusion, calibration and tiling are not in the graph: they are in the
file's metadata as one JSON document (ONNX: metadata_props["ssm"]; TorchScript: _extra_files["ssm.json"]),

    {"format": "ssm-export", "version": 1, "checkpoint": <checkpoint id>, "model": {...}, "scoring": {...},
     "calibration": {...} | null, "tiling": {"tile", "scale", "overlap"} | null, "network": {...}}

with "model", "scoring" and "calibration" exactly as the checkpoint's ssm.json has them, so the checkpoint id
(checkpoint.score_digest) still names the rules. load_exported(FILE).scorer() runs the whole method
(scoring.Scorer) with the file doing every forward pass: `ssm score --backend onnxruntime` does that.

ONNX is written by torch's TorchScript-based exporter (dynamo=False: it needs no onnxscript and works
offline), opset ONNX_OPSET.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .calibration import Calibration
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, validate_description
from .model import ModelConfig
from .scoring import Scorer, ScoringConfig, inference_net

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".ts")}
FORMAT = "ssm-export"
VERSION = 1
METADATA_KEY = "ssm"  # ONNX metadata_props key
EXTRA_FILE = "ssm.json"  # TorchScript _extra_files name
ONNX_OPSET = 17
INPUTS = ("masked_images", "masks")
OUTPUT = "reconstruction"


class ExportError(ValueError):
    """A bad export request, or a file that is not a model exported by ssm."""


class _Reconstruction(nn.Module):
    """The scoring network with its reconstruction output only (scoring never reads the mask head)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, masked_images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.net(masked_images, masks)[0]


def export_metadata(ckpt: Checkpoint) -> dict:
    cfg = ckpt.model_config
    s = cfg.img_size
    return {
        "format": FORMAT,
        "version": VERSION,
        "checkpoint": ckpt.id,
        "model": cfg.to_dict(),
        "scoring": ckpt.scoring.to_dict(),
        "calibration": ckpt.calibration.to_dict() if ckpt.calibration is not None else None,
        # a tiled model scores each image (resized by `scale`) as overlapping tile x tile crops, stitched
        "tiling": {"tile": s, "scale": cfg.scale, "overlap": ckpt.scoring.tile_overlap} if cfg.tiled else None,
        "network": {
            "inputs": {INPUTS[0]: ["N", cfg.channels, s, s], INPUTS[1]: ["N", 1, s, s]},
            "outputs": {OUTPUT: ["N", cfg.channels, s, s]},
        },
    }


@dataclass
class ExportResult:
    path: Path
    format: str
    checkpoint: str  # the checkpoint id
    max_abs_diff: float  # reconstruction of the exported file vs the torch network, on a random batch of 3


def export_checkpoint(checkpoint: str | os.PathLike | Checkpoint, fmt: str, out: str | os.PathLike) -> ExportResult:
    """Write the scoring network of `checkpoint` (a directory, a run directory or a loaded Checkpoint) to `out`
    in `fmt` ("onnx" or "torchscript"), the scoring rules in its metadata; then run the written file once on
    a random batch and report how far its reconstruction is from the torch network's."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if "://" in os.fspath(out):  # Path() would turn s3://b/k into the local folder s3:/b/k
        raise ExportError(f"--out {out}: export_checkpoint writes a local file; `ssm export` uploads it to a URI")
    out = Path(out)
    if out.suffix.lower() not in SUFFIXES[fmt]:
        raise ExportError(f"--out {out}: a {fmt} file is named *{' or *'.join(SUFFIXES[fmt])}")
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give the file to write, e.g. {out / ('model' + SUFFIXES[fmt][0])}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    net = _Reconstruction(inference_net(ckpt.build_model("cpu"))).eval()
    cfg = ckpt.model_config
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 1, cfg.img_size, cfg.img_size, generator=gen) > 0.5).float()
    example = (torch.rand(3, cfg.channels, cfg.img_size, cfg.img_size, generator=gen) * masks, masks)
    meta = json.dumps(export_metadata(ckpt), sort_keys=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with torch.no_grad(), _quiet_tracing():
            if fmt == "onnx":
                _write_onnx(net, example, meta, tmp)
            else:
                torch.jit.save(torch.jit.trace(net, example), str(tmp), _extra_files={EXTRA_FILE: meta})
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    exported = load_exported(out)
    with torch.no_grad():
        diff = (exported.forward()(*example) - net(*example)).abs().max().item()
    return ExportResult(out, fmt, ckpt.id, diff)


@contextlib.contextmanager
def _quiet_tracing():
    """The tracer warns that MaskBlock's size test becomes a constant: it is, at the fixed input size; and
    that TorchScript and the TorchScript-based ONNX exporter are deprecated: they are what exports offline."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        yield


def _write_onnx(net: nn.Module, example: tuple, meta: str, path: Path) -> None:
    import onnx

    batch = {0: "N"}
    # torch >= 2.5 has the dynamo exporter too (the default from 2.9); older releases only the one used here
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    torch.onnx.export(net, example, str(path), input_names=list(INPUTS), output_names=[OUTPUT],
                      dynamic_axes={INPUTS[0]: batch, INPUTS[1]: batch, OUTPUT: batch},
                      opset_version=ONNX_OPSET, **legacy)
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {METADATA_KEY: meta})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


# ----------------------------------------------------------------------------------------------------------
# Reading an exported file back


class OnnxForward:
    """The exported network run by onnxruntime (CPU execution provider); a Scorer `forward`."""

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, model_config: ModelConfig, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.model_config = model_config
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, masked_images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        feed = {INPUTS[0]: _numpy(masked_images), INPUTS[1]: _numpy(masks)}
        return torch.from_numpy(self.session.run([OUTPUT], feed)[0])


class TorchScriptForward:
    """The exported network run by TorchScript on the CPU; a Scorer `forward`."""

    backend = "torchscript"

    def __init__(self, module: torch.jit.ScriptModule, model_config: ModelConfig):
        self.model_config = model_config
        self.module = module.eval()

    def __call__(self, masked_images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.module(masked_images.float().contiguous(), masks.float().contiguous())


def _numpy(t: torch.Tensor):
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


@dataclass
class ExportedModel:
    """An exported file and the scoring rules in its metadata; `id` is the checkpoint id it was made from."""

    path: str
    format: str  # "onnx" or "torchscript"
    metadata: dict
    model_config: ModelConfig
    scoring: ScoringConfig
    calibration: Calibration | None
    id: str
    module: torch.jit.ScriptModule | None = None  # the loaded TorchScript module

    def forward(self, threads: int | None = None) -> OnnxForward | TorchScriptForward:
        if self.format == "onnx":
            return OnnxForward(self.path, self.model_config, threads)
        return TorchScriptForward(self.module, self.model_config)

    def scorer(self, threads: int | None = None) -> Scorer:
        return Scorer(None, ScoringConfig.from_dict(self.scoring.to_dict()), self.calibration,
                      forward=self.forward(threads))


def load_exported(path: str | os.PathLike) -> ExportedModel:
    """An ONNX or TorchScript file written by export_checkpoint; ExportError naming the file otherwise."""
    p = Path(path)
    if p.is_dir():
        raise ExportError(f"{p} is a folder, not an exported model file (.onnx, or TorchScript .pt)")
    if not p.is_file():
        raise ExportError(f"exported model {p} does not exist")
    if zipfile.is_zipfile(p):  # TorchScript archives are zip files; ONNX files are protobuf
        fmt, (raw, module) = "torchscript", _read_torchscript(p)
    else:
        fmt, raw, module = "onnx", _read_onnx(p), None
    if raw is None:
        kind = "an ONNX" if fmt == "onnx" else "a TorchScript"
        raise ExportError(f"{p} is {kind} model without ssm metadata; write it with `ssm export`")
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ExportError(f"{p}: its ssm metadata is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ExportError(f"{p}: its ssm metadata is not an ssm export (format {doc.get('format')!r})"
                          if isinstance(doc, dict) else f"{p}: its ssm metadata is not a JSON object")
    if not isinstance(doc.get("version"), int) or not 1 <= doc["version"] <= VERSION:
        raise ExportError(f"{p} has export version {doc.get('version')!r}; this ssm reads versions 1..{VERSION}")
    sections = {k: doc.get(k) for k in ("model", "scoring", "calibration")}
    try:  # the checkpoint's own validation, key by key
        model_config, scoring, calibration = validate_description(
            {"format": doc["format"], "version": doc["version"], **sections}, p)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    return ExportedModel(str(p), fmt, doc, model_config, scoring, calibration, str(doc.get("checkpoint", "")), module)


def _read_onnx(p: Path) -> str | None:
    import onnx

    try:  # protobuf whatever the file's name (onnx.load guesses the encoding from the extension)
        model = onnx.load(str(p), format="protobuf", load_external_data=False)
    except Exception as e:  # protobuf's decode errors have no common base beyond this
        raise ExportError(f"{p} is neither an ONNX model nor a TorchScript file ({type(e).__name__}: {e})") from None
    if not model.graph.node:  # protobuf parses many byte strings as an empty message
        raise ExportError(f"{p} is neither an ONNX model nor a TorchScript file (no graph in it)")
    return next((prop.value for prop in model.metadata_props if prop.key == METADATA_KEY), None)


def _read_torchscript(p: Path) -> tuple[str | None, torch.jit.ScriptModule]:
    extra = {EXTRA_FILE: ""}
    try:
        with _quiet_tracing():
            module = torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
    except RuntimeError as e:
        raise ExportError(f"{p} is a zip file but not a TorchScript model ({str(e).splitlines()[0]})") from None
    raw = extra[EXTRA_FILE]
    return (raw.decode() if isinstance(raw, bytes) else raw) or None, module
