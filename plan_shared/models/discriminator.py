"""Residual discriminator with a minibatch standard-deviation layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from plan_shared.models.generator import native_resolution
from plan_shared.models.layers import EqualConv2d, EqualLinear


class DiscriminatorBlock(nn.Module):
    """Two 3x3 convs and a 2x downsampling, with a 1x1 residual skip (scaled by 1/sqrt 2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv0 = EqualConv2d(in_ch, in_ch, 3, activate=True)
        self.conv1 = EqualConv2d(in_ch, out_ch, 3, activate=True)
        self.skip = EqualConv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv1.fused:  # the 1/sqrt 2 of the sum moves into both branches' weights
            g = 1 / math.sqrt(2)
            out: torch.Tensor = F.avg_pool2d(self.conv1(self.conv0(x), gain=g), 2) + self.skip(F.avg_pool2d(x, 2), gain=g)
            return out
        y: torch.Tensor = self.skip(F.avg_pool2d(x, 2))
        x = F.avg_pool2d(self.conv1(self.conv0(x)), 2)
        return (x + y) / math.sqrt(2)


class MinibatchStd(nn.Module):
    def __init__(self, group_size: int = 4):
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor, chunks: int = 1) -> torch.Tensor:
        """``chunks`` > 1: ``x`` is that many batches stacked; each forms its own groups."""
        if chunks > 1:
            return torch.cat([self._one(part) for part in x.chunk(chunks)], dim=0)
        return self._one(x)

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = min(self.group_size, b)
        while b % g:
            g -= 1
        y = x.reshape(g, -1, c, h, w)
        y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt()  # [B/g, C, H, W]
        y = y.mean(dim=[1, 2, 3]).reshape(-1, 1, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    def __init__(
        self, size: int = 32, channels: int = 1, base_channels: int = 32, max_channels: int = 128, mbstd_group: int = 4
    ):
        super().__init__()
        self.size, self.channels = size, channels
        self.native = native_resolution(size)
        n_down = int(math.log2(self.native)) - 2
        chans = [min(base_channels << i, max_channels) for i in range(n_down + 1)]
        self.from_image = EqualConv2d(channels, chans[0], 1, activate=True)
        self.blocks = nn.Sequential(*[DiscriminatorBlock(chans[i], chans[i + 1]) for i in range(n_down)])
        self.mbstd = MinibatchStd(mbstd_group)
        self.conv = EqualConv2d(chans[-1] + 1, chans[-1], 3, activate=True)
        self.fc = EqualLinear(chans[-1] * 16, chans[-1], activate=True)
        self.out = EqualLinear(chans[-1], 1)

    def forward(self, x: torch.Tensor, chunks: int = 1) -> torch.Tensor:
        """Logits ``[B]``. ``chunks`` > 1 scores that many equal batches stacked along dim 0 in one pass
        (e.g. real and fake); each batch gets the minibatch statistics it would get alone."""
        assert x.ndim == 4 and x.shape[1:] == (self.channels, self.size, self.size), f"bad input {tuple(x.shape)}"
        if self.native != self.size:
            x = F.interpolate(x, size=(self.native, self.native), mode="bilinear", align_corners=False)
        x = self.blocks(self.from_image(x))
        x = self.mbstd(x, chunks)
        if self.conv.channels_last:  # the concatenation would come out NCHW
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.conv(x)
        logits: torch.Tensor = self.out(self.fc(x.flatten(1)))
        return logits.squeeze(1)
