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


# ---------------------------------------------------------------- anchors.spread (#11.6): a function of the k-group only
import pytest  # noqa: E402

from plan_shared.anchors import WCentre, build_anchors, spread_anchor, spread_anchors, w_centre  # noqa: E402
from plan_shared.config import AnchorsConfig  # noqa: E402
from plan_shared.models import StyleGenerator  # noqa: E402


def _centre(dim: int = 6, radius: float = 4.0, seed: int = 0) -> WCentre:
    return WCentre(torch.randn(dim, generator=torch.Generator().manual_seed(seed)), radius)


@pytest.mark.parametrize("rule", ["members", "generator"])
def test_spread_anchor_is_a_function_of_its_group_only(rule):
    torch.manual_seed(2)
    centre = _centre()
    w = centre.w_avg + 0.5 * torch.randn(30, 6)
    labels = np.array([0] * 18 + [1] * 12)
    base = k_same_anchors(w, labels, k=5)
    res = spread_anchors(base, w, centre, rule, 3.0)
    assert res.anchors.shape == base.anchors.shape and res.groups == base.groups
    assert list(res.labels) == list(base.labels)
    g0 = res.groups[0]
    # a latent outside the group, replaced: the group's anchor is unchanged (same groups, so recompute from them)
    outsider = int(np.setdiff1d(np.arange(30), g0)[0])
    w2 = w.clone()
    w2[outsider] = centre.w_avg + 10 * torch.randn(6)
    assert torch.equal(spread_anchors(base, w2, centre, rule, 3.0).anchors[0], res.anchors[0])
    # the members' order does not matter
    perm = torch.as_tensor(np.random.default_rng(0).permutation(g0))
    assert torch.allclose(spread_anchor(w[perm], centre, rule, 3.0), res.anchors[0], atol=1e-6)


@pytest.mark.parametrize("rule,bound", [("members", 4.0), ("generator", 3.0)])  # (max_scale + 1) / k, max_scale / k
def test_changing_one_member_moves_the_anchor_a_bounded_amount(rule, bound):
    gen = torch.Generator().manual_seed(3)
    centre = _centre(radius=2.0)
    k = 5
    worst = 0.0
    for trial in range(300):
        spread = [0.01, 0.3, 3.0][trial % 3]  # groups near the centre (the cap binds), typical, far (no stretch)
        members = centre.w_avg + spread * torch.randn(k, 6, generator=gen)
        delta = torch.randn(6, generator=gen) * float(torch.rand(1, generator=gen)) * 2
        moved = members.clone()
        moved[trial % k] += delta
        change = (spread_anchor(moved, centre, rule, 3.0) - spread_anchor(members, centre, rule, 3.0)).norm()
        worst = max(worst, float(change / (delta.norm() / k)))
    assert worst <= bound * (1 + 1e-3)  # float32 rounding
    assert worst > 1.0  # the stretch is real: more than the plain mean's |D| / k


def test_spread_targets_and_never_shrinks():
    torch.manual_seed(4)
    centre = _centre(radius=3.0)
    members = centre.w_avg + 0.8 * torch.randn(5, 6)
    mean = members.mean(0)
    assert torch.equal(spread_anchor(members, centre, "none", 3.0), mean)
    a = spread_anchor(members, centre, "members", 10.0)
    target = float((members - centre.w_avg).norm(dim=1).mean())
    assert (a - centre.w_avg).norm() == pytest.approx(target, rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(a - centre.w_avg, mean - centre.w_avg, dim=0)
    assert float(cos) == pytest.approx(1.0, abs=1e-5)  # along the group mean's own direction
    g = spread_anchor(members, centre, "generator", 10.0)
    assert (g - centre.w_avg).norm() == pytest.approx(3.0, rel=1e-5)
    capped = spread_anchor(members, centre, "generator", 1.5)
    assert (capped - centre.w_avg).norm() == pytest.approx(1.5 * float((mean - centre.w_avg).norm()), rel=1e-5)
    far = centre.w_avg + 9.0 * torch.randn(5, 6)  # already beyond the target: left as the plain mean
    assert torch.allclose(spread_anchor(far, centre, "generator", 3.0), far.mean(0))
    with pytest.raises(ValueError, match="anchors.spread"):
        spread_anchor(members, centre, "wide", 3.0)


def test_build_anchors_spread_needs_the_centre_and_w_centre_is_seeded():
    torch.manual_seed(5)
    w = torch.randn(20, 8)
    labels = np.array([0] * 10 + [1] * 10)
    with pytest.raises(ValueError, match="centre"):
        build_anchors(w, labels, AnchorsConfig(k=5, spread="generator"))
    G = StyleGenerator(z_dim=8, w_dim=8, size=8, channels=1, mapping_layers=1, base_channels=8, min_channels=4).eval()
    c1, c2 = w_centre(G, 0.7, n=256, seed=1), w_centre(G, 0.7, n=256, seed=1)
    assert c1.w_avg.shape == (8,) and c1.radius == c2.radius > 0
    assert w_centre(G, 0.35, n=256, seed=1).radius == pytest.approx(c1.radius / 2, rel=1e-4)  # truncation scales it
    r = build_anchors(w, labels, AnchorsConfig(k=5, spread="generator"), c1)
    assert r.anchors.shape == (4, 8)
    assert all(np.array_equal(a, b) for a, b in zip(r.groups, k_same_anchors(w, labels, 5).groups, strict=True))
    plain = build_anchors(w, labels, AnchorsConfig(k=5, spread="none"), c1)
    assert torch.allclose(plain.anchors, k_same_anchors(w, labels, 5).anchors)
