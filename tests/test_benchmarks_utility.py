"""The pure functions of benchmarks/utility_recipes.py: scores, the best-threshold diagnostic, ratios, the table."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "utility_recipes.py"


@pytest.fixture(scope="module")
def ur() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_utility_recipes", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _brute_best(y: np.ndarray, p1: np.ndarray) -> float:
    cands = np.concatenate([[p1.max() + 1.0], np.unique(p1)])  # predict 1 where p1 >= t
    return max(float(((p1 >= t).astype(int) == y).mean()) for t in cands)


def test_best_threshold_matches_brute_force(ur: ModuleType) -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        y = rng.integers(0, 2, n)
        p1 = np.round(rng.random(n), 1)  # ties on purpose
        got = ur.best_threshold(y, p1)
        assert got["best_threshold_accuracy"] == pytest.approx(_brute_best(y, p1))
        # the threshold it names gives that accuracy
        assert float(((p1 >= got["best_threshold"]).astype(int) == y).mean()) == pytest.approx(got["best_threshold_accuracy"])


def test_best_threshold_finds_a_shifted_threshold(ur: ModuleType) -> None:
    # perfectly ranked but every P(class 1) below 0.5: argmax accuracy is the class-0 share, best threshold 1.0
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    p1 = np.array([0.05, 0.1, 0.15, 0.3, 0.35, 0.4, 0.45])
    probs = np.stack([1 - p1, p1], 1)
    sc = ur.score(y, probs, 2)
    assert sc["accuracy"] == pytest.approx(3 / 7)
    assert sc["best_threshold_accuracy"] == 1.0
    assert 0.15 < sc["best_threshold"] < 0.3
    assert sc["roc_auc"] == 1.0
    assert sc["recall"] == [1.0, 0.0]
    assert sc["predicted_prevalence"] == [1.0, 0.0]


def test_score_agrees_with_sklearn(ur: ModuleType) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    probs = rng.dirichlet(np.ones(3), 60)
    sc = ur.score(y, probs, 3)
    pred = probs.argmax(1)
    assert sc["accuracy"] == pytest.approx(float((pred == y).mean()))
    assert sc["kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert sc["roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert np.asarray(sc["confusion"]).sum() == 60 and "best_threshold" not in sc
    assert sum(sc["true_prevalence"]) == pytest.approx(1.0)


def test_score_refuses_misshaped_probabilities(ur: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"\[4, 2\]"):
        ur.score(np.zeros(4, int), np.zeros((4, 3)), 2)


def test_ratios_and_table(ur: ModuleType) -> None:
    by_set = {"pool": {"accuracy": 0.81, "kappa": 0.6, "roc_auc": 0.9},
              "central_real": {"accuracy": 0.9, "kappa": 0.8, "roc_auc": 0.95},
              "site_alone": {"accuracy": 0.9, "kappa": 0.0, "roc_auc": float("nan")}}
    r = ur.ratios(by_set)
    assert set(r) == {"central_real", "site_alone"}
    assert r["central_real"]["accuracy"] == pytest.approx(0.9)
    assert r["central_real"]["kappa"] == pytest.approx(0.75)
    assert math.isnan(r["site_alone"]["kappa"]) and math.isnan(r["site_alone"]["roc_auc"])
    assert ur.ratios({"central_real": by_set["central_real"]}) == {}
    text = ur.table({"plain": {"scores": by_set, "train_s": {"pool": 12.0, "central_real": 3.5}}})
    rows = text.splitlines()[2:]
    assert len(rows) == 3 and rows[1].split()[:2] == ["plain", "central_real"]
    assert "0.900 0.750 0.947" in rows[1]


def test_prevalence(ur: ModuleType) -> None:
    assert ur.prevalence(np.array([0, 1, 1, 1]), 3) == [0.25, 0.75, 0.0]
