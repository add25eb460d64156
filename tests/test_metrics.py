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
