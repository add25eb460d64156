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
stay on the generator's manifold); ``max_offset`` (absolute) and ``trust_ratio`` (relative to the
anchor-pair distance) optionally bound each point's distance from its straight-line start: a trust
region that keeps L_id from dragging the coarse layers off the realistic manifold (:func:`offset_bound`).

W+ restriction (``navigation.layers: coarse_middle``): a point's optimised w drives only the
coarse and middle synthesis layers (blocks below ``navigation.fine_from`` px); the fine layers
get the point's straight-line w, i.e. exactly the linear path's. The path tensor keeps the
navigated w ``[paths, T, w_dim]``; :func:`path_styles` turns it into the per-layer styles
``[paths, T, num_ws, w_dim]`` that are rendered (``G.render`` takes W or W+).

    res = optimise_paths(G, phi_id, phi_class, wa, wb, labels, cfg.navigation, w_scale=w_std(G))
    res.paths                                            # [paths, T, w_dim]
    imgs = G.render(path_styles(G, res.paths, cfg.navigation).flatten(0, 1))   # W or W+ per point
    lin = linear_paths(wa, wb, T)                       # baseline, same anchors

With ``navigation.early_stop_patience`` each path stops on a plateau of its own loss and its
points leave the chunks (time saved); ``navigation.devices`` shards the paths over workers.
:func:`official_loop` is the published loop (one path at a time), the benchmark reference.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plan_shared import progress as P
from plan_shared.config import NavigationConfig
from plan_shared.models import StyleGenerator
from plan_shared.nav_objectives import Objective, kl_uniform, point_terms

__all__ = ["NavResult", "compose_styles", "dist_loss", "free_layers", "kl_uniform", "linear_paths", "offset_bound",
           "official_loop", "optimise_paths", "path_losses", "path_styles", "project_offsets", "random_samples",
           "sequential_reference", "w_std"]


def linear_paths(wa: torch.Tensor, wb: torch.Tensor, T: int) -> torch.Tensor:
    """Full straight paths ``[paths, T, w_dim]`` (endpoints included, evenly spaced)."""
    t = torch.linspace(0, 1, T, dtype=wa.dtype, device=wa.device).view(1, T, 1)
    return wa.unsqueeze(1) + t * (wb - wa).unsqueeze(1)


def free_layers(G: StyleGenerator, nav: NavigationConfig) -> torch.Tensor | None:
    """``[num_ws]`` bool: the style inputs navigation moves under ``nav.layers`` (None = all of them, plain W).

    coarse_middle: the inputs of the blocks below ``nav.fine_from`` px (``G.synthesis.ws_resolution``)."""
    if nav.layers == "all":
        return None
    res = torch.as_tensor(G.synthesis.ws_resolution)
    free = res < nav.fine_from
    if bool(free.all()):  # a generator without blocks at fine_from px or above: nothing to hold, plain W
        return None
    return free.to(G.w_avg.device)


def compose_styles(w: torch.Tensor, w_lin: torch.Tensor, free: torch.Tensor | None) -> torch.Tensor:
    """Per-layer styles of points ``w [..., w_dim]`` with straight-line starts ``w_lin`` (same shape).

    ``free`` None: ``w`` itself (W). Else ``[..., num_ws, w_dim]``: ``w`` in the free layers, ``w_lin`` in the
    others; the held layers carry no gradient to ``w``."""
    if free is None:
        return w
    f = free.to(w.device).view(*([1] * (w.ndim - 1)), -1, 1)
    return torch.where(f, w.unsqueeze(-2), w_lin.unsqueeze(-2))


def path_styles(G: StyleGenerator, full: torch.Tensor, nav: NavigationConfig) -> torch.Tensor:
    """What to render for full paths ``[paths, T, w_dim]`` under ``nav.layers``: the paths themselves (all) or
    ``[paths, T, num_ws, w_dim]`` with the fine layers on the straight line between the same anchors."""
    free = free_layers(G, nav)
    if free is None:
        return full
    return compose_styles(full, linear_paths(full[:, 0], full[:, -1], full.shape[1]), free)


def offset_bound(nav: NavigationConfig, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor | None:
    """Per path ``[paths]`` the largest W offset a point may take from its straight-line start: ``nav.max_offset``
    and ``nav.trust_ratio * ||wb - wa||`` (anchors in the same coordinates as the offsets), the tighter of the two;
    None when neither is set."""
    bound: torch.Tensor | None = None
    if nav.trust_ratio is not None:
        bound = nav.trust_ratio * (wb - wa).norm(dim=1)
    if nav.max_offset is not None:
        cap = torch.full((wa.shape[0],), float(nav.max_offset), dtype=wa.dtype, device=wa.device)
        bound = cap if bound is None else torch.minimum(bound, cap)
    return bound


def project_offsets(D: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """In place: shrink every offset ``D [paths, n, w_dim]`` whose norm exceeds its path's ``bound [paths]`` onto
    that sphere (radial projection, the direction kept); returns ``D``."""
    norm = D.norm(dim=2, keepdim=True).clamp(min=1e-12)
    return D.mul_((bound.view(-1, 1, 1).to(D.dtype) / norm).clamp(max=1.0))


def dist_loss(full: torch.Tensor) -> torch.Tensor:
    """Per path sum of squared segment lengths; ``full [paths, T, w_dim]`` -> ``[paths]``."""
    return (full[:, 1:] - full[:, :-1]).pow(2).sum(dim=(1, 2))


def path_losses(
    G: StyleGenerator, phi_id: nn.Module, phi_class: nn.Module, full: torch.Tensor, labels: torch.Tensor,
    objective: Objective | None = None, seed: int = 0, free: torch.Tensor | None = None, disc: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Per path L_dist and the per-point terms (means over interior points) for full paths ``[paths, T, w_dim]``
    (no chunking; tests, reports). ``objective`` None: the published L_id and L_class (plain KL and CE);
    ``free`` the navigated layers (:func:`free_layers`; None = all); ``disc`` the discriminator (realism hinge)."""
    p, T, d = full.shape
    obj = objective or Objective.published(1.0, 1.0)
    inner = full[:, 1:-1].reshape(-1, d)
    lin_inner = linear_paths(full[:, 0], full[:, -1], T)[:, 1:-1].reshape(-1, d)
    img = G.render(compose_styles(inner, lin_inner, free))
    img_lin = G.render(lin_inner) if obj.needs_linear_image else None
    terms = point_terms(img, img_lin, phi_id, phi_class, labels.repeat_interleave(T - 2), obj,
                        torch.Generator().manual_seed(seed), disc)
    return {"dist": dist_loss(full)} | {k: v.view(p, T - 2).mean(1) for k, v in terms.items()}


def resolve_devices(devices: Sequence[str] | None) -> list[torch.device]:
    """``navigation.devices`` as torch devices: null = every visible GPU, else ``[cpu]``; unknown GPUs are an error."""
    if not devices:
        n = torch.cuda.device_count()
        return [torch.device(f"cuda:{i}") for i in range(n)] or [torch.device("cpu")]
    out = [torch.device(d) for d in devices]
    for d in out:
        if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"navigation.devices: {d} is not visible here ({torch.cuda.device_count()} GPU(s))")
    return out


@dataclass
class NavResult:
    """What :func:`optimise_paths` returns.

    ``paths [paths, T, w_dim]`` detached, on wa's device; ``history`` per step the loss terms summed over all
    paths (a stopped path counts with its last measured terms) and ``seconds`` since the start;
    ``steps_run [paths]`` the steps each path took; ``final_loss [paths]`` the objective of the point each path
    holds (the last measured one; with early stopping the best measured one, and the point is that one);
    ``shards`` one entry per worker: device, its contiguous range of paths (first_path, paths), steps and seconds.
    """

    paths: torch.Tensor
    history: list[dict[str, float]]
    steps_run: torch.Tensor
    final_loss: torch.Tensor
    shards: list[dict[str, Any]] = field(default_factory=list)


POINT_TERMS = ("id", "class", "smooth", "real")  # the per-point terms of nav_objectives.point_terms, in history order


def _chunk_loss(
    G: StyleGenerator, phi_id: nn.Module, phi_class: nn.Module, w: torch.Tensor, y: torch.Tensor, obj: Objective,
    n_inner: int, gen: torch.Generator, w_lin: torch.Tensor, free: torch.Tensor | None = None,
    disc: nn.Module | None = None, precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-point part of the objective for one chunk of interior points ``w [n, w_dim]`` (real W scale)
    whose straight-line starts are ``w_lin``; ``free`` the navigated layers (None = all; else the others render
    ``w_lin``, :func:`compose_styles`).

    The terms are :func:`plan_shared.nav_objectives.point_terms` (L_id, L_class with its margin, EOT views,
    the low-pass bound and the realism hinge against the straight-line points ``w_lin``). Returns the scalar to back-propagate
    (weighted per-image terms / n_inner, so the sum over a path's chunks is the path's mean) and the per-image
    terms ``[n, 4]`` in :data:`POINT_TERMS` order (detached; zeros for a term whose weight is 0, which is then
    not evaluated). ``precision`` bf16: the networks' passes run under bfloat16 autocast, the terms are
    returned in fp32.
    """
    with torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        img = G.render(compose_styles(w, w_lin, free))
        img_lin = None
        if obj.needs_linear_image:
            with torch.no_grad():
                img_lin = G.render(w_lin)
        terms = point_terms(img, img_lin, phi_id, phi_class, y, obj, gen, disc)
    terms = {k: v.float() for k, v in terms.items()}
    zero = torch.zeros(w.shape[0], device=w.device)
    loss = torch.zeros((), device=w.device)
    for k, v in terms.items():
        loss = loss + obj.weight(k) * v.sum() / n_inner
    per_point = torch.stack([terms.get(k, zero).detach().float() for k in POINT_TERMS], 1)
    return loss, per_point


def optimise_paths(
    G: StyleGenerator,
    phi_id: nn.Module,
    phi_class: nn.Module,
    wa: torch.Tensor,
    wb: torch.Tensor,
    labels: torch.Tensor,
    nav: NavigationConfig,
    w_scale: float = 1.0,
    progress: bool = True,
    seed: int = 0,
    disc: nn.Module | None = None,
) -> NavResult:
    """Optimise all paths with the settings of the ``navigation`` config section; see :class:`NavResult`.

    The per-point terms are :class:`plan_shared.nav_objectives.Objective` built from ``nav`` (class margin,
    EOT views, low-pass bound, realism hinge: ``disc`` is the generator's discriminator, needed when
    ``nav.lambda_real`` > 0); ``seed`` drives the EOT views' random draws. ``nav.layers`` coarse_middle:
    each point's w drives only the coarse/middle layers, the fine ones render its straight-line start
    (render the result with :func:`path_styles`); L_dist is the navigated w's, as in W.

    ``w_scale`` (sigma_W, see :func:`w_std`): the optimisation runs in standardised
    coordinates u = w / w_scale, so ``lr``, ``L_dist`` and ``max_offset`` have the meaning
    they have in StyleGAN2's W (per-coordinate std ~1) whatever the generator's W scale.
    The paths are split over ``nav.devices`` (one thread per device, each with its own copies
    of the three networks); every path is optimised independently of the others, so the
    split changes nothing but float rounding.
    """
    if nav.T < 3:
        raise ValueError("T must be >= 3 (two anchors + at least one free point)")
    if nav.lambda_real > 0 and disc is None:
        raise ValueError("navigation.lambda_real > 0 needs the discriminator (optimise_paths disc=)")
    for net in (G, phi_id, phi_class, *([disc] if disc is not None else [])):
        net.eval()
        for q in net.parameters():
            q.requires_grad_(False)
    devices = resolve_devices(nav.devices)
    labels = labels.to(wa.device).long()
    shards = [s for s in torch.arange(wa.shape[0]).tensor_split(len(devices)) if len(s)] or [torch.arange(0)]
    home = next(G.parameters()).device

    def work(i: int) -> tuple[NavResult, float]:
        dev, idx = devices[i], shards[i]
        g, pi, pc, dc = G, phi_id, phi_class, disc
        if not (dev == home and i == 0):  # every other worker gets its own copies (threads share nothing mutable)
            g, pi, pc = copy.deepcopy(G).to(dev), copy.deepcopy(phi_id).to(dev), copy.deepcopy(phi_class).to(dev)
            dc = copy.deepcopy(disc).to(dev) if disc is not None else None
        t0 = time.perf_counter()
        r = _optimise_shard(g, pi, pc, wa[idx].to(dev), wb[idx].to(dev), labels[idx].to(dev), nav, w_scale,
                            progress, seed + i, dc, f"navigation ({len(idx)} paths{', ' + str(dev) if len(devices) > 1 else ''})")
        return r, time.perf_counter() - t0

    if len(shards) == 1:
        results = [work(0)]
    else:
        with ThreadPoolExecutor(max_workers=len(shards), thread_name_prefix="navigation") as ex:
            results = list(ex.map(work, range(len(shards))))
    n_hist = max(len(r.history) for r, _ in results)
    history = []
    for k in range(n_hist):
        parts = [r.history[min(k, len(r.history) - 1)] for r, _ in results if r.history]
        history.append({key: sum(h[key] for h in parts) if key != "seconds" else max(h[key] for h in parts) for key in parts[0]})
    return NavResult(
        paths=torch.cat([r.paths.to(wa.device) for r, _ in results]),
        history=history,
        steps_run=torch.cat([r.steps_run.cpu() for r, _ in results]),
        final_loss=torch.cat([r.final_loss.cpu() for r, _ in results]),
        shards=[{"device": str(devices[i]), "first_path": int(shards[i][0]) if len(shards[i]) else 0, "paths": len(shards[i]),
                 "steps": len(r.history), "seconds": dt}
                for i, (r, dt) in enumerate(results)],
    )


def _optimise_shard(
    G: StyleGenerator,
    phi_id: nn.Module,
    phi_class: nn.Module,
    wa: torch.Tensor,
    wb: torch.Tensor,
    labels: torch.Tensor,
    nav: NavigationConfig,
    w_scale: float,
    progress: bool,
    seed: int,
    disc: nn.Module | None,
    desc: str,
) -> NavResult:
    """One worker: all its paths as one tensor on wa's device (the loop of :func:`optimise_paths`)."""
    T, chunk = nav.T, nav.chunk
    objective = Objective.from_config(nav)
    free = free_layers(G, nav)
    gen = torch.Generator().manual_seed(seed)
    dev = wa.device
    sc = float(w_scale)
    wa_real, wb_real = wa, wb
    # the straight-line points in real W: what the held (fine) layers and the low-pass bound's reference render,
    # bit for bit the linear method's points between the same anchors
    flat_lin = linear_paths(wa_real, wb_real, T)[:, 1:-1].reshape(-1, wa.shape[1])
    wa, wb = wa / sc, wb / sc
    p, d = wa.shape
    n_inner = T - 2
    start = linear_paths(wa, wb, T)[:, 1:-1].contiguous()
    # Parametrise the free points as offsets D from the straight line (P = start + D, D = 0 at
    # the start). With fixed ends, L_dist = (T-1)|v|^2 + sum_segments |D_{i+1} - D_i|^2 exactly
    # (v = (w_b - w_a)/(T-1); the cross term telescopes to <v, D_end - D_0> = 0), so its
    # gradient on the straight line is exactly 0 in floating point and Adam does not
    # amplify rounding noise into a random walk when the classifier terms are off.
    seg_const = (T - 1) * ((wb - wa) / (T - 1)).pow(2).sum(1)  # [paths]
    D = torch.zeros_like(start).requires_grad_(True)
    bound = offset_bound(nav, wa, wb)  # [paths] trust region in standardised W, or None
    opt = torch.optim.Adam([D], lr=nav.lr)
    zero_end = torch.zeros(p, 1, d, device=dev, dtype=start.dtype)
    flat_start = start.view(-1, d)
    flat_labels = labels.repeat_interleave(n_inner)
    need_cls = objective.needs_classifiers or objective.needs_linear_image
    patience, rel_tol = nav.early_stop_patience, nav.early_stop_rel_tol
    lam = torch.tensor([nav.lambda_dist, *(objective.weight(k) for k in POINT_TERMS)], dtype=torch.float64)
    active = torch.ones(p, dtype=torch.bool)
    ref = torch.full((p,), math.inf, dtype=torch.float64)  # loss at the last step that counted as progress
    stale = torch.zeros(p, dtype=torch.long)
    steps_run = torch.zeros(p, dtype=torch.long)
    terms = torch.zeros(p, 1 + len(POINT_TERMS), dtype=torch.float64)  # per path dist + point terms (unweighted) of its point
    # with early stopping every path ends on the best point it measured (Adam's first steps may overshoot)
    best_obj = torch.full((p,), math.inf, dtype=torch.float64)
    best_D = torch.zeros_like(start) if patience is not None else None
    history: list[dict[str, float]] = []
    points = torch.arange(p * n_inner, device=dev)  # flat indices of the active paths' points
    t0 = time.perf_counter()
    bar = P.bar(range(nav.steps), desc=desc, unit="steps", show=progress)
    for _ in bar:
        if not bool(active.any()):
            break
        opt.zero_grad(set_to_none=True)
        pt = torch.zeros(p * n_inner, len(POINT_TERMS), device=dev)
        if need_cls:
            flat = D.view(-1, d)
            everyone = len(points) == p * n_inner
            for s in range(0, len(points), chunk):
                ix: slice | torch.Tensor = slice(s, s + chunk) if everyone else points[s : s + chunk]
                loss, pt[ix] = _chunk_loss(G, phi_id, phi_class, (flat_start[ix] + flat[ix]) * sc, flat_labels[ix], objective,
                                           n_inner, gen, flat_lin[ix], free, disc, nav.precision)
                torch.autograd.backward(loss)  # accumulates into D.grad through the gather
        ld_path = seg_const + dist_loss(torch.cat([zero_end, D, zero_end], dim=1))
        torch.autograd.backward(nav.lambda_dist * ld_path.sum())
        measured = torch.cat([ld_path.detach()[:, None], pt.view(p, n_inner, -1).mean(1)], 1)
        measured = measured.double().cpu()
        steps_run[active] += 1
        stop = torch.zeros(p, dtype=torch.bool)
        if best_D is None:
            terms[active] = measured[active]
        else:
            obj = measured @ lam
            improved = active & (obj < best_obj)
            if bool(improved.any()):
                best_obj[improved] = obj[improved]
                terms[improved] = measured[improved]
                best_D[improved.to(dev)] = D.detach()[improved.to(dev)]
            progressed = active & (obj < ref * (1 - rel_tol))
            ref = torch.where(progressed, obj, ref)
            stale = torch.where(progressed, torch.zeros_like(stale), stale + active.long())
            stop = active & (stale >= int(patience or 0))
        frozen = (~active).to(dev)
        keep_frozen = D.detach()[frozen].clone() if bool(frozen.any()) else None
        opt.step()
        with torch.no_grad():
            if bound is not None:
                project_offsets(D, bound)
            # a stopped path holds its best point (Adam's momentum would move it on)
            if keep_frozen is not None:
                D[frozen] = keep_frozen
            if best_D is not None and bool(stop.any()):
                D[stop.to(dev)] = best_D[stop.to(dev)]
        if bool(stop.any()):
            active &= ~stop
            points = torch.nonzero(active.to(dev).repeat_interleave(n_inner)).squeeze(1)
        sums = terms.sum(0)
        history.append({"dist": float(sums[0])} | {k: float(sums[1 + j]) for j, k in enumerate(POINT_TERMS)}
                       | {"active": float(active.sum()), "seconds": time.perf_counter() - t0})
        bar.set_postfix(dist=f"{sums[0] / p:.3g}", kl=f"{sums[1] / p:.3g}", ce=f"{sums[2] / p:.3g}",
                        active=int(active.sum()), refresh=False)
    with torch.no_grad():
        if best_D is not None and bool(torch.isfinite(best_obj).all()):
            D.copy_(best_D)  # paths that reached the cap also end on their best point
        final = terms @ lam
        full = torch.cat([wa_real.unsqueeze(1), (start + D.detach()) * sc, wb_real.unsqueeze(1)], dim=1)
    return NavResult(paths=full, history=history, steps_run=steps_run, final_loss=final)


def sequential_reference(
    G: StyleGenerator,
    phi_id: nn.Module,
    phi_class: nn.Module,
    wa: torch.Tensor,
    wb: torch.Tensor,
    label: int,
    nav: NavigationConfig,
    w_scale: float = 1.0,
) -> torch.Tensor:
    """ONE path, the plain way: its interior points as the parameter, all in one batch, one backward per
    step, the same loss (:func:`_chunk_loss` on the whole batch + L_dist). Checks the chunking and the offset
    parametrisation of :func:`optimise_paths`."""
    obj = Objective.from_config(nav)
    free = free_layers(G, nav)
    gen = torch.Generator().manual_seed(0)
    sc = float(w_scale)
    wa, wb = wa / sc, wb / sc
    n_inner = nav.T - 2
    start = linear_paths(wa[None], wb[None], nav.T)[0, 1:-1]
    P = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([P], lr=nav.lr)
    y = torch.full((n_inner,), int(label), dtype=torch.long, device=wa.device)
    for _ in range(nav.steps):
        opt.zero_grad(set_to_none=True)
        full = torch.cat([wa[None], P, wb[None]], 0)
        cls, _ = _chunk_loss(G, phi_id, phi_class, P * sc, y, obj, n_inner, gen, start * sc, free)
        torch.autograd.backward(nav.lambda_dist * (full[1:] - full[:-1]).pow(2).sum() + cls)
        opt.step()
    return torch.cat([wa[None], P.detach(), wb[None]], 0) * sc


OFFICIAL_SPLIT = 4  # images per classifier call in the published loop


def official_loop(
    G: StyleGenerator,
    phi_id: nn.Module,
    phi_class: nn.Module,
    wa: torch.Tensor,
    wb: torch.Tensor,
    label: int,
    nav: NavigationConfig,
    w_scale: float = 1.0,
    on_step: Callable[[int, torch.Tensor, float], None] | None = None,
) -> torch.Tensor:
    """The published loop, literally: ONE path; its T-2 interior points are the parameter; each step renders
    them all in one G call, runs both classifiers on ``imgs.split(4)`` and SUMS the per-split mean losses;
    Adam (``nav.lr``, published 0.1) for ``nav.steps`` (published 500) steps. The per-split weights are
    ``4 * lambda / (T - 2)`` (0.1 for KL and 1.0 for CE at the defaults and T = 50, the published constants),
    so with (T - 2) divisible by 4 the objective equals :func:`optimise_paths`'s. The benchmark reference.

    ``on_step(step, interior_points, loss)`` (if given) is called after each step's loss is measured and
    before the update, with the points that loss belongs to (real W scale; untimed work belongs there).
    """
    sc = float(w_scale)
    wa, wb = wa / sc, wb / sc
    T = nav.T
    w_kl = OFFICIAL_SPLIT * nav.lambda_id / (T - 2)
    w_ce = OFFICIAL_SPLIT * nav.lambda_class / (T - 2)
    P = linear_paths(wa[None], wb[None], T)[0, 1:-1].clone().requires_grad_(True)
    opt = torch.optim.Adam([P], lr=nav.lr)
    for step in range(nav.steps):
        opt.zero_grad(set_to_none=True)
        full = torch.cat([wa[None], P, wb[None]], 0)
        loss = nav.lambda_dist * (full[1:] - full[:-1]).pow(2).sum()
        imgs = G.render(P * sc)
        for part in torch.split(imgs, OFFICIAL_SPLIT):
            y = torch.full((part.shape[0],), int(label), dtype=torch.long, device=part.device)
            loss = loss + w_kl * kl_uniform(phi_id(part)).mean() + w_ce * F.cross_entropy(phi_class(part), y)
        torch.autograd.backward(loss)
        if on_step is not None:
            on_step(step, P.detach() * sc, float(loss.detach()))
        opt.step()
    return torch.cat([wa[None], P.detach(), wb[None]], 0) * sc


@torch.no_grad()
def w_std(G: StyleGenerator, n: int = 4096, seed: int = 0) -> float:
    """sigma_W: mean per-coordinate standard deviation of W over ``n`` mapping-network samples."""
    gen = torch.Generator().manual_seed(seed)
    return float(G.sample_w(n, gen).std(0).mean())


@torch.no_grad()
def random_samples(G: StyleGenerator, n: int, truncation: float = 0.7, seed: int = 0) -> torch.Tensor:
    """Plain GAN samples in W (the random baseline)."""
    gen = torch.Generator().manual_seed(seed)
    return G.sample_w(n, gen, truncation=truncation)


@dataclass
class QuotaDraw:
    """Random GAN samples kept to per-class quotas (:func:`draw_to_class_quotas`)."""

    w: torch.Tensor  # [N, w_dim] the kept samples, in draw order
    images: torch.Tensor  # [N, C, H, W] their renders
    labels: np.ndarray  # [N] int64 the label each was kept under
    drawn: int  # samples drawn (kept or not)
    quota: list[int]  # per class, what was asked
    kept: list[int]  # per class, what was kept (< quota: the draws ran out or could not help)
    stopped: str = "quotas met"  # why drawing stopped: "quotas met", "max_draws" or "no class can gain"


@torch.no_grad()
def draw_to_class_quotas(G: StyleGenerator, quotas: Sequence[int],
                         render_and_label: Callable[[torch.Tensor], tuple[torch.Tensor, np.ndarray]],
                         truncation: float = 0.7, seed: int = 0, batch: int = 512,
                         max_draws: int | None = None, give_up: float = 0.0) -> QuotaDraw:
    """The random baseline with given class counts: rejection sampling from G by a classifier's label.

    Draws ``batch`` samples at a time (``G.sample_w`` at ``truncation``, one seeded stream),
    labels each with ``render_and_label`` (w -> renders, integer labels) and keeps, per class
    ``c``, the first ``quotas[c]`` samples labelled ``c``. Stops when every quota is met or
    ``max_draws`` samples were drawn (default 20 x the total quota); a class the generator
    rarely gives then keeps fewer, which ``kept`` reports. The kept rows are in draw order.

    ``give_up`` > 0 also stops when the draws left cannot matter: when, for every class still
    short, the draws up to ``max_draws`` would add fewer than ``give_up`` x its quota even at the
    one-sided 95 % upper bound of its rate so far (:func:`class_rate_upper_bound`). Only a class
    the generator (as labelled) almost never gives triggers it, so the kept set is the one the
    full budget would give up to that share of a quota; ``stopped`` says which rule ended it.
    """
    q = [int(x) for x in quotas]
    if any(x < 0 for x in q):
        raise ValueError(f"draw_to_class_quotas: quotas must be >= 0, got {q}")
    if batch < 1:
        raise ValueError(f"draw_to_class_quotas: batch must be >= 1, got {batch}")
    total = sum(q)
    cap = 20 * total if max_draws is None else int(max_draws)
    gen = torch.Generator().manual_seed(seed)
    kept = [0] * len(q)
    ws: list[torch.Tensor] = []
    imgs: list[torch.Tensor] = []
    labs: list[np.ndarray] = []
    drawn = 0
    hits = [0] * len(q)  # per class, samples labelled so (kept or not)
    stopped = "quotas met"
    while any(k < x for k, x in zip(kept, q)):
        if drawn >= cap:
            stopped = "max_draws"
            break
        if give_up > 0 and drawn and all(
                class_rate_upper_bound(hits[c], drawn) * (cap - drawn) < give_up * q[c]
                for c in range(len(q)) if kept[c] < q[c]):
            stopped = "no class can gain"
            break
        n = min(batch, cap - drawn)
        w = G.sample_w(n, gen, truncation=truncation)
        img, lab = render_and_label(w)
        lab = np.asarray(lab, dtype=np.int64)
        if len(lab) != n or len(img) != n:
            raise ValueError(f"draw_to_class_quotas: render_and_label gave {len(img)} images / {len(lab)} labels for {n}")
        drawn += n
        take = np.zeros(n, dtype=bool)
        for i, c in enumerate(lab):
            if 0 <= c < len(q):
                hits[c] += 1
                if kept[c] < q[c]:
                    kept[c] += 1
                    take[i] = True
        if take.any():
            idx = torch.from_numpy(np.flatnonzero(take))
            ws.append(w[idx.to(w.device)].cpu())
            imgs.append(img[idx])
            labs.append(lab[take])
    w_dim = G.w_avg.shape[-1]
    return QuotaDraw(
        w=torch.cat(ws) if ws else torch.zeros(0, w_dim),
        images=torch.cat(imgs) if imgs else torch.zeros(0, G.channels, G.size, G.size),
        labels=np.concatenate(labs) if labs else np.zeros(0, np.int64),
        drawn=drawn, quota=q, kept=kept, stopped=stopped,
    )


def class_rate_upper_bound(hits: int, draws: int, level: float = 0.95) -> float:
    """One-sided ``level`` upper bound of a class's rate after ``hits`` of ``draws`` (Clopper-Pearson; 1.0
    without draws). With no hit in 2,560 draws: 0.0012 (the rule of three, 3 / n)."""
    if draws <= 0 or hits >= draws:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(level, hits + 1, draws - hits))
