"""Class prevalence of an exported set: as the site's real train split has it.

A pool whose class shares differ from the real ones shifts every downstream model's
decision threshold (a researcher's plain recipe does no class balancing). Before export
the accepted images are subsampled so that each class's share matches the site's real
train priors as closely as the accepted counts allow: the largest set that fits the
priors is kept (the class that is scarcest relative to its prior bounds it), and within
a class the images kept are a seeded random choice.
"""

from __future__ import annotations

import numpy as np


def class_priors(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of each class ``0..num_classes-1`` in ``labels`` (float64, sums to 1)."""
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        raise ValueError("class_priors: no labels")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"class_priors: labels must lie in 0..{num_classes - 1}, got {y.min()}..{y.max()}")
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    out: np.ndarray = counts / counts.sum()
    return out


def match_prevalence(labels: np.ndarray, priors: np.ndarray, seed: int) -> np.ndarray:
    """Sorted indices into ``labels`` whose class shares match ``priors`` (seeded).

    The total kept is the largest N with ``round(N * prior_c) <= available_c`` for every
    class with a positive prior; classes with prior 0 are dropped. A class with a positive
    prior and no accepted image keeps the others as they are (nothing to match against),
    and its absence is the caller's to report.
    """
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(priors, dtype=np.float64)
    if p.ndim != 1 or (p < 0).any() or not np.isclose(p.sum(), 1.0):
        raise ValueError(f"match_prevalence: priors must be a non-negative vector summing to 1, got {p.tolist()}")
    if len(y) and (y.min() < 0 or y.max() >= len(p)):
        raise ValueError(f"match_prevalence: labels must lie in 0..{len(p) - 1}, got {y.min()}..{y.max()}")
    avail = np.bincount(y, minlength=len(p)) if len(y) else np.zeros(len(p), np.int64)
    live = (p > 0) & (avail > 0)
    if not live.any():
        return np.zeros(0, np.int64)
    q = p * live / (p * live).sum()  # priors renormalised over the classes that have images
    n = int(np.floor(min(avail[c] / q[c] for c in np.flatnonzero(live))))
    while n > 0 and any(round(n * q[c]) > avail[c] for c in np.flatnonzero(live)):
        n -= 1
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    for c in np.flatnonzero(live):
        idx = np.flatnonzero(y == c)
        keep.append(rng.choice(idx, size=round(n * q[c]), replace=False))
    out: np.ndarray = np.sort(np.concatenate(keep)).astype(np.int64)
    return out


def prevalence_selection(labels: np.ndarray, train_labels: np.ndarray, num_classes: int,
                         seed: int) -> tuple[np.ndarray, dict[str, list[int] | list[float] | int]]:
    """:func:`match_prevalence` against the priors of ``train_labels``, with the counts for the report."""
    y = np.asarray(labels, dtype=np.int64)
    priors = class_priors(train_labels, num_classes)
    idx = match_prevalence(y, priors, seed)
    summary: dict[str, list[int] | list[float] | int] = {
        "real_train_priors": [round(float(p), 4) for p in priors],
        "accepted_per_class": np.bincount(y, minlength=num_classes).astype(int).tolist(),
        "exported_per_class": np.bincount(y[idx], minlength=num_classes).astype(int).tolist(),
        "dropped": int(len(y) - len(idx)),
    }
    return idx, summary
