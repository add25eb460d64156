"""Variety of each method's images: precision and recall against the real train split.

Features are the penultimate layer of phi_class (the site's class classifier, trained on
its real train split; L2-normalised): a space the pipeline trains itself, where
distances follow the class-relevant content rather than pixels. The metric itself is
:func:`plan_shared.metrics.precision_recall` (Kynkäänniemi et al. 2019).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from plan_shared.classifiers import embed
from plan_shared.config import METHODS, Method, SynthesisConfig, SynthesisMethod
from plan_shared.metrics import precision_recall
from plan_shared.models import Classifier
from plan_shared.pool_plan import class_targets

FEATURE_SPACE = "phi_class penultimate features (L2-normalised)"
FIXED_FEATURES = "fixed random-feature net (plan_shared.gan.RandomFeatureNet, watch-point seed)"


def method_precision_recall(model: Classifier | Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                            sets: dict[str, torch.Tensor], k: int,
                            features: str = FEATURE_SPACE) -> dict[str, dict[str, float | int | str | None]]:
    """``{method: {"precision", "recall", "pr_n", "pr_k", "pr_features"}}``; None where a set has <= k images.

    ``model``: phi_class (its L2-normalised penultimate features, the pipeline's space) or any
    images -> features function, e.g. a feature net that navigation never optimises against
    (PLAN's L_class pulls its points together in phi_class's own space); ``features`` names it."""
    def feats(x: torch.Tensor) -> torch.Tensor:
        return embed(model, x) if isinstance(model, Classifier) else model(x)

    real_f = feats(real)
    out: dict[str, dict[str, float | int | str | None]] = {}
    for name, x in sets.items():
        rec: dict[str, float | int | str | None] = {"precision": None, "recall": None, "pr_n": len(x),
                                                     "pr_k": k, "pr_features": features}
        if len(x) > k and len(real_f) > k:
            rec["precision"], rec["recall"] = precision_recall(real_f, feats(x), k)
        out[name] = rec
    return out


def export_coverage(exported_labels: np.ndarray, train_labels: np.ndarray, num_classes: int,
                    pool_factor: float | None) -> dict[str, Any]:
    """How much of the full-size quota an export set fills: ``exported_per_class``, ``target_per_class``
    (plan_shared.pool_plan.class_targets) and ``coverage``, the smallest exported / target over the classes
    with a positive target (None without pool_factor: there is no quota)."""
    got = np.bincount(np.asarray(exported_labels, dtype=np.int64), minlength=num_classes).astype(int)
    out: dict[str, Any] = {"exported_per_class": got.tolist(), "target_per_class": None, "coverage": None}
    if pool_factor is None:
        return out
    target = class_targets(train_labels, num_classes, pool_factor)
    live = target > 0
    out["target_per_class"] = target.astype(int).tolist()
    out["coverage"] = round(float(min(got[live] / target[live])), 4) if live.any() else None
    return out


def _mia_prefix(p: Mapping[str, Any]) -> str:
    """The distance MIA the verdict reads: non-members = val (``mia_val_*``, drawn from the train split's
    source) where the entry has it, else non-members = test (``mia_*``)."""
    return "mia_val" if p.get("mia_val_auc") is not None else "mia"


def _gap_interval(p: Mapping[str, Any], prefix: str = "mia") -> tuple[float, float] | None:
    """|AUC - 0.5| as an interval from the MIA's 95 % bootstrap interval of the AUC."""
    lo, hi = p.get(f"{prefix}_auc_lo"), p.get(f"{prefix}_auc_hi")
    if lo is None or hi is None:
        return None
    lo_gap = 0.0 if lo <= 0.5 <= hi else min(abs(lo - 0.5), abs(hi - 0.5))
    return lo_gap, max(abs(lo - 0.5), abs(hi - 0.5))


def _compare(a: float | None, b: float | None, tol: float) -> str | None:
    """'safer' when ``a`` (lower is safer) is below ``b`` by more than ``tol``, 'worse' above, else 'tie'."""
    if a is None or b is None:
        return None
    return "safer" if a < b - tol else "worse" if a > b + tol else "tie"


def plan_verdict(points: Mapping[str, Mapping[str, Any]], syn: SynthesisConfig) -> dict[str, Any]:
    """Is PLAN safer than filtered random samples at equal utility? Computed from one site's ``points``.

    ``points[method]``: the report's compare entry (accuracy, the distance MIA ``mia_val_*`` with
    non-members = val, else ``mia_*`` with non-members = test: AUC interval and TPR at 1 % FPR;
    ``attacker_max_id_prob`` of the audit's re-identification attacker where it ran) plus
    ``mean_indep_id_prob`` (the independent identity model, which navigation never uses). Per
    attacker measure PLAN is 'safer', 'worse' or 'tie' against random: the MIA's |AUC - 0.5|
    only when the bootstrap intervals do not overlap, TPR at 1 % FPR beyond
    ``syn.verdict_tpr_tol`` (a few members either way is noise), each identity probability
    beyond ``syn.verdict_id_prob_tol``. PLAN is safer when some measure says safer
    and none worse; at equal utility when its accuracy is at least random's minus
    ``syn.verdict_utility_tol``. ``supported`` is the export method the measures
    support: plan when it is safer at equal utility, or better in utility and worse on no
    measure; random otherwise.
    """
    utility_tol = syn.verdict_utility_tol
    plan, rand = points.get("plan"), points.get("random")
    if plan is None or rand is None or plan.get("accuracy") is None or rand.get("accuracy") is None:
        return {"plan_safer_at_equal_utility": None, "supported": None,
                "verdict": "not measured: plan and random both need a utility and a membership inference"}
    mia = _mia_prefix(plan) if _mia_prefix(plan) == _mia_prefix(rand) else "mia"
    gp, gr = _gap_interval(plan, mia), _gap_interval(rand, mia)
    gap = None if gp is None or gr is None else "safer" if gp[1] < gr[0] else "worse" if gp[0] > gr[1] else "tie"
    tpr = f"{mia}_tpr_at_1pct_fpr"
    measures = {
        f"{mia}_auc_gap": gap,
        tpr: _compare(plan.get(tpr), rand.get(tpr), syn.verdict_tpr_tol),
        "mean_indep_id_prob": _compare(plan.get("mean_indep_id_prob"), rand.get("mean_indep_id_prob"), syn.verdict_id_prob_tol),
        "attacker_max_id_prob": _compare(plan.get("attacker_max_id_prob"), rand.get("attacker_max_id_prob"),
                                         syn.verdict_id_prob_tol),
    }
    said = [v for v in measures.values() if v is not None]
    safer = "safer" in said and "worse" not in said
    acc_p, acc_r = float(plan["accuracy"]), float(rand["accuracy"])
    equal_utility = acc_p >= acc_r - utility_tol
    better_utility = acc_p > acc_r + utility_tol
    ok = safer and equal_utility
    supported = "plan" if ok or (better_utility and "worse" not in said) else "random"
    how = ", ".join(f"{k} {v}" for k, v in measures.items() if v is not None)
    verdict = (f"plan is {'safer' if safer else 'not shown safer'} than filtered random ({how}); "
               f"accuracy {acc_p:.3f} vs {acc_r:.3f} ({'equal or better' if equal_utility else 'worse'} utility "
               f"at tolerance {utility_tol:g})")
    cov = {"plan": plan.get("coverage"), "random": rand.get("coverage")}
    fills = {m: c is None or c >= syn.verdict_min_coverage for m, c in cov.items()}
    other = "random" if supported == "plan" else "plan"
    # A pool that lost most of a class is no use to a researcher: the method that fills its quota wins,
    # unless the switch costs privacy (to plan: plan worse on no measure; to random: plan not safer).
    if not fills[supported] and fills[other] and ("worse" not in said if other == "plan" else not safer):
        verdict += (f"; {supported} fills only {cov[supported]:.2f} of a class's full-size quota (< "
                    f"{syn.verdict_min_coverage:g}), {other} "
                    + ("has no quota" if cov[other] is None else f"fills {cov[other]:.2f}"))
        supported = other
    verdict += f"; the measures support exporting {supported}"
    return {"plan_safer_at_equal_utility": ok, "plan_safer": safer, "equal_utility": equal_utility,
            "measures": measures, "accuracy": {"plan": acc_p, "random": acc_r}, "coverage": cov,
            "supported": supported, "verdict": verdict}


@dataclass(frozen=True)
class ExportChoice:
    """The method a site exports (report key ``method``), what was asked for and why (``method_reason``)."""

    method: Method
    requested: SynthesisMethod
    reason: str


def export_choice(requested: SynthesisMethod, verdict: Mapping[str, Any] | None, syn: SynthesisConfig) -> ExportChoice:
    """The export method for ``requested`` (synthesis.method or its override) given the site's ``verdict``.

    A named method is exported as asked. ``auto`` exports what the verdict supports
    (:func:`plan_verdict`'s ``supported``); without a verdict (compare off) or when it cannot
    decide, ``syn.method_fallback``. The reason quotes the verdict where there is one.
    """
    said = verdict.get("verdict") if verdict is not None else None
    if requested != "auto":
        forced = next(m for m in METHODS if m == requested)
        tail = f"; the verdict: {said}" if said else " (no verdict: compare is off)"
        return ExportChoice(forced, requested, f"{forced} requested explicitly{tail}")
    supported = verdict.get("supported") if verdict is not None else None
    for m in METHODS:
        if supported == m:
            return ExportChoice(m, requested, f"auto: the site's verdict supports {m}: {said}")
    fb = syn.method_fallback
    why = ("no verdict: compare is off (synthesis.compare)" if verdict is None
           else f"the verdict cannot decide ({said})")
    return ExportChoice(fb, requested, f"auto: {why}; exporting synthesis.method_fallback = {fb}")


def fixed_precision_recall(real: torch.Tensor, sets: dict[str, torch.Tensor],
                           k: int) -> dict[str, dict[str, float | int | str | None]]:
    """:func:`method_precision_recall` in the fixed random-feature net (plan_shared.gan.RandomFeatureNet with the
    watch-point seed), keys ``precision_fixed``, ``recall_fixed``, ``pr_features_fixed``: a space that neither
    navigation nor the filter optimises against, where phi_class's own space is biased against PLAN (its L_class
    pulls PLAN's points together there)."""
    from plan_shared.gan import RandomFeatureNet

    net = RandomFeatureNet(int(real.shape[1]))
    return {name: {"precision_fixed": pr["precision"], "recall_fixed": pr["recall"],
                   "pr_features_fixed": pr["pr_features"]}
            for name, pr in method_precision_recall(net.embed, real, sets, k, FIXED_FEATURES).items()}
