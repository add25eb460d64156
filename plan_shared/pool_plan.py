"""The path plan of a full-size pool: how many paths of each class, between which anchors.

The site should export about ``synthesis.pool_factor`` x its real train images, each class
in its real train share (plan_shared/prevalence.py then trims the accepted images to those
shares). Generating the classes evenly and throwing the surplus of the minority class away
starves the majority class, so the candidates are planned per class instead::

    target_c = ceil(pool_factor * n_train * prior_c)                  images to export
    paths_c  = ceil(target_c / (planned_accept_rate * points_per_path))

``synthesis.max_paths`` caps the sum (shared in proportion, largest remainders first). A
class's paths join distinct same-class anchor pairs: ``anchors.far_share`` of them seeded
random pairs that are not among the ``pairs_m`` nearest (more distant anchors: variety), the
rest nearest pairs; either kind fills in where the other runs out. A class with fewer
distinct pairs than planned gets them all and its shortfall is reported::

    plan = plan_paths(anchors, train_labels, num_classes, T - 2, cfg.synthesis, cfg.anchors, seed)
    plan.pairs, plan.summary()

With ``pool_factor`` null the plan is the former one: ``max_paths`` nearest pairs spread
evenly over classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from plan_shared.anchors import AnchorResult, nearest_pairs, spread_pairs
from plan_shared.config import AnchorsConfig, SynthesisConfig
from plan_shared.prevalence import class_priors

Pair = tuple[int, int]


@dataclass(frozen=True)
class PathPlan:
    pairs: list[Pair]  # rows of the anchors: one PLAN / linear path each, sorted
    points_per_path: int  # candidates per path (the interior points)
    target: list[int] | None  # images to export per class (None: no pool_factor)
    planned: list[int]  # paths wanted per class (after the max_paths cap)
    available: list[int]  # distinct same-class anchor pairs per class
    paths: list[int]  # paths in the plan per class
    far: list[int]  # of which between anchors that are not each other's nearest

    def summary(self) -> dict[str, list[int] | int | None]:
        """Report keys (merged into report.json ``anchors`` as ``plan_*``)."""
        short = [max(p - q, 0) for p, q in zip(self.planned, self.paths)]
        return {
            "plan_target_per_class": self.target,
            "plan_target_total": None if self.target is None else int(sum(self.target)),
            "plan_paths_wanted_per_class": self.planned,
            "plan_pairs_available_per_class": self.available,
            "plan_paths_per_class": self.paths,
            "plan_far_paths_per_class": self.far,
            "plan_shortfall_paths_per_class": short,
            "plan_candidates_per_class": [p * self.points_per_path for p in self.paths],
        }


def _cap(want: np.ndarray, cap: int | None) -> np.ndarray:
    """``want`` scaled down to sum at most ``cap`` (largest remainders; a wanted class keeps >= 1 while cap allows)."""
    if cap is None or want.sum() <= cap:
        return want
    share = want / want.sum() * cap
    out = np.floor(share).astype(np.int64)
    wanted = np.flatnonzero(want > 0)
    for c in wanted[np.argsort(-share[wanted], kind="stable")]:  # one path for every wanted class first
        if out[c] == 0 and out.sum() < cap:
            out[c] = 1
    for c in np.argsort(-(share - np.floor(share)), kind="stable"):
        if out.sum() >= cap:
            break
        if out[c] < want[c]:
            out[c] += 1
    capped: np.ndarray = out
    return capped


def _class_pairs(rows: np.ndarray, near: set[Pair], n: int, far_share: float,
                 rng: np.random.Generator) -> tuple[list[Pair], int, int]:
    """``n`` distinct pairs among ``rows`` (or all there are), their far count and the number available."""
    a, b = np.triu_indices(len(rows), k=1)
    every = [(int(rows[i]), int(rows[j])) for i, j in zip(a, b)]
    near_c = [p for p in every if p in near]
    far_c = [p for p in every if p not in near]
    rng.shuffle(near_c)
    rng.shuffle(far_c)
    n = min(n, len(every))
    n_far = min(round(n * far_share), len(far_c))
    n_near = min(n - n_far, len(near_c))
    n_far = min(n - n_near, len(far_c))  # far fills in where there are too few nearest pairs
    return near_c[:n_near] + far_c[:n_far], n_far, len(every)


def class_targets(train_labels: np.ndarray, num_classes: int, pool_factor: float) -> np.ndarray:
    """Images to export per class for a full-size pool: ``ceil(pool_factor * n_train * prior_c)`` (int64)."""
    priors = class_priors(train_labels, num_classes)
    n_train = len(np.asarray(train_labels))
    out: np.ndarray = np.ceil(pool_factor * n_train * priors - 1e-9).astype(np.int64)
    return out


def plan_paths(anchors: AnchorResult, train_labels: np.ndarray, num_classes: int, points_per_path: int,
               syn: SynthesisConfig, anc: AnchorsConfig, seed: int) -> PathPlan:
    """The pairs to navigate so that each class reaches its share of a full-size pool (see the module docstring)."""
    if points_per_path < 1:
        raise ValueError(f"plan_paths: points_per_path must be >= 1 (navigation.T >= 3), got {points_per_path}")
    labels = np.asarray(anchors.labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"plan_paths: anchor labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    rows_of = [np.flatnonzero(labels == c) for c in range(num_classes)]
    available = [len(r) * (len(r) - 1) // 2 for r in rows_of]
    near = set(nearest_pairs(anchors.anchors, labels, anc.pairs_m))
    if syn.pool_factor is None:
        even = spread_pairs(sorted(near), labels, syn.max_paths, seed)
        per = np.bincount(labels[[p[0] for p in even]], minlength=num_classes) if even else np.zeros(num_classes, int)
        return PathPlan(sorted(even), points_per_path, None, per.tolist(), available, per.tolist(),
                        [0] * num_classes)
    target = class_targets(train_labels, num_classes, syn.pool_factor)
    want = np.ceil(target / (syn.planned_accept_rate * points_per_path) - 1e-9).astype(np.int64)
    want = _cap(want, syn.max_paths)
    rng = np.random.default_rng(seed)
    pairs: list[Pair] = []
    paths, far = [0] * num_classes, [0] * num_classes
    for c in range(num_classes):
        got, n_far, _ = _class_pairs(rows_of[c], near, int(want[c]), anc.far_share, rng)
        pairs += got
        paths[c], far[c] = len(got), n_far
    return PathPlan(sorted(pairs), points_per_path, target.astype(int).tolist(), want.astype(int).tolist(),
                    available, paths, far)
