"""Metrics computed on labels, scores or features passed in (no model calls here).

Utility: :func:`accuracy`, :func:`balanced_accuracy`, :func:`qwk` (quadratic-weighted
kappa for graded labels). Privacy: :func:`mia_auc` (with :func:`bootstrap_auc_interval`) and :func:`tpr_at_fpr` for a
membership-inference score (higher = "member"), :func:`dcr` (distance to the closest
record) and :func:`dcr_summary`. With class probabilities: :func:`roc_auc` (one-vs-rest macro
for more than two classes) and :func:`scores_from_probs`. Variety: :func:`precision_recall`
(Kynkäänniemi et al. 2019, k-NN manifolds) on features passed in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

ArrayLike = Any  # numpy arrays, torch tensors or sequences of numbers


def _np(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    y_true, y_pred = _np(y_true), _np(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else float("nan")


def balanced_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    y_true, y_pred = _np(y_true), _np(y_pred)
    from sklearn.metrics import balanced_accuracy_score  # sklearn on first use: ~0.7 s CPU the FD watch-point skips

    return float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else float("nan")


def qwk(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Quadratic-weighted Cohen kappa (1 = perfect, 0 = chance); nan when undefined."""
    y_true, y_pred = _np(y_true), _np(y_pred)
    if len(y_true) == 0:
        return float("nan")
    if len(np.unique(np.concatenate([y_true, y_pred]))) < 2:
        return float("nan")
    from sklearn.metrics import cohen_kappa_score

    return float(cohen_kappa_score(y_true, y_pred, weights="quadratic"))


def classification_report(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    return {"accuracy": accuracy(y_true, y_pred), "balanced_accuracy": balanced_accuracy(y_true, y_pred), "qwk": qwk(y_true, y_pred)}


def _mia_inputs(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    m, n = _np(member_scores).astype(np.float64), _np(nonmember_scores).astype(np.float64)
    y = np.concatenate([np.ones(len(m)), np.zeros(len(n))])
    return y, np.concatenate([m, n])


def mia_auc(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> float:
    """ROC AUC of a membership score (higher = predicted member); 0.5 = chance."""
    y, s = _mia_inputs(member_scores, nonmember_scores)
    if len(np.unique(y)) < 2:
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def tpr_at_fpr(member_scores: ArrayLike, nonmember_scores: ArrayLike, fpr: float = 0.01) -> float:
    """Largest true-positive rate with false-positive rate <= ``fpr``."""
    y, s = _mia_inputs(member_scores, nonmember_scores)
    if len(np.unique(y)) < 2:
        return float("nan")
    from sklearn.metrics import roc_curve

    f, t, _ = roc_curve(y, s)
    ok = f <= fpr
    return float(t[ok].max()) if ok.any() else 0.0


def tpr_chance_band(n_nonmembers: int, fpr: float = 0.01, level: float = 0.95) -> tuple[float, float]:
    """Mean and one-sided ``level`` quantile of :func:`tpr_at_fpr` when members and non-members are alike.

    At FPR <= ``fpr`` the threshold sits just above the (j = floor(fpr * n) + 1)-th largest of the
    ``n`` non-member scores; with exchangeable scores the share of (many) members above it is
    Beta(j, n + 1 - j): mean j / (n + 1). With 90 non-members (j = 1) chance alone gives a TPR of
    1.1 % on average and above 3.3 % one time in twenty: a TPR target of a few per cent is only
    testable with a few hundred non-members. (nan, nan) without non-members.
    """
    if n_nonmembers < 1:
        return float("nan"), float("nan")
    from scipy.stats import beta

    j = int(np.floor(fpr * n_nonmembers + 1e-9)) + 1
    if j > n_nonmembers:
        return 1.0, 1.0
    return j / (n_nonmembers + 1), float(beta.ppf(level, j, n_nonmembers + 1 - j))


def bootstrap_tpr_interval(member_scores: ArrayLike, nonmember_scores: ArrayLike, fpr: float = 0.01,
                           n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`tpr_at_fpr` (groups resampled separately, sizes kept; seeded).

    Each replicate's TPR is the share of its members scoring above the (floor(fpr * n) + 1)-th largest
    of its non-members, which is what :func:`tpr_at_fpr` returns. (nan, nan) when a group is empty.
    """
    m, n = _np(member_scores).astype(np.float64), _np(nonmember_scores).astype(np.float64)
    if len(m) == 0 or len(n) == 0 or n_boot < 1:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    nm, nn = len(m), len(n)
    k0 = int(np.floor(fpr * nn + 1e-9))
    if k0 >= nn:
        return 1.0, 1.0
    chunk = max(1, 2_000_000 // (nm + nn))
    tprs = []
    for b0 in range(0, n_boot, chunk):
        b = min(chunk, n_boot - b0)
        non = n[rng.integers(0, nn, (b, nn))]
        bar = -np.partition(-non, k0, axis=1)[:, k0]  # the (k0 + 1)-th largest non-member score
        tprs.append((m[rng.integers(0, nm, (b, nm))] > bar[:, None]).mean(1))
    a = (1.0 - level) / 2
    lo, hi = np.quantile(np.concatenate(tprs), [a, 1.0 - a])
    return float(lo), float(hi)


def bootstrap_auc_interval(member_scores: ArrayLike, nonmember_scores: ArrayLike, n_boot: int = 1000, level: float = 0.95,
                           seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`mia_auc` (members and non-members resampled
    separately with replacement, sizes kept; seeded). (nan, nan) when a group is empty.

    Each replicate's AUC is the Mann-Whitney statistic from mid-ranks (ties count half),
    i.e. what ``roc_auc_score`` returns, computed for many replicates at once.
    """
    from scipy.stats import rankdata

    m, n = _np(member_scores).astype(np.float64), _np(nonmember_scores).astype(np.float64)
    if len(m) == 0 or len(n) == 0 or n_boot < 1:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    nm, nn = len(m), len(n)
    chunk = max(1, 2_000_000 // (nm + nn))
    aucs = []
    for b0 in range(0, n_boot, chunk):
        b = min(chunk, n_boot - b0)
        s = np.concatenate([m[rng.integers(0, nm, (b, nm))], n[rng.integers(0, nn, (b, nn))]], axis=1)
        r = rankdata(s, axis=1)[:, :nm].sum(1)
        aucs.append((r - nm * (nm + 1) / 2) / (nm * nn))
    a = (1.0 - level) / 2
    lo, hi = np.quantile(np.concatenate(aucs), [a, 1.0 - a])
    return float(lo), float(hi)


def dcr(query: torch.Tensor, reference: torch.Tensor, batch: int = 1024) -> np.ndarray:
    """Euclidean distance of every query feature row to the closest reference row."""
    out = []
    for i in range(0, len(query), batch):
        out.append(torch.cdist(query[i : i + batch].double(), reference.double()).min(1).values.float())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def dcr_summary(d: ArrayLike) -> dict[str, float]:
    d = _np(d).astype(np.float64)
    if len(d) == 0:
        return {"mean_dcr": float("nan"), "p05_dcr": float("nan")}
    return {"mean_dcr": float(d.mean()), "p05_dcr": float(np.quantile(d, 0.05))}


def _feature_pair(feats_a: ArrayLike, feats_b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Two feature sets as float64 ``[N >= 2, D]`` arrays of equal D, or a ValueError saying what is wrong."""
    a, b = _np(feats_a).astype(np.float64), _np(feats_b).astype(np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two feature sets [N>=2, D] of equal D, got {a.shape} and {b.shape}")
    return a, b


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` (FID's formula).

    The features come from a network trained locally (no downloaded Inception weights);
    values are comparable only between sets embedded by the same network.
    """
    from scipy import linalg

    a, b = _feature_pair(feats_a, feats_b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        eps = np.eye(a.shape[1]) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def kernel_distance(feats_a: ArrayLike, feats_b: ArrayLike, subset: int = 1000, subsets: int = 50, seed: int = 0) -> tuple[float, float]:
    """Kernel distance (KID's unbiased MMD² with the cubic polynomial kernel) between two feature sets.

    Unlike the Fréchet distance it has no bias that depends on the sample sizes, so sets of
    different sizes compare, and two samples of one distribution score about 0 (it can dip
    below 0). Mean and standard deviation over ``subsets`` random subsets of at most
    ``subset`` rows of each set.
    """
    a, b = _feature_pair(feats_a, feats_b)
    d = a.shape[1]
    m = min(subset, len(a), len(b))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        off = m * (m - 1)
        vals.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def roc_auc(y_true: ArrayLike, probs: ArrayLike) -> float:
    """ROC AUC of class probabilities ``[N, K]``: P(class 1) for two classes, one-vs-rest macro mean
    for more; nan when a class of ``0..K-1`` is missing from ``y_true`` (undefined)."""
    y, p = _np(y_true).astype(np.int64), _np(probs).astype(np.float64)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"roc_auc: need probabilities [N, K] for N labels, got {p.shape} for {len(y)} labels")
    k = p.shape[1]
    if len(y) == 0 or len(np.unique(y)) < k:
        return float("nan")
    from sklearn.metrics import roc_auc_score

    if k == 2:
        return float(roc_auc_score(y, p[:, 1]))
    return float(roc_auc_score(y, p / p.sum(1, keepdims=True), multi_class="ovr", average="macro", labels=list(range(k))))


def scores_from_probs(y_true: ArrayLike, probs: ArrayLike) -> dict[str, float]:
    """accuracy, balanced accuracy, QWK (Cohen's kappa, quadratic weights: the report's kappa; equal to
    the unweighted kappa for two classes) and ROC AUC of class probabilities ``[N, K]``."""
    p = _np(probs)
    pred = p.argmax(1) if len(p) else np.zeros(0, np.int64)
    return {**classification_report(y_true, pred), "roc_auc": roc_auc(y_true, p)}


def _kth_nn_radii(feats: torch.Tensor, k: int, batch: int = 1024) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row of the same set."""
    out = []
    for i in range(0, len(feats), batch):
        d = torch.cdist(feats[i : i + batch], feats)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st is the row itself (distance 0)
    return torch.cat(out)


def _covered(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """For every query row: does it lie inside the k-NN ball of some reference row."""
    out = []
    for i in range(0, len(query), batch):
        d = torch.cdist(query[i : i + batch], ref)
        out.append((d <= radii.unsqueeze(0)).any(1))
    return torch.cat(out)


def precision_recall(real_features: ArrayLike, fake_features: ArrayLike, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of a generated set against a real one.

    The manifold of a set is the union of balls around its rows, each with the radius of its
    k-th nearest neighbour in the same set. Precision = share of fake rows inside the real
    manifold (realism); recall = share of real rows inside the fake manifold (coverage,
    i.e. variety). Features ``[N, D]`` come from a network the caller chose; both sets need
    more than ``k`` rows.
    """
    r, f = _feature_pair(real_features, fake_features)
    if k < 1 or len(r) <= k or len(f) <= k:
        raise ValueError(f"precision_recall: need k >= 1 and more than k rows in each set, got k={k}, "
                         f"{len(r)} real and {len(f)} fake rows")
    rt, ft = torch.from_numpy(r), torch.from_numpy(f)
    precision = float(_covered(ft, rt, _kth_nn_radii(rt, k)).double().mean())
    recall = float(_covered(rt, ft, _kth_nn_radii(ft, k)).double().mean())
    return precision, recall
