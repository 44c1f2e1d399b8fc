"""Scoring with progressive mask refinement (method page, section 5), a whole batch at once.

Pass 1 inpaints every cell of every scale (all scales and masks of the batch in one forward), turns each
scale's reconstruction into an MSGMS map, combines the scales with weights proportional to k^2 and smooths.
Each refinement pass then reveals the cells the previous map calls normal (more than a fraction `ratio` of
their pixels below tau) in every mask, so only suspicious cells are inpainted, with all the normal context
around them; pixels visible in every mask keep the input. The last map is the heatmap; the image score
fuses its maximum with the last pass's reconstruction error, each normalised by the calibration.

>>> import torch
>>> from ssm.model import ModelConfig, SSMUNet
>>> scorer = Scorer(SSMUNet(ModelConfig(width=8)).eval(), ScoringConfig(tau=0.05))
>>> out = scorer.score(torch.rand(2, 3, 128, 128))
>>> out.heatmaps.shape, out.image_scores.shape
(torch.Size([2, 128, 128]), torch.Size([2]))
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from torch import nn

from .calibration import Calibration
from .losses import msgms_map
from .masks import cell_sizes, image_keys, multiscale_masks
from .model import ModelConfig, SSMUNet, masked_forward

_REFERENCE_SIZE = 128


def normal_cells(heat: torch.Tensor, tau: float, cell: int, ratio: float) -> torch.Tensor:
    """(B, H, W) map -> (B, H, W) bool, True on refinement cells where more than `ratio` of pixels are < tau."""
    h, w = heat.shape[-2:]
    below = (heat < tau).float()[:, None]
    normal = F.avg_pool2d(below, cell, ceil_mode=True) > ratio
    return normal.repeat_interleave(cell, -1).repeat_interleave(cell, -2)[:, 0, :h, :w]


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether the CPU has native bf16 dot products (AVX512-BF16 or AMX), where oneDNN's bf16 convolutions
    beat float32 (2x for the W = 64 UNet on an AVX512-BF16 CPU; see benchmarks/score_speed.py). Without
    them oneDNN emulates bf16 (not measured here), so the scorer stays in float32 by default."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, keep float32
        return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def inference_net(model: nn.Module) -> nn.Module:
    """An eval-mode copy of the model rewritten for scoring; it computes the same function.

    - Each BatchNorm that follows a convolution is folded into it: in eval mode BN is a per-channel affine
      map, so conv -> BN is one conv with scaled weights and a bias (equal up to float rounding; 1.04x in
      bf16 on CPU). The mask blocks' BN sits before a concatenation and stays.
    - Nearest 2x upsampling followed by a 1x1 conv becomes the 1x1 conv followed by the upsampling: a
      per-pixel linear map commutes with repeating pixels, and it then runs on 4x fewer pixels (bit-identical
      results; 1.05x on CPU).
    """
    net = copy.deepcopy(model).eval().requires_grad_(False)
    for seq in net.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            first, second = seq[i], seq[i + 1]
            if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d) and second.running_var is not None:
                seq[i] = _fold(first, second)
                seq[i + 1] = nn.Identity()
            elif (
                isinstance(first, nn.Upsample) and first.mode == "nearest"
                and isinstance(second, nn.Conv2d) and second.kernel_size == (1, 1) and second.stride == (1, 1)
                and second.padding == (0, 0) and second.groups == 1
            ):
                seq[i], seq[i + 1] = second, first
    return net


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter(shift if conv.bias is None else conv.bias * scale + shift, requires_grad=False)
    return conv


class ExternalForward(Protocol):
    """The inference network run by something other than this torch model (Scorer's `forward`)."""

    backend: str  # names it in outputs, e.g. "onnxruntime"
    model_config: ModelConfig  # the network it runs: input size, channels, tiling

    def __call__(self, masked_images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) masked images and (N, 1, S, S) masks -> (N, C, S, S) float32 reconstructions."""
        ...


TILES_PER_BATCH = 32  # tiled models: tiles scored together (the scoring job's default batch of images)


@dataclass
class ScoringConfig:
    k_values: Sequence[int] = (2, 4, 8)  # cell sizes at 128 px
    n_masks: int = 3  # complementary masks per scale
    refine_passes: int = 2  # R: total passes, 1 = no refinement
    ratio: float = 0.8  # rho: a refinement cell is normal when more than this fraction is below tau
    refine_cell: int = 8  # refinement cell size at 128 px
    sigma: float = 4.0  # Gaussian smoothing of the map at 128 px
    seed: int = 0  # mask seed; with the image content it fixes the masks of each image
    tau: float | None = None  # pixel threshold; None takes the calibration's
    early_exit: bool = True  # skip later passes for images with no suspicious cell (exact: see _refine)
    tile_overlap: float = 0.25  # tiled models: neighbouring tiles overlap by at least this fraction of a tile
    # (0.25: each image pixel is scored about 1.8 times; the stitch window fades over the outer quarter)
    max_forward_batch: int = 1024  # masked inputs per forward call, bounds activation memory

    def to_dict(self) -> dict:
        d = asdict(self)
        d["k_values"] = list(self.k_values)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ScoringConfig:
        d = dict(d)
        d["k_values"] = tuple(d.get("k_values", (2, 4, 8)))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class ScoreOutput:
    image_scores: torch.Tensor  # (B,) fused, calibrated image score (higher = more anomalous)
    heatmaps: torch.Tensor  # (B, H, W) final smoothed anomaly map
    heatmap_max: torch.Tensor  # (B,) raw maximum of the heatmap
    recon_error: torch.Tensor  # (B,) raw MSE(x, x_hat) of the last pass
    first_pass: torch.Tensor | None = None  # (B, H, W) smoothed map of pass 1
    passes: list[int] = field(default_factory=list)  # images that ran each pass


@dataclass
class ImageScores:
    """Scores of images that may differ in size (Scorer.score_images): one entry per image."""

    image_scores: torch.Tensor  # (N,) fused, calibrated image score
    heatmaps: list[torch.Tensor]  # (H_i, W_i) final anomaly map of each image, at its scored resolution
    heatmap_max: torch.Tensor  # (N,) raw maximum of each heatmap
    recon_error: torch.Tensor  # (N,) raw reconstruction error (for tiles: the mean over the image's tiles)
    first_pass: list[torch.Tensor] | None = None  # pass-1 maps, when asked for
    passes: list[int] = field(default_factory=list)  # inputs (images or tiles) that ran each pass


class Scorer:
    """Batched SSM scorer around a trained model; the result for an image never depends on its batch.

    It scores with its own copy of the model, made here (inference_net, channels last): build a new Scorer
    after changing the model's weights. `model` stays the module given.
    Defaults: float32 and channels_last everywhere. bf16 autocast (`amp=True`; `ssm score --bf16`) is about 2x
    faster on CUDA and on CPUs with native bf16 (cpu_has_bf16), but it moves scores: on bottle it moved image
    AUROC by 0.017 and pixel AUROC by 0.004 (benchmarks/bf16_accuracy.py, a small W = 16, 64 px model), so it is
    an opt-in for bulk scoring only.

    The forward pass is pluggable: `forward` (with `model` None) is another implementation of the inference
    network, e.g. an exported file run by onnxruntime or TorchScript (ssm.export.load_exported). Masks,
    refinement passes, fusion and tiling stay the ones here; only the network's forward calls go to it, on
    the CPU and in float32.
    """

    def __init__(
        self,
        model: SSMUNet | None,
        config: ScoringConfig | None = None,
        calibration: Calibration | None = None,
        *,
        amp: bool | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        forward: ExternalForward | None = None,
    ):
        self.config = config or ScoringConfig()
        self.calibration = calibration
        self.amp = bool(amp)  # None or False: float32; True: bf16 autocast
        if forward is not None:
            if model is not None or amp or compile:
                raise ValueError("an external forward replaces the torch model: pass model=None, no amp, no compile")
            self.model, self.net, self.model_config = None, None, forward.model_config
            self.backend, self.device, self.channels_last = forward.backend, torch.device("cpu"), False
            self._compiled = forward
            return
        self.model = model.eval()
        self.model_config = getattr(model, "config", None)
        self.backend = "torch"
        self.device = next(model.parameters()).device
        # channels_last: oneDNN and cuDNN both run these convolutions faster in NHWC (1.07x in bf16 on CPU)
        self.channels_last = True if channels_last is None else channels_last
        self.net = inference_net(model)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self._compiled = torch.compile(self.net, dynamic=True) if compile else self.net

    @property
    def tau(self) -> float | None:
        if self.config.tau is not None:
            return self.config.tau
        return self.calibration.tau if self.calibration is not None else None

    # --- pieces -------------------------------------------------------------------------------------
    def _scaled(self, size: int) -> tuple[list[int], int, float]:
        f = size / _REFERENCE_SIZE
        return cell_sizes(size, self.config.k_values), max(1, round(self.config.refine_cell * f)), self.config.sigma * f

    def _forward(self, x: torch.Tensor, mask: torch.Tensor):
        if self.channels_last:
            # A one-channel mask is NCHW and NHWC at once, and PyTorch files it as NCHW; then every mask block's
            # concatenation comes out NCHW and its convolution copies it back to NHWC. NHWC strides avoid that.
            h, w = mask.shape[-2:]
            mask = mask.contiguous().as_strided(mask.shape, (h * w, 1, w, 1))
        out = self._compiled(x, mask)
        return out[0] if isinstance(out, tuple) else out  # the reconstruction; scoring never reads the mask head

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _inpaint(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """x (B,C,H,W), masks (B,S,n,H,W) -> assembled reconstructions (B,S,C,H,W), every scale and mask of
        the batch in one forward (chunked by max_forward_batch)."""
        b, s, n, h, w = masks.shape
        x_rep = x[:, None].expand(b, s, *x.shape[1:]).reshape(b * s, *x.shape[1:])
        # Under autocast, bf16 masks (0 and 1 are exact) keep the mask blocks' concatenation and gating in
        # bf16 instead of promoting whole activations to float32 and back (1.15x on CPU).
        flat = masks.reshape(b * s, n, h, w).to(torch.bfloat16 if self.amp else torch.float32)
        with self._autocast():
            x_hat, _ = masked_forward(self._forward, x_rep, flat, self.config.max_forward_batch)
        x_hat = x_hat.reshape(b, s, *x.shape[1:])
        visible_everywhere = masks.amin(2, keepdim=True).bool().expand_as(x_hat)  # revealed normal cells
        return torch.where(visible_everywhere, x[:, None].expand_as(x_hat), x_hat)

    @staticmethod
    def _scale_weights(cells: list[int], device) -> torch.Tensor:
        w = torch.tensor([float(k * k) for k in cells], device=device)  # w_k ~ k^2, summing to 1
        return w / w.sum()

    def _error(self, x: torch.Tensor, x_hat: torch.Tensor, cells: list[int]) -> torch.Tensor:
        """Reconstruction error MSE(x, x_hat) per image, scales weighted as in the map: (B,)."""
        per_scale = ((x_hat - x[:, None]) ** 2).mean(dim=(2, 3, 4))
        return (per_scale * self._scale_weights(cells, x.device)).sum(1)

    def _map(self, x: torch.Tensor, x_hat: torch.Tensor, cells: list[int], sigma: float) -> torch.Tensor:
        """Per-scale MSGMS maps combined with weights w_k ~ k^2, then Gaussian-smoothed: (B, H, W)."""
        b, s = x_hat.shape[:2]
        maps = msgms_map(x[:, None].expand_as(x_hat).reshape(b * s, *x.shape[1:]), x_hat.reshape(b * s, *x.shape[1:]))
        weights = self._scale_weights(cells, x.device)
        combined = (maps.reshape(b, s, *x.shape[-2:]) * weights[None, :, None, None]).sum(1)
        ksize = 2 * int(4 * sigma + 0.5) + 1
        return gaussian_blur2d(combined[:, None], (ksize, ksize), (sigma, sigma)).squeeze(1)

    # --- the method -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, images: torch.Tensor, passes: int | None = None) -> ScoreOutput:
        """Score a batch (B, C, H, W) of images in [0, 1]."""
        cfg = self.config
        passes = cfg.refine_passes if passes is None else passes
        x = images.to(self.device, torch.float32)
        b, _, size, _ = x.shape
        cells, rcell, sigma = self._scaled(size)
        masks = multiscale_masks(image_keys(x, cfg.seed), size, cells, cfg.n_masks)
        x_hat = self._inpaint(x, masks)
        heat = self._map(x, x_hat, cells, sigma)
        first = heat
        err = self._error(x, x_hat, cells)
        ran = [b]
        if passes > 1 and self.tau is None:
            raise ValueError("refinement needs the pixel threshold tau: calibrate the model or set ScoringConfig.tau")
        for _ in range(passes - 1):
            heat, err, n = self._refine(x, masks, heat, err, cells, rcell, sigma)
            ran.append(n)
        hmax = heat.flatten(1).amax(1)
        return ScoreOutput(self._fuse(hmax, err), heat, hmax, err, first, ran)

    def score_images(self, images: Sequence[torch.Tensor] | torch.Tensor, passes: int | None = None,
                     keep_first_pass: bool = False) -> ImageScores:
        """Score images (C, H, W) as the model takes them: a batch of whole images at img_size, or, for a
        tiled model (ModelConfig.tiled), each image of any size as overlapping img_size tiles whose maps are
        stitched into one heatmap at the image's own resolution (ssm.tiling). The image score fuses the
        stitched map's maximum with the mean reconstruction error of the image's tiles."""
        tiled = getattr(self.model_config, "tiled", False)
        if not tiled:
            x = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
            out = self.score(x, passes)
            first = list(out.first_pass) if keep_first_pass else None
            return ImageScores(out.image_scores, list(out.heatmaps), out.heatmap_max, out.recon_error, first, out.passes)
        return self._score_tiled(list(images), passes, keep_first_pass)

    def _score_tiled(self, images: list[torch.Tensor], passes: int | None, keep_first_pass: bool) -> ImageScores:
        from .tiling import Stitcher, pad_to, tile_grid

        tile = self.model_config.img_size
        # Tiles per scoring batch: as many as a plain batch holds images (more makes each forward's
        # activations outgrow the caches), within max_forward_batch masked inputs.
        per_batch = max(1, min(TILES_PER_BATCH,
                               self.config.max_forward_batch // (len(self.config.k_values) * self.config.n_masks)))
        padded = [pad_to(img, tile) for img in images]
        jobs = [(i, origin) for i, img in enumerate(images)
                for origin in tile_grid(tuple(img.shape[-2:]), tile, self.config.tile_overlap)]
        heat = [Stitcher(tuple(img.shape[-2:]), tile, self.device) for img in images]
        first = [Stitcher(tuple(img.shape[-2:]), tile, self.device) for img in images] if keep_first_pass else None
        err_sum = torch.zeros(len(images), dtype=torch.float64)
        n_tiles = torch.bincount(torch.tensor([i for i, _ in jobs], dtype=torch.int64), minlength=len(images))
        ran: list[int] = []
        for start in range(0, len(jobs), per_batch):  # an image's tiles are batched together, chunked
            chunk = jobs[start : start + per_batch]
            x = torch.stack([padded[i][:, t : t + tile, l : l + tile] for i, (t, l) in chunk])
            out = self.score(x, passes)
            ran = [a + b for a, b in zip(ran, out.passes)] if ran else list(out.passes)
            owners = torch.tensor([i for i, _ in chunk], dtype=torch.int64)
            err_sum.index_add_(0, owners, out.recon_error.double().cpu())
            for j, (i, origin) in enumerate(chunk):
                heat[i].add(out.heatmaps[j], origin)
                if first is not None:
                    first[i].add(out.first_pass[j], origin)
        maps = [h.result() for h in heat]
        hmax = torch.stack([m.max() for m in maps]) if maps else torch.zeros(0)
        err = (err_sum / n_tiles.clamp(min=1)).to(torch.float32).to(hmax.device)
        firsts = [f.result() for f in first] if first is not None else None
        return ImageScores(self._fuse(hmax, err), maps, hmax, err, firsts, ran)

    def _refine(self, x, masks, heat, err, cells, rcell, sigma):
        """One refinement pass. Images whose cells are all normal would see every pixel revealed, so their
        reconstruction equals the input, and map and error are exactly zero: early exit gives the same."""
        b = masks.shape[0]
        reveal = normal_cells(heat, self.tau, rcell, self.config.ratio)
        refined = torch.maximum(masks, reveal[:, None, None].float())
        suspicious = ~reveal.flatten(1).all(1)
        idx = suspicious.nonzero().squeeze(1) if self.config.early_exit else torch.arange(b, device=x.device)
        new_heat = torch.zeros_like(heat)
        new_err = torch.zeros_like(err)
        if idx.numel():
            xs = x[idx]
            x_hat = self._inpaint(xs, refined[idx])
            new_heat[idx] = self._map(xs, x_hat, cells, sigma)
            new_err[idx] = self._error(xs, x_hat, cells)
        return new_heat, new_err, int(idx.numel())

    def _fuse(self, hmax: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
        cal = self.calibration
        if cal is None:
            return hmax + err
        return (hmax - cal.max_loc) / cal.max_scale + (err - cal.mse_loc) / cal.mse_scale
