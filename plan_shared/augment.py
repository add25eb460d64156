"""Differentiable augmentation (DiffAugment-style) applied to real and fake images before D.

Every op is differentiable with respect to the images, so G's gradient passes
through; randomness comes from an explicit ``torch.Generator`` so that training
resumes exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _rand(shape: tuple[int, ...], x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=gen).to(x.device, x.dtype)


def translation(x: torch.Tensor, gen: torch.Generator | None, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its size (integer pixels), zero padding."""
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = (_rand((b,), x, gen) * (2 * sh + 1)).floor() - sh
    tx = (_rand((b,), x, gen) * (2 * sw + 1)).floor() - sw
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, 0, 2] = -2 * tx / w
    theta[:, 1, 2] = -2 * ty / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def cutout(x: torch.Tensor, gen: torch.Generator | None, ratio: float = 0.25) -> torch.Tensor:
    """Zero a random square of ``ratio`` x size per image."""
    b, _, h, w = x.shape
    ch, cw = max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
    cy = (_rand((b, 1, 1), x, gen) * (h - ch + 1)).floor()
    cx = (_rand((b, 1, 1), x, gen) * (w - cw + 1)).floor()
    yy = torch.arange(h, device=x.device, dtype=x.dtype).reshape(1, h, 1)
    xx = torch.arange(w, device=x.device, dtype=x.dtype).reshape(1, 1, w)
    inside = (yy >= cy) & (yy < cy + ch) & (xx >= cx) & (xx < cx + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def color(x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Random brightness, saturation (RGB only) and contrast."""
    b = x.shape[0]
    x = x + (_rand((b, 1, 1, 1), x, gen) - 0.5) * 0.5
    if x.shape[1] > 1:
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (_rand((b, 1, 1, 1), x, gen) * 2) + mean
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_rand((b, 1, 1, 1), x, gen) + 0.5) + mean


_POLICIES = {"color": color, "translation": translation, "cutout": cutout}


def diff_augment(x: torch.Tensor, policies: Sequence[str], gen: torch.Generator | None = None) -> torch.Tensor:
    """Apply the named policies in the canonical order color, translation, cutout."""
    unknown = set(policies) - set(_POLICIES)
    if unknown:
        raise ValueError(f"unknown augmentation policies {sorted(unknown)}; known: {sorted(_POLICIES)}")
    for name in ("color", "translation", "cutout"):
        if name in policies:
            x = _POLICIES[name](x, gen)
    return x
