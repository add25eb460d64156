"""Metrics on passed-in labels / scores / features."""

import numpy as np
import pytest
import torch

from plan_shared import metrics as M


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
