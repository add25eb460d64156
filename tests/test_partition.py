"""Seeded partition into sites: reproducibility, coverage, IID balance, Dirichlet skew, minima, table."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from plan_shared.config import DataConfig, PartitionConfig
from plan_shared.data import ImageDataset, Split, load_dataset
from plan_shared.partition import class_count_table, partition_dataset, partition_indices


def labels_of(counts) -> np.ndarray:
    rng = np.random.default_rng(123)
    return rng.permutation(np.repeat(np.arange(len(counts)), counts))


def check_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n  # disjoint and complete
    assert allidx.min() == 0 and allidx.max() == n - 1
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)  # sorted


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_reproducible_disjoint_complete(scheme):
    y = labels_of([300, 200, 100])
    a = partition_indices(y, 4, scheme, 0.5, seed=7, min_per_site=5)
    b = partition_indices(y, 4, scheme, 0.5, seed=7, min_per_site=5)
    c = partition_indices(y, 4, scheme, 0.5, seed=8, min_per_site=5)
    assert len(a) == 4
    check_cover(a, len(y))
    check_cover(c, len(y))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_iid_is_balanced_and_stratified():
    y = labels_of([301, 157, 42])
    parts = partition_indices(y, 7, "iid", 1.0, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    per_class = np.array([np.bincount(y[p], minlength=3) for p in parts])
    assert np.all(per_class.max(axis=0) - per_class.min(axis=0) <= 1)


def _skew(y, alpha, seeds=range(10), n_sites=5):
    """Mean total-variation distance between each site's label mix and the global one."""
    glob = np.bincount(y) / len(y)
    tv = []
    for s in seeds:
        for p in partition_indices(y, n_sites, "dirichlet", alpha, seed=s, min_per_site=1):
            tv.append(0.5 * np.abs(np.bincount(y[p], minlength=len(glob)) / len(p) - glob).sum())
    return float(np.mean(tv))


def test_dirichlet_small_alpha_skews_more():
    y = labels_of([500, 500, 500, 500])
    strong, weak = _skew(y, 0.1), _skew(y, 100.0)
    assert strong > 0.4 and weak < 0.08 and strong > 4 * weak
    iid = partition_indices(y, 5, "iid", 0.0, seed=0)
    glob = np.bincount(y) / len(y)
    assert max(0.5 * np.abs(np.bincount(y[p], minlength=4) / len(p) - glob).sum() for p in iid) < 0.01


def test_min_per_site_honoured_and_impossible(monkeypatch):
    y = labels_of([600, 400])
    for seed in range(5):  # a single Dirichlet(0.1) draw meets this only ~6 % of the time: resampling at work
        parts = partition_indices(y, 5, "dirichlet", 0.1, seed=seed, min_per_site=20)
        assert min(len(p) for p in parts) >= 20
        check_cover(parts, len(y))
    with pytest.raises(ValueError, match=r"n_sites=8.*min_per_site=200.*N=1000"):
        partition_indices(y, 8, "dirichlet", 0.5, seed=0, min_per_site=200)
    with pytest.raises(ValueError, match=r"n_sites=8.*min_per_site=200.*N=1000"):
        partition_indices(y, 8, "iid", 0.5, seed=0, min_per_site=200)
    # possible in count, but no Dirichlet draw is that even with tiny alpha
    monkeypatch.setattr("plan_shared.partition.MAX_TRIES", 300)
    with pytest.raises(ValueError, match=r"n_sites=10.*min_per_site=99"):
        partition_indices(y, 10, "dirichlet", 0.01, seed=0, min_per_site=99)
    with pytest.raises(ValueError, match="scheme"):
        partition_indices(y, 2, "zipf", 0.5, seed=0)


def test_single_site_gets_everything():
    y = labels_of([5, 5])
    (only,) = partition_indices(y, 1, "dirichlet", 0.3, seed=0)
    assert np.array_equal(only, np.arange(10))


def _toy_dataset(n=(300, 60, 90), classes=3) -> ImageDataset:
    rng = np.random.default_rng(0)

    def split(k):
        return Split(rng.integers(0, 256, (k, 1, 4, 4), dtype=np.uint8), np.arange(k) % classes)

    return ImageDataset("toy", split(n[0]), split(n[1]), split(n[2]), ["a", "b", "c"][:classes], 1, 4, "medmnist")


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_dataset_every_split(scheme, caplog):
    ds = _toy_dataset()
    pc = PartitionConfig(sites=3, scheme=scheme, alpha=0.3, min_per_site=20)
    with caplog.at_level(logging.INFO, logger="plan.partition"):
        parts = partition_dataset(ds, pc, seed=11)
    assert [p.name for p in parts] == ["toy/site-0", "toy/site-1", "toy/site-2"]
    for sname in ("train", "val", "test"):
        whole = getattr(ds, sname)
        pieces = [getattr(p, sname) for p in parts]
        assert sum(len(s) for s in pieces) == len(whole)
        assert all(len(s) >= (20 if sname == "train" else 1) for s in pieces)
        got = sorted(im.tobytes() for s in pieces for im in s.images)
        assert got == sorted(im.tobytes() for im in whole.images)  # every image once
    for p in parts:
        assert p.class_names == ds.class_names and (p.channels, p.size, p.source) == (1, 4, "medmnist")
    if scheme == "dirichlet":  # one proportion draw for all splits: a site's val mix follows its train mix
        for p in parts:
            tr = np.bincount(p.train.labels, minlength=3) / len(p.train)
            te = np.bincount(p.test.labels, minlength=3) / len(p.test)
            assert np.abs(tr - te).sum() < 0.35
    again = partition_dataset(ds, pc, seed=11)
    assert all(np.array_equal(a.test.images, b.test.images) for a, b in zip(parts, again))
    log = caplog.text
    assert "seed=11" in log and all(f"site-{i}" in log for i in range(3))


def test_class_count_table_lists_every_site():
    y = labels_of([40, 30, 20])
    parts = partition_indices(y, 5, "dirichlet", 0.5, seed=0)
    table = class_count_table([y[p] for p in parts], ["normal", "mild", "severe"])
    lines = table.splitlines()
    assert "normal" in lines[0] and "severe" in lines[0] and "total" in lines[0]
    for i, p in enumerate(parts):
        row = next(line for line in lines if line.startswith(f"site-{i} "))
        assert row.split()[-1] == str(len(p))
    assert lines[-1].split() == ["all", "40", "30", "20", "90"]
    ds_parts = partition_dataset(_toy_dataset(), PartitionConfig(sites=4, scheme="iid"), seed=0)
    t = class_count_table(ds_parts, split="test")
    assert all(f"site-{i}" in t for i in range(4)) and t.splitlines()[-1].split()[-1] == "90"


def test_real_pneumoniamnist_partition(monkeypatch):
    d = os.environ.get("PLAN_DATA_DIR")
    if not d:
        pytest.skip("PLAN_DATA_DIR is not set")
    ds = load_dataset(DataConfig(name="pneumoniamnist", size=None, download=False), seed=0)
    parts = partition_dataset(ds, PartitionConfig(sites=3, scheme="dirichlet", alpha=0.5, min_per_site=10), seed=0)
    assert sum(len(p.train) for p in parts) == 2428
    assert sum(len(p.test) for p in parts) == 468
    assert all(len(p.train) >= 10 and len(p.val) >= 1 and len(p.test) >= 1 for p in parts)
    assert Path(ds.origin).name == "pneumoniamnist.npz"
