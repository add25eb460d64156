"""Classifier backbone for the identity, class and downstream classifiers.

A small residual CNN (``depth`` stages, each halving the resolution and doubling
the width) pooled to a ``pool_grid`` x ``pool_grid`` map (1 = global average; 4 keeps
the coarse layout, which identity recognition of look-alike X-rays needs) and
projected to a ``feature_dim`` embedding, followed by either a linear head
or a cosine head (normalised features x normalised class weights x a learnable
scale). method.md section 6: an identity classifier over thousands of identities
only trains with the cosine head.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class _Stage(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(out_ch)
        self.conv1 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn0(self.conv0(x)))
        y = self.bn1(self.conv1(y))
        return F.max_pool2d(F.relu(y + self.skip(x)), 2)


class CosineHead(nn.Module):
    def __init__(self, feature_dim: int, num_classes: int, scale: float = 20.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, feature_dim) * 0.01)
        self.log_scale = nn.Parameter(torch.tensor(float(scale)).log())

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(f, dim=1), F.normalize(self.weight, dim=1)) * self.log_scale.exp()


class Classifier(nn.Module):
    def __init__(
        self,
        num_classes: int,
        channels: int = 1,
        size: int = 32,
        width: int = 32,
        depth: int = 3,
        feature_dim: int = 128,
        head: Literal["linear", "cosine"] = "linear",
        dropout: float = 0.0,
        pool_grid: int = 1,
    ):
        super().__init__()
        if size >> depth < 1:
            raise ValueError(f"classifier depth {depth} is too deep for {size}px images")
        self.num_classes, self.channels, self.size = num_classes, channels, size
        widths = [width << i for i in range(depth)]
        stages, in_ch = [], channels
        for w in widths:
            stages.append(_Stage(in_ch, w))
            in_ch = w
        self.stages = nn.Sequential(*stages)
        self.pool_grid = pool_grid
        self.feature_dim = feature_dim
        self.embed = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_ch * pool_grid * pool_grid, feature_dim))
        self.head: nn.Module = CosineHead(feature_dim, num_classes) if head == "cosine" else nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding ``[B, feature_dim]`` (used for distances and Frechet scores)."""
        assert x.ndim == 4 and x.shape[1] == self.channels, f"expected [B, {self.channels}, H, W], got {tuple(x.shape)}"
        h = self.stages(x)
        emb: torch.Tensor = self.embed(F.adaptive_avg_pool2d(h, self.pool_grid))
        return emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits
