"""B3 inversion: one W vector per real image (method.md B3).

Batched Adam in W (one vector per image, broadcast to every layer), starting from
``G.w_avg``. Loss per image = ``pixel_weight * MSE(G(w), x)`` +
``feature_weight * (1 - cos(f(G(w)), f(x)))`` where ``f`` is the feature map of a
network trained locally on the site's data (phi_id's features in the pipeline; nothing
downloaded). The images of one batch are independent, so the summed loss gives every w
its own gradient::

    w, err = invert(G, x, feature_net=phi_id, steps=60, lr=0.05, batch_size=256)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from plan_shared import progress as P


def invert(
    G: nn.Module,
    images: torch.Tensor,
    feature_net: Optional[nn.Module] = None,
    steps: int = 60,
    lr: float = 0.05,
    batch_size: int = 256,
    pixel_weight: float = 1.0,
    feature_weight: float = 1.0,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(w [N, w_dim], recon_mse [N])`` (w and errors on CPU).

    ``recon_mse`` is the final per-image mean squared pixel error (images in [-1, 1]).
    """
    dev = G.w_avg.device
    n = images.shape[0]
    ws, errs = [], []
    if feature_net is not None:
        feature_net.eval()
    total = ((n + batch_size - 1) // batch_size) * steps
    bar = P.bar(total=total, desc="inversion", unit="batch-steps", show=progress)
    for i in range(0, n, batch_size):
        x = images[i : i + batch_size].to(dev)
        b = x.shape[0]
        w = G.w_avg.detach().clone().unsqueeze(0).repeat(b, 1).requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        with torch.no_grad():
            f_target = F.normalize(feature_net.features(x), dim=1) if feature_net is not None and feature_weight > 0 else None
        for _ in range(steps):
            img = G.render(w)
            per = (img - x).pow(2).flatten(1).mean(1) * pixel_weight
            if f_target is not None:
                f = F.normalize(feature_net.features(img), dim=1)
                per = per + feature_weight * (1 - (f * f_target).sum(1))
            opt.zero_grad(set_to_none=True)
            per.sum().backward()
            opt.step()
            bar.update(1)
        with torch.no_grad():
            errs.append((G.render(w) - x).pow(2).flatten(1).mean(1).cpu())
        ws.append(w.detach().cpu())
    bar.close()
    if not ws:
        return torch.zeros(0, G.w_avg.shape[0]), torch.zeros(0)
    return torch.cat(ws), torch.cat(errs)
