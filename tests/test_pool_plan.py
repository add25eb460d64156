"""The full-size pool's path plan (plan_shared/pool_plan.py): per-class counts from priors, distinct pairings, seeds."""

import math

import numpy as np
import pytest
import torch

from plan_shared.anchors import AnchorResult, build_anchors, nearest_pairs, neighbourhood_anchors
from plan_shared.config import AnchorsConfig, SynthesisConfig
from plan_shared.pool_plan import class_targets, plan_paths


def _anchors(per_class: list[int], seed: int = 0) -> AnchorResult:
    g = torch.Generator().manual_seed(seed)
    labels = np.repeat(np.arange(len(per_class)), per_class)
    return AnchorResult(torch.randn(len(labels), 6, generator=g), labels, [np.array([i]) for i in range(len(labels))])


def _train(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def test_paths_per_class_follow_priors_and_reach_the_target():
    anc = _anchors([30, 12])
    train = _train([640, 160])  # priors 0.8 / 0.2, 800 images
    syn = SynthesisConfig(pool_factor=1.0, planned_accept_rate=0.5, max_paths=None)
    plan = plan_paths(anc, train, 2, 18, syn, AnchorsConfig(), seed=0)
    assert plan.target == [640, 160]
    # candidates planned per class reach target / accept rate: ceil(640 / 9) = 72, ceil(160 / 9) = 18 paths
    assert plan.paths == [72, 18] and plan.planned == [72, 18]
    for c, t in enumerate(plan.target):
        assert plan.paths[c] * 18 * syn.planned_accept_rate >= t
    labels = anc.labels
    assert [sum(labels[a] == c for a, _ in plan.pairs) for c in (0, 1)] == plan.paths
    s = plan.summary()
    assert s["plan_target_total"] == 800 and s["plan_shortfall_paths_per_class"] == [0, 0]
    assert s["plan_candidates_per_class"] == [72 * 18, 18 * 18]


def test_pairings_distinct_same_class_and_far_share():
    anc = _anchors([20, 10])
    plan = plan_paths(anc, _train([500, 500]), 2, 8, SynthesisConfig(max_paths=None), AnchorsConfig(far_share=0.5),
                      seed=3)
    assert len(set(plan.pairs)) == len(plan.pairs)
    assert all(a < b and anc.labels[a] == anc.labels[b] for a, b in plan.pairs)
    near = set(nearest_pairs(anc.anchors, anc.labels, AnchorsConfig().pairs_m))
    n_far = sum(p not in near for p in plan.pairs)
    assert n_far == sum(plan.far) > 0
    assert sum(p in near for p in plan.pairs) > 0  # both kinds


def test_class_with_too_few_pairs_gets_all_and_reports_the_shortfall():
    anc = _anchors([20, 4])  # class 1: 6 distinct pairs
    plan = plan_paths(anc, _train([100, 900]), 2, 5, SynthesisConfig(max_paths=None), AnchorsConfig(), seed=0)
    assert plan.available == [190, 6] and plan.paths[1] == 6
    assert plan.summary()["plan_shortfall_paths_per_class"][1] == plan.planned[1] - 6 > 0


def test_max_paths_caps_in_proportion_keeping_every_class():
    anc = _anchors([40, 40])
    plan = plan_paths(anc, _train([950, 50]), 2, 10, SynthesisConfig(max_paths=20, planned_accept_rate=1.0),
                      AnchorsConfig(), seed=0)
    assert sum(plan.paths) == 20 and plan.paths[1] >= 1 and plan.paths[0] > plan.paths[1]


def test_deterministic_by_seed():
    anc = _anchors([25, 15])
    args = (anc, _train([300, 200]), 2, 6, SynthesisConfig(max_paths=None), AnchorsConfig())
    assert plan_paths(*args, seed=5).pairs == plan_paths(*args, seed=5).pairs
    assert plan_paths(*args, seed=5).pairs != plan_paths(*args, seed=6).pairs


def test_no_pool_factor_keeps_the_even_spread_of_nearest_pairs():
    anc = _anchors([12, 12])
    plan = plan_paths(anc, _train([900, 100]), 2, 6, SynthesisConfig(pool_factor=None, max_paths=8), AnchorsConfig(),
                      seed=0)
    assert plan.target is None and plan.paths == [4, 4] and sum(plan.far) == 0


def test_bad_input_names_the_value():
    anc = _anchors([5, 5])
    with pytest.raises(ValueError, match="points_per_path"):
        plan_paths(anc, _train([5, 5]), 2, 0, SynthesisConfig(), AnchorsConfig(), seed=0)
    with pytest.raises(ValueError, match="anchor labels"):
        plan_paths(anc, _train([5, 5]), 1, 4, SynthesisConfig(), AnchorsConfig(), seed=0)


def test_neighbourhood_anchors_average_k_distinct_same_class_latents():
    torch.manual_seed(0)
    w = torch.randn(17, 3)
    labels = np.array([0] * 12 + [1] * 3 + [2] * 2)
    r = neighbourhood_anchors(w, labels, k=3)
    assert r.skipped_classes == {2: 2}
    assert len(r.groups) > 12 // 3  # more anchors than k-same's partition
    keys = [tuple(sorted(g.tolist())) for g in r.groups]
    assert len(set(keys)) == len(keys)
    for g, c, a in zip(r.groups, r.labels, r.anchors):
        assert len(set(g.tolist())) == 3 and (labels[g] == c).all()
        assert torch.allclose(a, w[g].mean(0))
    assert math.isclose(len(build_anchors(w, labels, AnchorsConfig(k=3, groups="neighbourhood", spread="none")).groups), len(r.groups))
    assert len(build_anchors(w, labels, AnchorsConfig(k=3, spread="none")).groups) == 5  # partition: 12 // 3 + 3 // 3


def test_class_targets_are_the_full_size_quota_per_class():
    train = np.array([0] * 3 + [1] * 7)
    assert class_targets(train, 3, 1.0).tolist() == [3, 7, 0]
    assert class_targets(train, 2, 1.5).tolist() == [5, 11]  # ceil(4.5), ceil(10.5)
