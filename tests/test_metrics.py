"""Metrics on passed-in labels / scores / features."""

import math

import numpy as np
import pytest
import torch

from plan_shared import metrics as M
from plan_shared.metrics import bootstrap_tpr_interval, tpr_at_fpr, tpr_chance_band


def test_classification_metrics():
    y = np.array([0, 0, 0, 1])
    p = np.array([0, 0, 1, 1])
    assert M.accuracy(y, p) == 0.75
    assert M.balanced_accuracy(y, p) == pytest.approx((2 / 3 + 1) / 2)
    assert M.qwk([0, 1, 2, 3], [0, 1, 2, 3]) == pytest.approx(1.0)
    assert M.qwk([0, 1, 2], [2, 1, 0]) < 0


def test_mia_auc_and_tpr():
    assert M.mia_auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert M.mia_auc([0.5, 0.5], [0.5, 0.5]) == 0.5
    members = np.arange(100) + 1000.0
    non = np.arange(100, dtype=float)
    assert M.tpr_at_fpr(members, non, 0.01) == 1.0
    assert M.tpr_at_fpr(non, members, 0.01) == 0.0


def test_dcr():
    ref = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    q = torch.tensor([[0.0, 1.0], [3.0, 4.0]])
    assert np.allclose(M.dcr(q, ref), [1.0, 0.0])
    s = M.dcr_summary(np.array([1.0, 2.0, 3.0]))
    assert s["mean_dcr"] == 2.0


def test_frechet_distance_known_values():
    import numpy as np
    import pytest

    from plan_shared.metrics import frechet_distance

    r = np.random.default_rng(0)
    a, b = r.normal(size=(4000, 4)), r.normal(size=(4000, 4))
    assert frechet_distance(a, b) < 0.02
    # mean shift of 2 in every dim: ||mu||^2 = 16; scale 2: trace terms (1 + 4 - 2*2) * 4 = 4
    assert frechet_distance(a, r.normal(loc=2, size=(4000, 4))) == pytest.approx(16, rel=0.05)
    assert frechet_distance(a, r.normal(scale=2, size=(4000, 4))) == pytest.approx(4, rel=0.1)
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :3])


def test_kernel_distance_exact_value_and_no_small_sample_bias():
    import numpy as np
    import pytest

    from plan_shared.metrics import frechet_distance, kernel_distance

    # point masses at 0 and 1 in one dimension: k(0,0) = 1, k(1,1) = 2**3 = 8, k(0,1) = 1 -> 1 + 8 - 2 = 7
    assert kernel_distance(np.zeros((10, 1)), np.ones((12, 1)), subsets=3)[0] == pytest.approx(7.0)
    r = np.random.default_rng(1)
    big = r.normal(size=(3000, 16))
    small = r.normal(size=(100, 16))
    # one distribution: FD grows as the sample shrinks, the kernel distance stays at ~0
    assert frechet_distance(big, small) > 5 * frechet_distance(big, r.normal(size=(3000, 16)))
    kid, sd = kernel_distance(big, small, subsets=20)
    assert abs(kid) < 0.05 and sd > 0
    shifted = kernel_distance(big, r.normal(loc=0.5, size=(100, 16)), subsets=20)[0]
    assert shifted > 10 * abs(kid)
    with pytest.raises(ValueError):
        kernel_distance(big, small[:, :3])


def test_bootstrap_auc_interval_separable_and_inseparable():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    sep = M.bootstrap_auc_interval(rng.normal(10, 1, 200), rng.normal(0, 1, 300), n_boot=200, seed=1)
    assert sep == (1.0, 1.0)  # fully separated in every replicate
    m, n = rng.normal(0, 1, 300), rng.normal(0, 1, 300)  # one distribution: chance
    lo, hi = M.bootstrap_auc_interval(m, n, n_boot=500, seed=1)
    assert lo < 0.5 < hi and 0.04 < hi - lo < 0.15
    assert lo < M.mia_auc(m, n) < hi
    assert (lo, hi) == M.bootstrap_auc_interval(m, n, n_boot=500, seed=1)  # seeded
    # each replicate's AUC is roc_auc_score's (ties count half): all-tied scores give exactly 0.5
    assert M.bootstrap_auc_interval(np.zeros(20), np.zeros(30), n_boot=50) == (0.5, 0.5)
    shift = M.bootstrap_auc_interval(m + 0.5, n, n_boot=500, seed=1)
    assert shift[0] > 0.5 and shift[0] < roc_auc_score(np.r_[np.ones(300), np.zeros(300)], np.r_[m + 0.5, n]) < shift[1]
    assert all(np.isnan(M.bootstrap_auc_interval([], [1.0, 2.0])))


def _blobs(centres: np.ndarray, n: int, seed: int, spread: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([c + spread * rng.standard_normal((n, centres.shape[1])) for c in centres])


def test_precision_recall_identical_sets_score_one():
    x = np.random.default_rng(0).standard_normal((60, 4))
    assert M.precision_recall(x, x, k=3) == (1.0, 1.0)


def test_precision_recall_disjoint_far_sets_score_zero():
    rng = np.random.default_rng(1)
    real, fake = rng.standard_normal((50, 4)), rng.standard_normal((50, 4)) + 100.0
    assert M.precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_fake_covering_half_the_modes_has_recall_one_half():
    angle = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    centres = 20.0 * np.stack([np.cos(angle), np.sin(angle)], 1)  # eight well separated 2-D modes
    real = _blobs(centres, 100, seed=2, spread=1.0)
    fake = _blobs(centres[:4], 200, seed=3, spread=1.0)  # only modes 0-3
    precision, recall = M.precision_recall(real, fake, k=3)
    assert precision > 0.9  # the fakes lie on the real manifold
    assert recall == pytest.approx(0.5, abs=0.05)


def test_precision_recall_refuses_too_few_rows():
    with pytest.raises(ValueError, match="more than k rows"):
        M.precision_recall(np.zeros((3, 2)), np.ones((10, 2)), k=3)


def test_roc_auc_binary_multiclass_and_undefined():
    y = np.array([0, 0, 1, 1])
    assert M.roc_auc(y, np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])) == 1.0
    y3 = np.array([0, 1, 2, 0, 1, 2])
    assert M.roc_auc(y3, np.eye(3)[y3] * 0.8 + 0.2 / 3) == pytest.approx(1.0)
    assert np.isnan(M.roc_auc(np.array([0, 0]), np.array([[0.5, 0.5], [0.4, 0.6]])))
    s = M.scores_from_probs(y, np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.2, 0.8]]))
    assert s["accuracy"] == 0.75 and s["roc_auc"] == pytest.approx(2.5 / 4) and {"balanced_accuracy", "qwk"} <= s.keys()


def test_tpr_chance_band_is_the_beta_law_of_the_share_above_the_fpr_threshold():
    mean, hi = tpr_chance_band(90)  # j = 1: the largest non-member sets the threshold
    assert mean == pytest.approx(1 / 91) and hi == pytest.approx(1 - 0.05 ** (1 / 90), rel=1e-6)
    mean, hi = tpr_chance_band(270)  # j = 3
    assert mean == pytest.approx(3 / 271) and 0.02 < hi < 0.025
    assert all(math.isnan(v) for v in tpr_chance_band(0))
    # simulated: members and non-members from one law; the 95 % quantile of tpr_at_fpr matches the band
    rng = np.random.default_rng(1)
    sims = [tpr_at_fpr(rng.normal(size=2000), rng.normal(size=90)) for _ in range(400)]
    assert np.mean(sims) == pytest.approx(1 / 91, rel=0.2)
    assert np.quantile(sims, 0.95) == pytest.approx(tpr_chance_band(90)[1], rel=0.25)


def test_bootstrap_tpr_interval_brackets_the_tpr_and_narrows_with_more_nonmembers():
    rng = np.random.default_rng(0)
    m = rng.normal(0.5, 1.0, 800)
    few, many = rng.normal(size=90), rng.normal(size=3000)
    lo_f, hi_f = bootstrap_tpr_interval(m, few)
    lo_m, hi_m = bootstrap_tpr_interval(m, many)
    assert lo_f <= tpr_at_fpr(m, few) <= hi_f and lo_m <= tpr_at_fpr(m, many) <= hi_m
    assert hi_m - lo_m < hi_f - lo_f
    assert bootstrap_tpr_interval(m, few, seed=3) == bootstrap_tpr_interval(m, few, seed=3)
    assert all(math.isnan(v) for v in bootstrap_tpr_interval(m, np.zeros(0)))
