"""B3 inversion: one W vector per real image (method.md B3), settings from config ``inversion``.

Batched Adam in W (one vector per image, broadcast to every layer), starting from
``G.w_avg`` for ``inversion.steps`` steps, or from ``w_init`` (a learned encoder's E(x),
plan_shared.encoder) for ``inversion.encoder.refine_steps`` steps. Loss per image =
``pixel_weight * MSE(G(w), x)`` + ``feature_weight * (1 - cos(f(G(w)), f(x)))`` where ``f`` is
the feature map of a network trained locally on the site's data (phi_id's features in the
pipeline; nothing downloaded). The images of one batch are independent, so the summed loss
gives every w its own gradient. The learning rate is ``inversion.lr * sigma_W`` from w_avg, and
``inversion.encoder.refine_lr * sigma_W`` (default inversion.lr; constant or cosine-decayed,
``refine_schedule``) from ``w_init``::

    res = invert(G, x, cfg.inversion, sigma_w, feature_net=phi_id)
    res = invert(G, x, cfg.inversion, sigma_w, feature_net=phi_id, w_init=encode(E, x))
    res.w, res.mse, res.generator_evals
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from plan_shared import progress as P
from plan_shared.config import InversionConfig


class FeatureNet(Protocol):
    """A network with an embedding (plan_shared.models.Classifier.features)."""

    def features(self, x: torch.Tensor) -> torch.Tensor: ...

    def eval(self) -> Any: ...


@dataclass
class InversionResult:
    """Per image, the visited ``w [N, w_dim]`` with the lowest inversion loss (the start point, each
    step's iterate and the last one) and its errors (CPU); images in [-1, 1]."""

    w: torch.Tensor
    mse: torch.Tensor  # per-image mean squared pixel error
    feature_loss: torch.Tensor | None  # per-image 1 - cos of the feature net's features (None without one)
    steps: int
    generator_evals: int  # generator forward(+backward) passes of the optimisation: images x steps (the final
    # error's one forward per image is a measurement, not counted)


def reconstruction_losses(G: Any, w: torch.Tensor, x: torch.Tensor, feature_net: FeatureNet | None,
                          f_target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-image pixel MSE of ``G.render(w)`` vs ``x`` and, with ``f_target`` (unit feature vectors of
    ``x``), 1 - cos of the feature net's features (the two terms of the inversion loss)."""
    img = G.render(w)
    mse = (img - x).pow(2).flatten(1).mean(1)
    if f_target is None or feature_net is None:
        return mse, None
    f = F.normalize(feature_net.features(img), dim=1)
    return mse, 1 - (f * f_target).sum(1)


def inversion_loss(cfg: InversionConfig, mse: torch.Tensor, fl: torch.Tensor | None) -> torch.Tensor:
    """Per-image inversion loss from :func:`reconstruction_losses`' two terms, weighted as ``cfg`` says."""
    return cfg.pixel_weight * mse + (cfg.feature_weight * fl if fl is not None else 0.0)


class _Best:
    """Per image, the visited w with the lowest inversion loss and its errors: Adam's last iterate is not
    always its best (a step can overshoot, and a refinement can start at a better point than it ends)."""

    def __init__(self) -> None:
        self.w: torch.Tensor | None = None
        self.loss = self.mse = torch.zeros(0)
        self.fl: torch.Tensor | None = None

    def offer(self, w: torch.Tensor, loss: torch.Tensor, mse: torch.Tensor, fl: torch.Tensor | None) -> None:
        w, loss, mse = w.detach(), loss.detach(), mse.detach()
        fl = fl.detach() if fl is not None else None
        if self.w is None:
            self.w, self.loss, self.mse, self.fl = w.clone(), loss, mse, fl
            return
        better = loss < self.loss
        self.w = torch.where(better[:, None], w, self.w)
        self.loss = torch.where(better, loss, self.loss)
        self.mse = torch.where(better, mse, self.mse)
        if fl is not None and self.fl is not None:
            self.fl = torch.where(better, fl, self.fl)


def invert(
    G: Any,
    images: torch.Tensor,
    cfg: InversionConfig,
    sigma_w: float,
    feature_net: FeatureNet | None = None,
    w_init: torch.Tensor | None = None,
    steps: int | None = None,
    progress: bool = True,
) -> InversionResult:
    """Invert ``images [N, C, H, W]`` (any device) into W with the settings of ``cfg``.

    ``steps`` (default: ``cfg.steps`` from w_avg, ``cfg.encoder.refine_steps`` from ``w_init``)
    overrides the number of Adam steps, e.g. for a benchmark; 0 returns the start point and its errors.
    """
    dev = G.w_avg.device
    n = images.shape[0]
    if w_init is not None and tuple(w_init.shape) != (n, G.w_dim):
        raise ValueError(f"inversion: w_init must be [{n}, {G.w_dim}], got {tuple(w_init.shape)}")
    if steps is None:
        steps = cfg.steps if w_init is None else cfg.encoder.refine_steps
    if steps < 0:
        raise ValueError(f"inversion: steps must be >= 0, got {steps}")
    if w_init is None:
        lr, cosine = cfg.lr, False
    else:  # refinement from a learned encoder's start
        lr = cfg.encoder.refine_lr if cfg.encoder.refine_lr is not None else cfg.lr
        cosine = cfg.encoder.refine_schedule == "cosine"
    bs = cfg.batch_size
    use_f = feature_net is not None and cfg.feature_weight > 0
    if feature_net is not None:
        feature_net.eval()
    ws, errs, ferrs = [], [], []
    total = ((n + bs - 1) // bs) * steps
    bar = P.bar(total=total, desc="inversion", unit="batch-steps", show=progress)
    for i in range(0, n, bs):
        x = images[i : i + bs].to(dev)
        b = x.shape[0]
        if w_init is None:
            w0 = G.w_avg.detach().unsqueeze(0).repeat(b, 1)
        else:
            w0 = w_init[i : i + bs].detach().to(dev, torch.float32)
        w = w0.clone().requires_grad_(True)
        with torch.no_grad():
            f_target = F.normalize(feature_net.features(x), dim=1) if use_f and feature_net is not None else None
        best = _Best()
        if steps:
            opt = torch.optim.Adam([w], lr=lr * sigma_w)
            sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
                     if cosine else None)
            for _ in range(steps):
                mse, fl = reconstruction_losses(G, w, x, feature_net, f_target)
                per = inversion_loss(cfg, mse, fl)
                best.offer(w, per, mse, fl)  # the loss of the w before this step: free, it is computed anyway
                opt.zero_grad(set_to_none=True)
                per.sum().backward()
                opt.step()
                if sched is not None:
                    sched.step()
                bar.update(1)
        with torch.no_grad():
            mse, fl = reconstruction_losses(G, w, x, feature_net, f_target)
            best.offer(w, inversion_loss(cfg, mse, fl), mse, fl)
        errs.append(best.mse.cpu())
        if best.fl is not None:
            ferrs.append(best.fl.cpu())
        assert best.w is not None  # offered at least once, after the loop
        ws.append(best.w.cpu())
    bar.close()
    if not ws:
        return InversionResult(torch.zeros(0, G.w_dim), torch.zeros(0), torch.zeros(0) if use_f else None, steps, 0)
    return InversionResult(
        w=torch.cat(ws),
        mse=torch.cat(errs),
        feature_loss=torch.cat(ferrs) if ferrs else None,
        steps=steps,
        generator_evals=n * steps,
    )
