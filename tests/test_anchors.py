"""k-same anchors (method.md B4): exact group sizes, remainders, skipped classes, pairs."""

import numpy as np
import torch

from plan_shared.anchors import k_same_anchors, nearest_pairs, spread_pairs


def test_groups_exact_size_and_remainder_joins_nearest():
    torch.manual_seed(0)
    w = torch.randn(23, 4)
    labels = np.array([0] * 12 + [1] * 8 + [2] * 3)
    r = k_same_anchors(w, labels, k=5)
    # class 0: 12 = 5 + 5 + 2 remainder -> 2 groups of sizes summing to 12, each >= 5
    # class 1: 8 = 5 + 3 remainder -> 1 group of 8; class 2: 3 < 5 -> skipped, never merged
    assert r.skipped_classes == {2: 3}
    assert list(r.labels) == [0, 0, 1]
    sizes0 = sorted(len(g) for g, c in zip(r.groups, r.labels) if c == 0)
    assert sum(sizes0) == 12 and min(sizes0) >= 5
    assert [len(g) for g, c in zip(r.groups, r.labels) if c == 1] == [8]
    used = np.concatenate(r.groups)
    assert len(used) == len(set(used.tolist())) == 20  # every latent of an anchored class used once
    for g, c, a in zip(r.groups, r.labels, r.anchors):
        assert (labels[g] == c).all()  # never across classes
        assert torch.allclose(a, w[g].mean(0))


def test_farthest_point_starts_and_takes_its_nearest():
    # a far outlier must be grouped with its k-1 nearest points, not left to the remainder
    w = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0], [99.0]])
    r = k_same_anchors(w, np.zeros(6, int), k=2)
    groups = sorted(sorted(g.tolist()) for g in r.groups)
    assert [4, 5] in groups
    assert sum(len(g) for g in groups) == 6 and all(len(g) == 2 for g in groups)


def test_nearest_pairs_same_class_each_once():
    torch.manual_seed(1)
    a = torch.randn(10, 3)
    lab = np.array([0] * 6 + [1] * 4)
    pairs = nearest_pairs(a, lab, m=2)
    assert len(pairs) == len(set(pairs))
    for i, j in pairs:
        assert i < j and lab[i] == lab[j]
    # every anchor appears in at least one pair
    assert set(np.ravel(pairs).tolist()) == set(range(10))
    sub = spread_pairs(pairs, lab, 4, seed=0)
    assert len(sub) == 4 and {lab[i] for i, _ in sub} == {0, 1}
