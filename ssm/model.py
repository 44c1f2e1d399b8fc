"""The mask-conditioned inpainting UNet of SSM (method page, section 3).

The encoder sees only the masked image; the mask enters through five residual mask blocks (after the
bottleneck and after every up block). The head predicts the reconstruction and the mask itself.

>>> import torch
>>> net = SSMUNet(ModelConfig(width=8)).eval()
>>> x, m = torch.rand(2, 3, 128, 128), torch.ones(2, 1, 128, 128)
>>> recon, mask_pred = net(x * m, m)
>>> recon.shape, mask_pred.shape
(torch.Size([2, 3, 128, 128]), torch.Size([2, 1, 128, 128]))
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

UPSAMPLE_MODES = ("nearest", "transpose")


@dataclass
class ModelConfig:
    width: int = 64  # W: channels of the first stage (paper: 64, about 33 M parameters)
    channels: int = 3  # image channels: 3 (RGB, grayscale repeated) or 1 (grayscale model)
    upsample: str = "nearest"  # "nearest" (interpolate + 1x1 conv) or "transpose" (transposed conv)
    img_size: int = 128  # square input of the network: the whole image resized to it, or the tile side
    tiled: bool = False  # keep each image's aspect ratio (resized by `scale`): train on crops, score by tiles
    scale: float = 1.0  # with tiles: resize factor applied to the image first (1 = native resolution)

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be a positive integer, got {self.width}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {self.upsample!r}")
        if self.img_size % 16:
            raise ValueError(f"img_size must be a multiple of 16 (four 2x downsamplings), got {self.img_size}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be a positive number, got {self.scale}")
        if self.scale != 1.0 and not self.tiled:
            raise ValueError("scale applies to tiled models only: the whole image is resized to img_size otherwise")

    def to_dict(self) -> dict:
        return asdict(self)


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    pad = 1 if kernel in (3, 4) else kernel // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class MaskBlock(nn.Module):
    """Residual block conditioned on the mask: BN(f) || M -> conv-BN-ReLU -> conv, gated by M, added to f."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(ch)
        self.body = nn.Sequential(conv_bn_relu(ch + 1, ch), nn.Conv2d(ch, ch, 3, 1, 1))

    def forward(self, f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = F.interpolate(mask, size=f.shape[-2:], mode="nearest") if mask.shape[-1] != f.shape[-1] else mask
        return f + self.body(torch.cat([self.norm(f), m], dim=1)) * m


class UpBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int, mode: str):
        super().__init__()
        if mode == "transpose":
            self.up = nn.ConvTranspose2d(cin, cout, 4, 2, 1)
        else:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 1))
        self.conv = nn.Sequential(conv_bn_relu(cout + cskip, cout), conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class SSMUNet(nn.Module):
    """forward(masked_image, mask) -> (reconstruction, mask prediction), both in tanh range."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = cfg = config or ModelConfig()
        w, c = cfg.width, cfg.channels
        enc_ch = [w, 2 * w, 4 * w, 8 * w, 8 * w]
        stages = [nn.Sequential(conv_bn_relu(c, w), conv_bn_relu(w, w))]
        for cin, cout in zip(enc_ch[:-1], enc_ch[1:]):
            stages.append(nn.Sequential(conv_bn_relu(cin, cout, kernel=4, stride=2), conv_bn_relu(cout, cout)))
        self.encoder = nn.ModuleList(stages)
        dec_ch = [8 * w, 4 * w, 2 * w, w]
        ups, cin = [], enc_ch[-1]
        for skip, cout in zip(reversed(enc_ch[:-1]), dec_ch):
            ups.append(UpBlock(cin, skip, cout, cfg.upsample))
            cin = cout
        self.decoder = nn.ModuleList(ups)
        self.mask_blocks = nn.ModuleList(MaskBlock(ch) for ch in [enc_ch[-1], *dec_ch])
        self.head = nn.Conv2d(w, c + 1, 3, 1, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = self.mask_blocks[0](skips.pop(), mask)
        for up, block in zip(self.decoder, self.mask_blocks[1:]):
            x = block(up(x, skips.pop()), mask)
        out = torch.tanh(self.head(x))
        return out[:, :-1], out[:, -1:]


def masked_forward(model, x: torch.Tensor, masks: torch.Tensor, chunk: int | None = None):
    """The n masked passes as one forward: x (B,C,H,W), masks (B,n,H,W) -> assembled x_hat (B,C,H,W) and
    mask predictions (B,n,H,W). Each pixel of x_hat comes from the pass in which it was hidden.
    `chunk` bounds the masked inputs per forward call (activation memory when scoring large batches).
    A `model` that returns the reconstruction alone (scoring, an exported network) gives mask_pred None."""
    b, n, h, w = masks.shape
    c = x.shape[1]
    inp = (x[:, None] * masks[:, :, None]).reshape(b * n, c, h, w).contiguous(memory_format=torch.channels_last)
    flat_m = masks.reshape(b * n, 1, h, w)
    step = chunk or b * n
    outs = [model(inp[i : i + step], flat_m[i : i + step]) for i in range(0, b * n, step)]
    outs = [o if isinstance(o, tuple) else (o, None) for o in outs]
    recon = torch.cat([o[0] for o in outs]).float().reshape(b, n, c, h, w)
    mask_pred = None if outs[0][1] is None else torch.cat([o[1] for o in outs]).float().reshape(b, n, h, w)
    x_hat = (recon * (1.0 - masks[:, :, None])).sum(1)
    return x_hat, mask_pred


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(config: ModelConfig, size: int | None = None) -> int:
    """Multiply-adds x 2 of one forward pass at size x size, counted from the convolutions' shapes."""
    size = size or config.img_size
    model = SSMUNet(config)
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
            kh, kw = mod.kernel_size
            spatial = (inp[0] if isinstance(mod, nn.ConvTranspose2d) else out).shape[-2:]
            total += 2 * kh * kw * mod.in_channels * mod.out_channels * spatial[0] * spatial[1] // mod.groups

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        x = torch.zeros(1, config.channels, size, size, device="meta")
        model.to("meta")(x, torch.ones(1, 1, size, size, device="meta"))
    for h in handles:
        h.remove()
    return total
