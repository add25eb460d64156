"""B5 PLAN path optimisation, batched over many paths (method.md B5).

A path joins two anchors ``w_a, w_b`` of class ``y`` with ``T`` points; the ``T-2``
interior points are free and start evenly spaced on the straight line. All paths are
one tensor ``P [paths, T-2, w_dim]`` with one label per path. Per path::

    L = l_dist * L_dist + l_id * L_id + l_class * L_class
    L_dist  = sum_{i=0}^{T-2} ||w_{i+1} - w_i||^2          (sum over the T-1 segments)
    L_id    = mean_i KL(U || softmax phi_id(G(w_i)))        (mean over interior points)
    L_class = mean_i CE(phi_class(G(w_i)), y)

and the optimised objective is the sum over paths (each path's gradient is independent
of how many paths share the batch). The classifier terms are separable per point, so the
flattened interior points are processed in chunks of ``chunk`` images: forward + backward
per chunk, gradients accumulating into ``P.grad``; L_dist is added on the whole tensor.
Peak memory is set by ``chunk``, not by ``paths x T``. Only W is optimised (the images
stay on the generator's manifold); ``max_offset`` optionally bounds each point's distance
from its straight-line start.

    paths = optimise_paths(G, phi_id, phi_class, wa, wb, labels, T=50, steps=40)
    lin = linear_paths(wa, wb, T)                       # baseline, same anchors
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from plan_shared import progress as P
from plan_shared.nav_objectives import Objective, kl_uniform, point_terms

__all__ = ["NavWeights", "dist_loss", "kl_uniform", "linear_paths", "optimise_paths", "path_losses"]


@dataclass
class NavWeights:
    lambda_dist: float = 1.0
    lambda_id: float = 1.2
    lambda_class: float = 12.0


def linear_paths(wa: torch.Tensor, wb: torch.Tensor, T: int) -> torch.Tensor:
    """Full straight paths ``[paths, T, w_dim]`` (endpoints included, evenly spaced)."""
    t = torch.linspace(0, 1, T, dtype=wa.dtype, device=wa.device).view(1, T, 1)
    return wa.unsqueeze(1) + t * (wb - wa).unsqueeze(1)


def dist_loss(full: torch.Tensor) -> torch.Tensor:
    """Per path sum of squared segment lengths; ``full [paths, T, w_dim]`` -> ``[paths]``."""
    return (full[:, 1:] - full[:, :-1]).pow(2).sum(dim=(1, 2))


def path_losses(
    G: nn.Module, phi_id: nn.Module, phi_class: nn.Module, full: torch.Tensor, labels: torch.Tensor,
    objective: Objective | None = None, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per path L_dist and the per-point terms (means over interior points) for full paths ``[paths, T, w_dim]``
    (no chunking; tests, reports). ``objective`` None: the published L_id and L_class (plain KL and CE)."""
    p, T, d = full.shape
    obj = objective or Objective.published(1.0, 1.0)
    inner = full[:, 1:-1].reshape(-1, d)
    img = G.render(inner)
    img_lin = G.render(linear_paths(full[:, 0], full[:, -1], T)[:, 1:-1].reshape(-1, d)) if obj.needs_linear_image else None
    terms = point_terms(img, img_lin, phi_id, phi_class, labels.repeat_interleave(T - 2), obj,
                        torch.Generator().manual_seed(seed))
    return {"dist": dist_loss(full)} | {k: v.view(p, T - 2).mean(1) for k, v in terms.items()}


def optimise_paths(
    G: nn.Module,
    phi_id: nn.Module,
    phi_class: nn.Module,
    wa: torch.Tensor,
    wb: torch.Tensor,
    labels: torch.Tensor,
    T: int = 50,
    steps: int = 40,
    lr: float = 0.1,
    weights: NavWeights | None = None,
    chunk: int = 256,
    max_offset: Optional[float] = None,
    progress: bool = True,
    history: Optional[list] = None,
    w_scale: float = 1.0,
    objective: Objective | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Optimise all paths together; returns full paths ``[paths, T, w_dim]`` (detached, on wa's device).

    ``objective`` (plan_shared.nav_objectives, e.g. ``Objective.from_config(cfg.navigation)``) sets the per-point
    terms (EOT views, class margin, low-pass bound); None = the published L_id/L_class with ``weights``'
    lambdas. ``seed`` drives the EOT views' random draws.

    ``w_scale`` (sigma_W, see :func:`w_std`): the optimisation runs in standardised
    coordinates u = w / w_scale, so ``lr``, ``L_dist`` and ``max_offset`` have the meaning
    they have in StyleGAN2's W (per-coordinate std ~1) whatever the generator's W scale.
    ``history``, when a list, receives per step the summed loss terms over all paths.
    """
    if T < 3:
        raise ValueError("T must be >= 3 (two anchors + at least one free point)")
    wt = weights or NavWeights()
    for net in (G, phi_id, phi_class):
        net.eval()
        for q in net.parameters():
            q.requires_grad_(False)
    dev = wa.device
    sc = float(w_scale)
    wa, wb = wa / sc, wb / sc
    labels = labels.to(dev).long()
    p, d = wa.shape
    start = linear_paths(wa, wb, T)[:, 1:-1].contiguous()
    # Parametrise the free points as offsets D from the straight line (P = start + D, D = 0 at
    # the start). With fixed ends, L_dist = (T-1)|v|^2 + sum_segments |D_{i+1} - D_i|^2 exactly
    # (v = (w_b - w_a)/(T-1); the cross term telescopes to <v, D_end - D_0> = 0), so its
    # gradient on the straight line is exactly 0 in floating point and Adam does not
    # amplify rounding noise into a random walk when the classifier terms are off.
    seg_const = (T - 1) * ((wb - wa) / (T - 1)).pow(2).sum(1)  # [paths]
    D = torch.zeros_like(start).requires_grad_(True)
    opt = torch.optim.Adam([D], lr=lr)
    zero_end = torch.zeros(p, 1, d, device=dev, dtype=start.dtype)
    flat_start = start.view(-1, d)
    n_inner = T - 2
    flat_labels = labels.repeat_interleave(n_inner)
    obj = objective or Objective.published(wt.lambda_id, wt.lambda_class)
    gen = torch.Generator().manual_seed(seed)
    need_cls = obj.needs_classifiers or obj.needs_linear_image
    bar = P.bar(range(steps), desc=f"navigation ({p} paths)", unit="steps", show=progress)
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        sums = {"dist": 0.0, "id": 0.0, "class": 0.0}
        if need_cls:
            flat = D.view(-1, d)
            for s in range(0, flat.shape[0], chunk):
                w = flat_start[s : s + chunk] + flat[s : s + chunk]
                img = G.render(w * sc)
                img_lin = None
                if obj.needs_linear_image:
                    with torch.no_grad():
                        img_lin = G.render(flat_start[s : s + chunk] * sc)
                terms = point_terms(img, img_lin, phi_id, phi_class, flat_labels[s : s + chunk], obj, gen)
                loss = torch.zeros((), device=dev)
                for k, v in terms.items():
                    loss = loss + obj.weight(k) * v.sum() / n_inner
                    sums[k] = sums.get(k, 0.0) + float(v.detach().sum()) / n_inner
                loss.backward()  # accumulates into D.grad through the view
        ld = seg_const.sum() + dist_loss(torch.cat([zero_end, D, zero_end], dim=1)).sum()
        (wt.lambda_dist * ld).backward()
        sums["dist"] = float(ld.detach())
        opt.step()
        if max_offset is not None:
            with torch.no_grad():
                norm = D.norm(dim=2, keepdim=True).clamp(min=1e-12)
                D.mul_((max_offset / norm).clamp(max=1.0))
        if history is not None:
            history.append(sums)
        bar.set_postfix(dist=f"{sums['dist'] / p:.3g}", kl=f"{sums['id'] / p:.3g}", ce=f"{sums['class'] / p:.3g}", refresh=False)
    with torch.no_grad():
        return torch.cat([wa.unsqueeze(1), start + D.detach(), wb.unsqueeze(1)], dim=1) * sc


def sequential_reference(
    G: nn.Module,
    phi_id: nn.Module,
    phi_class: nn.Module,
    wa: torch.Tensor,
    wb: torch.Tensor,
    label: int,
    T: int = 50,
    steps: int = 40,
    lr: float = 0.1,
    weights: NavWeights | None = None,
    w_scale: float = 1.0,
) -> torch.Tensor:
    """Re-statement of the published loop for ONE path (all interior points in one batch,
    one backward per step); the baseline of benchmarks/navigation.py. Same loss as above."""
    wt = weights or NavWeights()
    sc = float(w_scale)
    wa, wb = wa / sc, wb / sc
    start = linear_paths(wa[None], wb[None], T)[0, 1:-1]
    P = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([P], lr=lr)
    y = torch.full((T - 2,), int(label), dtype=torch.long, device=wa.device)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        img = G.render(P * sc)
        full = torch.cat([wa[None], P, wb[None]], 0)
        loss = (
            wt.lambda_dist * (full[1:] - full[:-1]).pow(2).sum()
            + wt.lambda_id * kl_uniform(phi_id(img)).mean()
            + wt.lambda_class * F.cross_entropy(phi_class(img), y)
        )
        loss.backward()
        opt.step()
    return torch.cat([wa[None], P.detach(), wb[None]], 0) * sc


@torch.no_grad()
def w_std(G: nn.Module, n: int = 4096, seed: int = 0) -> float:
    """sigma_W: mean per-coordinate standard deviation of W over ``n`` mapping-network samples."""
    gen = torch.Generator().manual_seed(seed)
    return float(G.sample_w(n, gen).std(0).mean())


@torch.no_grad()
def random_samples(G: nn.Module, n: int, truncation: float = 0.7, seed: int = 0) -> torch.Tensor:
    """Plain GAN samples in W (the random baseline)."""
    gen = torch.Generator().manual_seed(seed)
    return G.sample_w(n, gen, truncation=truncation)
