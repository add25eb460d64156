"""B4 k-same anchors and the anchor pairs that paths join (method.md B4, B5).

Within each class: repeatedly take the unassigned latent farthest from the rest (largest
mean distance to the other unassigned latents), group it with its k-1 nearest unassigned
latents; when fewer than k remain, each remaining latent joins the group whose centroid
is nearest (so groups hold k .. k+r members, never fewer than k). Each group is averaged
into one anchor. A class with fewer than k latents yields no anchor and is reported;
classes are never merged::

    res = k_same_anchors(w, labels, k=5)
    res.anchors, res.labels, res.groups, res.skipped_classes
    pairs = nearest_pairs(res.anchors, res.labels, m=3)

``anchors.groups: neighbourhood`` (:func:`neighbourhood_anchors`) instead averages each
latent with its k-1 nearest latents of its class: one anchor per latent (duplicate
groups once), each still the mean of k distinct images, but the groups overlap.

A mean of k latents is shrunk toward the centre of W: its deviation from w_avg is about
1/sqrt(k) of a single latent's, so plain anchors (and the paths between them) cover only an
"average" region of the generator's output. ``anchors.spread`` restores the spread
(:func:`spread_anchors`): each anchor's deviation from w_avg is rescaled, along its own
direction, to a target length, by a factor clipped to [1, ``anchors.spread_max_scale``]::

    members:    target = mean_i ||w_i - w_avg|| over the group's own k latents
    generator:  target = mean ||w - w_avg|| of mapping-network samples at synthesis.truncation
                (the random baseline's samples; G alone: WCentre.radius)

Either way the anchor stays a deterministic, permutation-invariant function of its k-group
(and of G): a latent outside the group never changes it, and changing one member by D moves it
by at most (spread_max_scale + 1) * |D| / k::

    centre = w_centre(G, cfg.synthesis.truncation, seed=cfg.seed)
    res = build_anchors(w, labels, cfg.anchors, centre)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from plan_shared.config import AnchorsConfig
    from plan_shared.models import StyleGenerator


@dataclass
class AnchorResult:
    anchors: torch.Tensor  # [A, w_dim]
    labels: np.ndarray  # [A]
    groups: list[np.ndarray]  # indices into the input latents, one array per anchor
    skipped_classes: dict[int, int] = field(default_factory=dict)  # class -> number of latents (< k)

    def summary(self) -> dict[str, Any]:
        sizes = [len(g) for g in self.groups]
        return {
            "n_anchors": len(self.groups),
            "per_class": {int(c): int((self.labels == c).sum()) for c in np.unique(self.labels)} if len(self.labels) else {},
            "group_sizes": {int(s): sizes.count(s) for s in sorted(set(sizes))},
            "skipped_classes": {int(c): int(n) for c, n in self.skipped_classes.items()},
        }


def _greedy_groups(w: torch.Tensor, k: int) -> list[list[int]]:
    n = w.shape[0]
    d = torch.cdist(w.double(), w.double())
    free = np.ones(n, dtype=bool)
    groups: list[list[int]] = []
    while free.sum() >= k:
        idx = np.flatnonzero(free)
        sub = d[idx][:, idx]
        far = idx[int(torch.argmax(sub.sum(1)))]  # farthest from the rest (largest summed distance)
        order = idx[torch.argsort(d[far, idx], stable=True).numpy()]
        members = [int(far)] + [int(j) for j in order if j != far][: k - 1]
        free[members] = False
        groups.append(members)
    rest = np.flatnonzero(free)
    if len(rest) and groups:
        cents = torch.stack([w[g].mean(0) for g in groups])
        for j in rest:
            gi = int(torch.argmin(torch.cdist(w[j : j + 1].double(), cents.double())[0]))
            groups[gi].append(int(j))
    return groups


def _neighbourhood_groups(w: torch.Tensor, k: int) -> list[list[int]]:
    """Each latent with its k-1 nearest (itself first); a member set that repeats is kept once."""
    d = torch.cdist(w.double(), w.double())
    d.fill_diagonal_(-1.0)  # each latent first in its own neighbourhood
    seen: set[tuple[int, ...]] = set()
    groups: list[list[int]] = []
    for i in range(w.shape[0]):
        key = tuple(sorted(int(j) for j in torch.argsort(d[i], stable=True)[:k].numpy()))
        if key not in seen:
            seen.add(key)
            groups.append(list(key))
    return groups


def _class_anchors(w: torch.Tensor, labels: np.ndarray, k: int,
                   grouping: Callable[[torch.Tensor, int], list[list[int]]]) -> AnchorResult:
    """Per class, ``grouping`` of the class's latents into member lists, each averaged into one anchor; a class
    with fewer than k latents yields none and is reported."""
    labels = np.asarray(labels)
    anchors, alabels, groups, skipped = [], [], [], {}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < k:
            skipped[int(c)] = int(len(idx))
            continue
        for g in grouping(w[idx], k):
            members = idx[np.asarray(g)]
            groups.append(members)
            anchors.append(w[members].mean(0))
            alabels.append(int(c))
    wd = w.shape[1] if w.ndim == 2 else 0
    return AnchorResult(
        anchors=torch.stack(anchors) if anchors else torch.zeros(0, wd),
        labels=np.asarray(alabels, dtype=np.int64),
        groups=groups,
        skipped_classes=skipped,
    )


def k_same_anchors(w: torch.Tensor, labels: np.ndarray, k: int) -> AnchorResult:
    return _class_anchors(w, labels, k, _greedy_groups)


def neighbourhood_anchors(w: torch.Tensor, labels: np.ndarray, k: int) -> AnchorResult:
    """Per class, each latent averaged with its k-1 nearest latents of the class (itself included: k members).

    Groups that come out equal (same member set) are kept once, in the order of their first
    latent. A class with fewer than k latents yields no anchor and is reported, as in
    :func:`k_same_anchors`.
    """
    return _class_anchors(w, labels, k, _neighbourhood_groups)


@dataclass(frozen=True)
class WCentre:
    """The generator's W centre and the typical distance of a mapping-network sample from it (G alone: no
    patient's latent enters either)."""

    w_avg: torch.Tensor  # [w_dim]
    radius: float  # mean ||w - w_avg|| over mapping-network samples at the random baseline's truncation


@torch.no_grad()
def w_centre(G: StyleGenerator, truncation: float, n: int = 4096, seed: int = 0) -> WCentre:
    """:class:`WCentre` of ``G`` from ``n`` seeded mapping-network samples at ``truncation`` (the random
    baseline's, synthesis.truncation: the anchors then lie as far from w_avg as its samples); w_avg is G's
    tracked mean."""
    w_avg = G.w_avg.detach().reshape(-1).cpu().float()
    w = G.sample_w(n, torch.Generator().manual_seed(seed), truncation=truncation).cpu().float()
    return WCentre(w_avg, float((w - w_avg).norm(dim=1).mean()))


def spread_anchor(members: torch.Tensor, centre: WCentre, rule: str, max_scale: float) -> torch.Tensor:
    """One anchor from its group's latents ``members [k, w_dim]``: the mean, with its deviation from w_avg
    rescaled along its own direction to ``rule``'s target length (factor clipped to [1, max_scale]);
    ``rule`` none: the plain mean (k-same)."""
    mean = members.mean(0)
    if rule == "none":
        return mean
    c = centre.w_avg.to(members.device, members.dtype)
    dev = mean - c
    norm = float(dev.norm())
    if rule == "members":
        target = float((members - c).norm(dim=1).mean())
    elif rule == "generator":
        target = centre.radius
    else:
        raise ValueError(f"anchors.spread: unknown rule {rule!r} (none, members, generator)")
    scale = max_scale if norm <= target / max_scale else min(max(target / norm, 1.0), max_scale)
    return c + dev * scale


def spread_anchors(res: AnchorResult, w: torch.Tensor, centre: WCentre, rule: str, max_scale: float) -> AnchorResult:
    """``res`` with every anchor recomputed from its own group of ``w`` by :func:`spread_anchor`."""
    if rule == "none" or not res.groups:
        return res
    anchors = torch.stack([spread_anchor(w[torch.as_tensor(g, dtype=torch.long)], centre, rule, max_scale)
                           for g in res.groups])
    return AnchorResult(anchors, res.labels, res.groups, res.skipped_classes)


def build_anchors(w: torch.Tensor, labels: np.ndarray, cfg: AnchorsConfig, centre: WCentre | None = None) -> AnchorResult:
    """The anchors the ``anchors`` config section asks for (``groups``: partition = k-same, neighbourhood;
    ``spread``: the group means' deviation from ``centre.w_avg`` restored, see :func:`spread_anchors`)."""
    res = neighbourhood_anchors(w, labels, cfg.k) if cfg.groups == "neighbourhood" else k_same_anchors(w, labels, cfg.k)
    if cfg.spread == "none":
        return res
    if centre is None:
        raise ValueError(f"anchors.spread={cfg.spread!r} needs the generator's W centre (build_anchors(..., centre=))")
    return spread_anchors(res, w, centre, cfg.spread, cfg.spread_max_scale)


def nearest_pairs(anchors: torch.Tensor, labels: np.ndarray, m: int) -> list[tuple[int, int]]:
    """Each anchor with its m nearest anchors of the same class; each unordered pair once (sorted)."""
    pairs: set[tuple[int, int]] = set()
    labels = np.asarray(labels)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        d = torch.cdist(anchors[idx].double(), anchors[idx].double())
        d.fill_diagonal_(float("inf"))
        for a in range(len(idx)):
            for b in torch.argsort(d[a], stable=True)[: min(m, len(idx) - 1)].tolist():
                i, j = int(idx[a]), int(idx[b])
                pairs.add((min(i, j), max(i, j)))
    return sorted(pairs)


def spread_pairs(pairs: list[tuple[int, int]], labels: np.ndarray, max_pairs: int | None, seed: int = 0) -> list[tuple[int, int]]:
    """At most ``max_pairs`` pairs, shared over classes as evenly as possible (seeded)."""
    if max_pairs is None or len(pairs) <= max_pairs:
        return list(pairs)
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[tuple[int, int]]] = {}
    for p in pairs:
        by_class.setdefault(int(labels[p[0]]), []).append(p)
    for v in by_class.values():
        rng.shuffle(v)
    out: list[tuple[int, int]] = []
    while len(out) < max_pairs:
        for c in sorted(by_class):
            if by_class[c] and len(out) < max_pairs:
                out.append(by_class[c].pop())
    return sorted(out)
