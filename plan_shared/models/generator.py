"""Style-based generator: a mapping network z -> w and a synthesis network w -> image.

The synthesis network starts from a learned 4x4 constant, modulates every
convolution with a style computed from w (StyleGAN2 modulation/demodulation), adds
per-pixel noise and sums RGB (or grey) outputs at every resolution (skip
architecture). PLAN navigates in W: :meth:`StyleGenerator.render` takes ``[B, w_dim]``
vectors (broadcast to every layer) and returns images in ``[-1, 1]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from plan_shared.models.layers import SQRT2, EqualLinear, modulated_conv2d


def native_resolution(size: int) -> int:
    """The power of two the network is built at (28 -> 32); the output is resized to ``size``."""
    if size < 8:
        raise ValueError(f"image size {size} is below the minimum of 8")
    return 1 << math.ceil(math.log2(size))


class MappingNetwork(nn.Module):
    w_avg: torch.Tensor  # buffer: running mean of W
    def __init__(self, z_dim: int, w_dim: int, layers: int, lr_mul: float = 0.01, w_avg_beta: float = 0.995):
        super().__init__()
        self.z_dim, self.w_dim, self.w_avg_beta = z_dim, w_dim, w_avg_beta
        dims = [z_dim] + [w_dim] * layers
        self.net = nn.Sequential(
            *[EqualLinear(dims[i], dims[i + 1], lr_mul=lr_mul, activate=True) for i in range(layers)]
        )
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, truncation: float = 1.0, update_w_avg: bool = False) -> torch.Tensor:
        assert z.ndim == 2 and z.shape[1] == self.z_dim, f"z must be [B, {self.z_dim}], got {tuple(z.shape)}"
        z = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)
        w: torch.Tensor = self.net(z)
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(w.detach().mean(0).lerp(self.w_avg, self.w_avg_beta))
        if truncation != 1.0:
            w = self.w_avg.lerp(w, truncation)
        return w


class StyledConv(nn.Module):
    noise_const: torch.Tensor  # buffer: the fixed noise of noise_mode="const"
    """Modulated 3x3 conv (+ optional 2x upsampling), noise, bias, leaky ReLU."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, upsample: bool):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, 3, 3))
        self.scale = 1.0 / math.sqrt(in_ch * 9)
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.register_buffer("noise_const", torch.randn(1, 1, resolution, resolution))
        self.upsample = upsample
        self.resolution = resolution
        self.fused = False

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if self.fused:
            return self._fused(x, w, noise_mode)
        x = modulated_conv2d(x, self.weight * self.scale, self.affine(w), demodulate=True)
        if noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
            x = x + noise * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const * self.noise_strength
        return F.leaky_relu(x + self.bias.reshape(1, -1, 1, 1), 0.2) * math.sqrt(2)

    def _fused(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str) -> torch.Tensor:
        """The same function: demodulation, noise, bias and the sqrt 2 gain in one addcmul + leaky_relu."""
        b = x.shape[0]
        weight = self.weight * self.scale
        styles = self.affine(w)
        out = F.conv2d(x * styles.reshape(b, -1, 1, 1), weight, padding=1)
        dcoef = torch.rsqrt(styles.square() @ weight.square().sum(dim=[2, 3]).t() + 1e-8) * SQRT2  # [B, O]
        # ``out`` is the only full-size operand of each op, so the result keeps its memory format
        # (channels_last under gan.fast) instead of falling back to NCHW and being copied back.
        y = torch.addcmul((self.bias * SQRT2).reshape(1, -1, 1, 1), out, dcoef.reshape(b, -1, 1, 1))
        if noise_mode == "random":
            noise = torch.randn(b, 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
            y = y + noise * (self.noise_strength * SQRT2)
        elif noise_mode == "const":
            y = y + self.noise_const * (self.noise_strength * SQRT2)
        return F.leaky_relu(y, 0.2)


class ToImage(nn.Module):
    """Modulated 1x1 conv to the output channels, no demodulation."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, 1, 1))
        self.scale = 1.0 / math.sqrt(in_ch)
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.fused = False

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.fused:
            # The same sum over input channels as a batched matrix product with per-sample weights
            # [B, O, I]: a 1x1 convolution to 1-3 channels is mostly overhead (measured ~5x slower).
            # Pixels as rows [B, H*W, I] (a view of channels_last x), so that x's gradient comes back
            # channels_last too: a gradient in the other layout makes the ops it meets several times slower.
            b, i, h, wd = x.shape
            wmod = self.weight.reshape(1, -1, i) * (self.affine(w) * self.scale).unsqueeze(1)  # [B, O, I]
            rows = x.permute(0, 2, 3, 1).reshape(b, h * wd, i)
            out_f = torch.baddbmm(self.bias.reshape(1, 1, -1), rows, wmod.transpose(1, 2))  # [B, H*W, O]
            return out_f.reshape(b, h, wd, -1).permute(0, 3, 1, 2)
        out = modulated_conv2d(x, self.weight * self.scale, self.affine(w), demodulate=False, padding=0)
        return out + self.bias.reshape(1, -1, 1, 1)


class SynthesisNetwork(nn.Module):
    def __init__(self, w_dim: int, size: int, channels: int, base_channels: int, min_channels: int):
        super().__init__()
        self.size, self.channels, self.w_dim = size, channels, w_dim
        self.native = native_resolution(size)
        n_up = int(math.log2(self.native)) - 2
        chans = [max(base_channels >> i, min_channels) for i in range(n_up + 1)]
        self.const = nn.Parameter(torch.randn(1, chans[0], 4, 4))
        self.convs = nn.ModuleList([StyledConv(chans[0], chans[0], w_dim, 4, upsample=False)])
        self.to_images = nn.ModuleList([ToImage(chans[0], channels, w_dim)])
        for i in range(1, n_up + 1):
            res = 4 << i
            self.convs.append(StyledConv(chans[i - 1], chans[i], w_dim, res, upsample=True))
            self.convs.append(StyledConv(chans[i], chans[i], w_dim, res, upsample=False))
            self.to_images.append(ToImage(chans[i], channels, w_dim))
        self.num_ws = len(self.convs) + len(self.to_images)
        # the resolution (px) of the block each style input drives, in ws order: 4, 4, then 3 per doubling
        self.ws_resolution: list[int] = [4, 4] + [4 << i for i in range(1, n_up + 1) for _ in range(3)]

    def forward(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        """ws: ``[B, num_ws, w_dim]`` (one style per layer) or ``[B, w_dim]`` (broadcast)."""
        if ws.ndim == 2:
            ws = ws.unsqueeze(1).expand(-1, self.num_ws, -1)
        assert ws.ndim == 3 and ws.shape[1:] == (self.num_ws, self.w_dim), f"bad ws shape {tuple(ws.shape)}"
        x = self.const.expand(ws.shape[0], -1, -1, -1)
        k = 0
        x = self.convs[0](x, ws[:, k], noise_mode)
        k += 1
        img: torch.Tensor = self.to_images[0](x, ws[:, k])
        k += 1
        for j in range(1, len(self.to_images)):
            x = self.convs[2 * j - 1](x, ws[:, k], noise_mode)
            x = self.convs[2 * j](x, ws[:, k + 1], noise_mode)
            img = F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False)
            img = img + self.to_images[j](x, ws[:, k + 2])
            k += 3
        if self.native != self.size:
            img = F.interpolate(img, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return img


class StyleGenerator(nn.Module):
    """z -> w -> image. ``render(w)`` is the W-space entry point used by inversion and PLAN."""

    def __init__(
        self,
        z_dim: int = 64,
        w_dim: int = 64,
        size: int = 32,
        channels: int = 1,
        mapping_layers: int = 3,
        base_channels: int = 128,
        min_channels: int = 32,
        mapping_lr_mul: float = 0.01,
        w_avg_beta: float = 0.995,
    ):
        super().__init__()
        self.z_dim, self.w_dim, self.size, self.channels = z_dim, w_dim, size, channels
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, mapping_lr_mul, w_avg_beta)
        self.synthesis = SynthesisNetwork(w_dim, size, channels, base_channels, min_channels)

    @property
    def w_avg(self) -> torch.Tensor:
        return self.mapping.w_avg

    def forward(self, z: torch.Tensor, truncation: float = 1.0, noise_mode: str = "random") -> torch.Tensor:
        img: torch.Tensor = self.synthesis(self.mapping(z, truncation), noise_mode)
        return img

    def render(self, w: torch.Tensor, noise_mode: str = "const") -> torch.Tensor:
        """Images ``[B, C, size, size]`` from W vectors ``[B, w_dim]`` or W+ styles ``[B, num_ws, w_dim]`` (one
        w per synthesis layer, in :attr:`SynthesisNetwork.ws_resolution` order; the same w in every layer renders
        what W does). Deterministic noise by default."""
        n_ws = self.synthesis.num_ws
        ok = (w.ndim == 2 and w.shape[1] == self.w_dim) or (w.ndim == 3 and w.shape[1:] == (n_ws, self.w_dim))
        if not ok:
            raise ValueError(f"w must be [B, {self.w_dim}] (W) or [B, {n_ws}, {self.w_dim}] (W+), got {tuple(w.shape)}")
        out: torch.Tensor = self.synthesis(w, noise_mode)
        assert out.shape[1:] == (self.channels, self.size, self.size)
        return out

    @torch.no_grad()
    def sample_w(self, n: int, generator: torch.Generator | None = None, truncation: float = 1.0) -> torch.Tensor:
        dev = self.w_avg.device
        z = torch.randn(n, self.z_dim, generator=generator, device="cpu").to(dev)
        w: torch.Tensor = self.mapping(z, truncation)
        return w
