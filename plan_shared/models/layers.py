"""Equalised-learning-rate building blocks shared by the generator and discriminator."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2)


def set_fused(module: nn.Module, fused: bool) -> nn.Module:
    """Switch every layer below ``module`` between the reference ops and fused ones.

    Fused = the same function with fewer passes over the activations: the gain of
    ``leaky_relu(x) * sqrt 2`` moves into the (small) weights and bias, since
    leaky_relu(a x) = a leaky_relu(x) for a > 0, and bias, noise and demodulation are one
    ``addcmul``. Results agree with the reference ops up to float rounding.
    """
    for m in module.modules():
        if hasattr(m, "fused"):
            setattr(m, "fused", fused)  # noqa: B010  (Module.__setattr__ types the value as Tensor | Module)
    return module


def set_channels_last(module: nn.Module) -> nn.Module:
    """Put ``module``'s 4-d weights and buffers in channels_last (NHWC) memory format, and tell its layers
    that their activations should stay so (values unchanged; oneDNN convolutions, pooling and bilinear
    resampling are faster on NHWC, and ops mixing both layouts are several times slower than either)."""
    module.to(memory_format=torch.channels_last)
    for m in module.modules():
        if hasattr(m, "channels_last"):
            setattr(m, "channels_last", True)  # noqa: B010  (see set_fused)
    return module


class EqualLinear(nn.Module):
    """Linear layer whose weights are scaled at run time (equalised learning rate)."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and self.activate:
            return F.leaky_relu(F.linear(x, self.weight * (self.scale * SQRT2), self.bias * (self.lr_mul * SQRT2)), 0.2)
        out = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(out, 0.2) * math.sqrt(2) if self.activate else out


class EqualConv2d(nn.Module):
    """Plain conv with equalised learning rate (discriminator)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, bias: bool = True, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.padding = kernel // 2
        self.activate = activate
        self.fused = False
        self.channels_last = False  # set by set_channels_last

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """``gain`` scales the output (folded into the weights when fused)."""
        if self.fused:
            a = gain * SQRT2 if self.activate else gain
            bias = self.bias * a if self.bias is not None else None
            out = F.conv2d(x, self.weight * (self.scale * a), bias, padding=self.padding)
            if self.channels_last:  # a 1-channel input (the image) comes out NCHW: one copy, not mixed-layout ops
                out = out.contiguous(memory_format=torch.channels_last)
            return F.leaky_relu(out, 0.2) if self.activate else out
        out = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)
        out = F.leaky_relu(out, 0.2) * math.sqrt(2) if self.activate else out
        return out * gain if gain != 1.0 else out


def modulated_conv2d(
    x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True, padding: int = 1
) -> torch.Tensor:
    """StyleGAN2 weight modulation/demodulation, computed on activations.

    Scaling the input channels by the style and the output channels by the
    demodulation coefficient is equivalent to modulating the weights per sample
    (StyleGAN2's non-fused path) and uses one ordinary convolution, which is several
    times faster on CPU than a grouped convolution with one group per sample.

    x: [B, I, H, W]; weight: [O, I, k, k] (already scaled); styles: [B, I].
    """
    b, i = x.shape[:2]
    assert styles.shape == (b, i), f"styles must be [{b}, {i}], got {tuple(styles.shape)}"
    out = F.conv2d(x * styles.reshape(b, i, 1, 1), weight, padding=padding)
    if demodulate:
        dcoef = torch.rsqrt(styles.square() @ weight.square().sum(dim=[2, 3]).t() + 1e-8)  # [B, O]
        out = out * dcoef.reshape(b, -1, 1, 1)
    return out
