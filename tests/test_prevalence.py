"""match_prevalence: the exported class shares follow the site's real train priors."""

from __future__ import annotations

import numpy as np
import pytest

from plan_shared.prevalence import class_priors, match_prevalence


def test_shares_follow_the_priors_and_keep_the_largest_fitting_set():
    labels = np.array([0] * 100 + [1] * 100)  # balanced synthetic set
    priors = np.array([0.25, 0.75])  # real: three quarters class 1
    idx = match_prevalence(labels, priors, seed=0)
    counts = np.bincount(labels[idx], minlength=2)
    assert counts.tolist() == [33, 100]  # class 1 is the bound: all 100 kept, 33 of class 0
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)


def test_seeded_and_drops_classes_without_prior():
    labels = np.random.default_rng(0).integers(0, 3, 300)
    priors = np.array([0.5, 0.5, 0.0])
    a, b = match_prevalence(labels, priors, seed=4), match_prevalence(labels, priors, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, match_prevalence(labels, priors, seed=5))
    kept = np.bincount(labels[a], minlength=3)
    assert kept[2] == 0 and abs(int(kept[0]) - int(kept[1])) <= 1


def test_class_priors_and_bad_input_named():
    assert class_priors(np.array([0, 1, 1, 1]), 2).tolist() == [0.25, 0.75]
    with pytest.raises(ValueError, match="summing to 1"):
        match_prevalence(np.array([0, 1]), np.array([0.5, 0.6]), seed=0)
    with pytest.raises(ValueError, match=r"0\.\.1"):
        match_prevalence(np.array([0, 2]), np.array([0.5, 0.5]), seed=0)
    assert len(match_prevalence(np.zeros(0, np.int64), np.array([0.5, 0.5]), seed=0)) == 0
