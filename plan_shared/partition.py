"""Seeded partition of one data set into simulated sites (hospitals): IID or Dirichlet label skew.

    parts = partition_dataset(ds, cfg.partition, seed=cfg.seed)   # list[ImageDataset]
    print(class_count_table(parts, ds.class_names))

Choices written down here:

- **IID** is stratified: within each class the images are shuffled and dealt to the
  sites in turn, continuing across classes, so site sizes differ by at most one and
  so do the per-class counts.
- **Dirichlet(alpha)**: for every class a vector of site proportions is drawn from
  ``Dir(alpha, ..., alpha)`` and the class's shuffled images are cut by the
  cumulative proportions. Draws are repeated (seeded, at most ``MAX_TRIES`` times)
  until every site holds at least ``min_per_site`` images; if that is impossible or
  no draw succeeds a ``ValueError`` says so.
- :func:`partition_dataset` draws **one** proportion matrix and applies it to the
  train, val and test splits alike, so that a site's own val/test split has its own
  label mix (a hospital's test patients look like its training patients).
  ``min_per_site`` applies to train; every site must also get at least one val and
  one test image.
- The same seed gives the same partition; the partition is logged with its seed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from .config import PartitionConfig
from .data import ImageDataset

LOG = logging.getLogger("plan.partition")

MAX_TRIES = 10000  # a draw costs ~0.1 ms; a failure is reported after about a second
_SEED_TAG = 0x9A27  # separates the partition's random stream from others driven by the same seed


def _check_labels(labels: np.ndarray, what: str = "labels") -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{what} must be >= 0, found {int(arr.min())}")
    return arr


def _iid(labels: np.ndarray, n_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Stratified round-robin: class-sorted random order, position p goes to site order[p % n_sites]."""
    shuffled = rng.permutation(len(labels))
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]  # grouped by class, random within
    site_of_slot = rng.permutation(n_sites)
    site = site_of_slot[np.arange(len(order)) % n_sites]
    return [np.sort(order[site == s]) for s in range(n_sites)]


def _cut_counts(class_counts: np.ndarray, props: np.ndarray) -> np.ndarray:
    """(n_classes,) counts x (n_classes, n_sites) proportions -> integer counts cut at rounded cumulative sums."""
    cum = np.cumsum(props, axis=1)
    cum[:, -1] = 1.0
    bounds = np.round(cum * class_counts[:, None]).astype(np.int64)
    bounds = np.maximum.accumulate(np.minimum(bounds, class_counts[:, None]), axis=1)
    return np.diff(np.concatenate([np.zeros((len(class_counts), 1), np.int64), bounds], axis=1), axis=1)


def _assign(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    n_classes, n_sites = counts.shape
    per_site: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for s, chunk in enumerate(np.split(idx, np.cumsum(counts[c])[:-1])):
            per_site[s].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in per_site]


def _partition_many(
    label_sets: Sequence[np.ndarray],
    mins: Sequence[int],
    names: Sequence[str],
    n_sites: int,
    scheme: str,
    alpha: float,
    seed: int,
) -> list[list[np.ndarray]]:
    """Partition several label arrays with one scheme draw; result[a][s] = indices of array a at site s."""
    if not isinstance(n_sites, (int, np.integer)) or n_sites < 1:
        raise ValueError(f"n_sites must be a positive integer, got {n_sites!r}")
    if scheme not in ("iid", "dirichlet"):
        raise ValueError(f"unknown partition scheme {scheme!r} (iid or dirichlet)")
    if scheme == "dirichlet" and not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha!r}")
    label_sets = [_check_labels(lab, f"{nm} labels") for lab, nm in zip(label_sets, names)]
    for lab, m, nm in zip(label_sets, mins, names):
        if m < 0:
            raise ValueError(f"min_per_site must be >= 0, got {m}")
        if len(lab) < n_sites * m:
            raise ValueError(
                f"cannot give each of n_sites={n_sites} sites at least min_per_site={m} {nm} images: "
                f"only N={len(lab)} {nm} images ({n_sites} x {m} = {n_sites * m} needed)"
            )
    rng = np.random.default_rng([int(seed), _SEED_TAG])

    if scheme == "iid":
        return [_iid(lab, n_sites, rng) for lab in label_sets]

    n_classes = max((int(lab.max()) + 1 for lab in label_sets if lab.size), default=0)
    class_counts = [np.bincount(lab, minlength=n_classes) for lab in label_sets]
    for _ in range(MAX_TRIES):
        props = rng.dirichlet(np.full(n_sites, float(alpha)), size=n_classes)
        if not np.all(np.isfinite(props)):
            continue
        counts = [_cut_counts(cc, props) for cc in class_counts]
        if all(cnt.sum(axis=0).min() >= m for cnt, m in zip(counts, mins)):
            return [_assign(lab, cnt, rng) for lab, cnt in zip(label_sets, counts)]
    detail = ", ".join(f"{nm}: N={len(lab)}, min_per_site={m}" for lab, m, nm in zip(label_sets, mins, names))
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {MAX_TRIES} tries gave each of n_sites={n_sites} sites enough images "
        f"({detail}); raise alpha, lower min_per_site or use fewer sites"
    )


def partition_indices(
    labels: np.ndarray,
    n_sites: int,
    scheme: str,
    alpha: float,
    seed: int,
    min_per_site: int = 1,
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into ``n_sites`` disjoint, sorted index arrays covering all of it.

    ``scheme`` is ``"iid"`` (stratified, balanced) or ``"dirichlet"`` (label skew with
    concentration ``alpha``; small alpha = strong skew). Every site gets at least
    ``min_per_site`` indices, else ``ValueError``. Deterministic given ``seed``.
    """
    return _partition_many([labels], [min_per_site], ["train"], n_sites, scheme, alpha, seed)[0]


def partition_dataset(ds: ImageDataset, cfg: PartitionConfig, seed: int) -> list[ImageDataset]:
    """One :class:`ImageDataset` per site, named ``"<name>/site-<i>"``, each with its own train/val/test.

    The same site proportions cut train, val and test; ``cfg.min_per_site`` applies to
    train and every site gets at least one val and one test image when those splits are
    not empty. The class-count tables are logged with the seed.
    """
    splits = ds.splits()
    names = list(splits)
    mins = [cfg.min_per_site] + [1 if len(splits[s]) else 0 for s in names[1:]]
    labels = [splits[s].labels for s in names]
    idx = _partition_many(labels, mins, names, cfg.sites, cfg.scheme, cfg.alpha, seed)
    parts = []
    for i in range(cfg.sites):
        sub = {s: splits[s].subset(idx[a][i]) for a, s in enumerate(names)}
        parts.append(
            ImageDataset(
                name=f"{ds.name}/site-{i}", train=sub["train"], val=sub["val"], test=sub["test"],
                class_names=list(ds.class_names), channels=ds.channels, size=ds.size, source=ds.source,
                origin=ds.origin,
            )
        )
    scheme = f"dirichlet alpha={cfg.alpha}" if cfg.scheme == "dirichlet" else "iid"
    tables = "\n".join(f"{s}:\n{class_count_table(parts, ds.class_names, split=s)}" for s in names)
    LOG.info("partition of %s into %d sites (%s, min_per_site=%d, seed=%d)\n%s",
             ds.name, cfg.sites, scheme, cfg.min_per_site, seed, tables)
    return parts


def class_count_table(
    parts: Sequence[ImageDataset | np.ndarray],
    class_names: Sequence[str] | None = None,
    split: str = "train",
) -> str:
    """Printable table: one row per site (``site-<i>``) plus an ``all`` row; columns = classes + total.

    ``parts`` are site data sets (their ``split`` labels are counted) or plain label arrays.
    """
    label_sets = []
    for p in parts:
        if isinstance(p, ImageDataset):
            label_sets.append(p.splits()[split].labels)
        else:
            label_sets.append(_check_labels(p))
    if class_names is None:
        if parts and isinstance(parts[0], ImageDataset):
            class_names = parts[0].class_names
        else:
            n = max((int(lab.max()) + 1 for lab in label_sets if lab.size), default=0)
            class_names = [str(k) for k in range(n)]
    k = len(class_names)
    counts = [np.bincount(lab, minlength=k)[:k] if lab.size else np.zeros(k, np.int64) for lab in label_sets]
    header = ["site", *[str(c) for c in class_names], "total"]
    rows = [[f"site-{i}", *[str(int(v)) for v in c], str(int(len(lab)))]
            for i, (c, lab) in enumerate(zip(counts, label_sets))]
    tot = np.sum(counts, axis=0) if counts else np.zeros(k, np.int64)
    rows.append(["all", *[str(int(v)) for v in tot], str(int(sum(len(lab) for lab in label_sets)))])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]) for r in [header, *rows]
    )
