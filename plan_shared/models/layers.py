"""Equalised-learning-rate building blocks shared by the generator and discriminator."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class EqualLinear(nn.Module):
    """Linear layer whose weights are scaled at run time (equalised learning rate)."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)
        return F.leaky_relu(out, 0.2) * math.sqrt(2) if self.activate else out


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
