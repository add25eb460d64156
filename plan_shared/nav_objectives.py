"""The per-point loss terms of PLAN navigation (method.md B5), robust variants included (issue #11.1).

``optimise_paths`` renders a chunk of path points and asks :func:`point_terms` for their
per-image terms; the weighted sum is what it optimises. The terms::

    id     KL(U || softmax phi_id(v))          averaged over the views v of the image
    class  CE(phi_class(v), y) * [p_y(v) < class_target]   (margin: no push past the target)
    smooth mean_px (HP(G(w) - G(w_lin)))^2     HP(x) = x - GaussBlur_sigma(x)   (low-pass bound)
    real   relu(D(G(w_lin)) - D(G(w)))         (realism hinge: D's logit may not fall below the linear point's)

Views: the image itself (``eot_samples`` 0, the published loss) or ``eot_samples`` random
transformations of it (expectation over transformations: Gaussian blur with sigma drawn
per view, additive noise, a small shift; fresh draws each call), so a pixel-level pattern
that lowers phi_id's confidence on one exact render does not lower the expected loss. The
smooth term compares a point's image with the image of its straight-line start and charges
only the fine (high-pass) part of the change: coarse anatomy may move, texture may not.

    obj = Objective.from_config(cfg.navigation)
    terms = point_terms(img, img_lin, phi_id, phi_class, labels, obj, gen)   # {"id": [n], "class": [n], ...}
    loss = sum(obj.weight(k) * v.sum() for k, v in terms.items()) / n_inner
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plan_shared.config import NavigationConfig


@dataclass(frozen=True)
class Objective:
    """Weights and knobs of the per-point terms (built from NavigationConfig; no defaults of its own)."""

    lambda_id: float
    lambda_class: float
    class_target: float | None
    eot_samples: int
    eot_blur: tuple[float, float]
    eot_noise: float
    eot_shift: int
    lambda_smooth: float
    smooth_sigma: float
    lambda_real: float = 0.0

    @classmethod
    def from_config(cls, nc: NavigationConfig) -> Objective:
        return cls(nc.lambda_id, nc.lambda_class, nc.class_target, nc.eot_samples, (nc.eot_blur[0], nc.eot_blur[1]),
                   nc.eot_noise, nc.eot_shift, nc.lambda_smooth, nc.smooth_sigma, nc.lambda_real)

    @classmethod
    def published(cls, lambda_id: float, lambda_class: float) -> Objective:
        """The published loss: plain KL and CE on the render, no margin, no smoothness term."""
        return cls(lambda_id, lambda_class, None, 0, (0.0, 0.0), 0.0, 0, 0.0, 1.0)

    def weight(self, term: str) -> float:
        return {"id": self.lambda_id, "class": self.lambda_class, "smooth": self.lambda_smooth, "real": self.lambda_real}[term]

    @property
    def needs_classifiers(self) -> bool:
        return self.lambda_id > 0 or self.lambda_class > 0

    @property
    def needs_linear_image(self) -> bool:
        return self.lambda_smooth > 0 or self.lambda_real > 0


def kl_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Per row KL(U || softmax(logits)) = -log n - mean_j log p_j  (>= 0, 0 iff uniform)."""
    n = logits.shape[1]
    logp = F.log_softmax(logits.float(), dim=1)
    return -math.log(n) - logp.mean(1)


def margin_ce(logits: torch.Tensor, labels: torch.Tensor, target: float | None) -> torch.Tensor:
    """Per row CE(logits, y), zeroed (value and gradient) where p_y >= ``target``; plain CE for None."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    if target is None:
        return ce
    below = (torch.exp(-ce) < target).to(ce.dtype).detach()
    return ce * below


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image ``x [n, C, H, W]`` with its own Gaussian ``sigma [n]`` (pixels; 0 = unchanged), reflect padding."""
    n, c, h, w = x.shape
    smax = float(sigma.max()) if n else 0.0
    if smax <= 0:
        return x
    r = max(1, min(math.ceil(3 * smax), h - 1, w - 1))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.device, x.dtype).clamp(min=1e-6).view(n, 1)  # sigma ~0: a delta kernel
    k1 = torch.exp(-0.5 * (t.view(1, -1) / s) ** 2)
    k1 = k1 / k1.sum(1, keepdim=True)
    kx = k1.repeat_interleave(c, 0).view(n * c, 1, 1, 2 * r + 1)
    ky = kx.view(n * c, 1, 2 * r + 1, 1)
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(F.conv2d(y, kx, groups=n * c), ky, groups=n * c)
    return y.view(n, c, h, w)


def _shift(x: torch.Tensor, s: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-s, s]^2 (reflect padding); differentiable in x."""
    n, c, h, w = x.shape
    s = min(s, h - 1, w - 1)
    pad = F.pad(x, (s, s, s, s), mode="reflect")
    dy = torch.randint(0, 2 * s + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * s + 1, (n,), generator=gen)
    iy = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)
    ix = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)
    rows = torch.gather(pad, 2, iy.view(n, 1, h, 1).expand(n, c, h, pad.shape[3]))
    return torch.gather(rows, 3, ix.view(n, 1, 1, w).expand(n, c, h, w))


def eot_views(img: torch.Tensor, obj: Objective, gen: torch.Generator) -> torch.Tensor:
    """``[S * n, C, H, W]``: S = obj.eot_samples random views of every image (view-major); the image itself if S = 0."""
    if obj.eot_samples <= 0:
        return img
    x = img.repeat(obj.eot_samples, 1, 1, 1)
    if obj.eot_shift > 0:
        x = _shift(x, obj.eot_shift, gen)
    lo, hi = obj.eot_blur
    if hi > 0:
        sigma = lo + (hi - lo) * torch.rand(x.shape[0], generator=gen)
        x = gaussian_blur(x, sigma)
    if obj.eot_noise > 0:
        x = x + obj.eot_noise * torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    return x


def high_pass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x - GaussBlur_sigma(x)``: the fine part of an image (or of an image difference)."""
    return x - gaussian_blur(x, torch.full((x.shape[0],), float(sigma)))


def point_terms(
    img: torch.Tensor,
    img_lin: torch.Tensor | None,
    phi_id: nn.Module,
    phi_class: nn.Module,
    labels: torch.Tensor,
    obj: Objective,
    gen: torch.Generator,
    disc: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Unweighted per-image terms ``{name: [n]}`` for the rendered points ``img [n, C, H, W]``.

    ``img_lin``: the images of the points' straight-line starts (needed when lambda_smooth or lambda_real > 0);
    ``disc`` the generator's discriminator (logits ``[n]``; needed when lambda_real > 0).
    Only terms with a positive weight are computed.
    """
    n = img.shape[0]
    out: dict[str, torch.Tensor] = {}
    if obj.needs_classifiers:
        views = eot_views(img, obj, gen)
        s = max(obj.eot_samples, 1)
        if obj.lambda_id > 0:
            out["id"] = kl_uniform(phi_id(views)).view(s, n).mean(0)
        if obj.lambda_class > 0:
            y = labels.to(img.device).long().repeat(s)
            out["class"] = margin_ce(phi_class(views), y, obj.class_target).view(s, n).mean(0)
    if obj.lambda_smooth > 0:
        if img_lin is None:
            raise ValueError("point_terms: lambda_smooth > 0 needs img_lin, the straight-line points' images")
        hp = high_pass(img - img_lin.detach(), obj.smooth_sigma)
        out["smooth"] = hp.pow(2).flatten(1).mean(1)
    if obj.lambda_real > 0:
        if disc is None or img_lin is None:
            raise ValueError("point_terms: lambda_real > 0 needs disc (the discriminator) and img_lin")
        with torch.no_grad():
            ref = disc(img_lin).float()
        out["real"] = F.relu(ref - disc(img).float())
    return out
