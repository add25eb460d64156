"""plan_shared.variety: the computed verdict PLAN vs filtered random, and the export method it chooses (auto)."""

import numpy as np

from plan_shared.config import SynthesisConfig
from plan_shared.variety import export_choice, export_coverage, plan_verdict

SYN = SynthesisConfig(verdict_utility_tol=0.02, verdict_tpr_tol=0.01, verdict_id_prob_tol=0.01)


def _pt(acc: float, auc: float, lo: float, hi: float, tpr: float, idp: float) -> dict[str, float]:
    return {"accuracy": acc, "mia_auc": auc, "mia_auc_lo": lo, "mia_auc_hi": hi, "mia_tpr_at_1pct_fpr": tpr,
            "mean_indep_id_prob": idp}


def test_overlapping_intervals_and_equal_rates_are_a_tie_and_random_is_supported():
    v = plan_verdict({"plan": _pt(0.80, 0.48, 0.43, 0.53, 0.01, 0.35),
                      "random": _pt(0.81, 0.49, 0.44, 0.54, 0.01, 0.35)}, SYN)
    assert v["measures"] == {"mia_auc_gap": "tie", "mia_tpr_at_1pct_fpr": "tie", "mean_indep_id_prob": "tie",
                             "attacker_max_id_prob": None}
    assert v["plan_safer_at_equal_utility"] is False and v["supported"] == "random"
    assert "not shown safer" in v["verdict"]


def test_safer_on_one_measure_worse_on_none_at_equal_utility_supports_plan():
    v = plan_verdict({"plan": _pt(0.80, 0.50, 0.46, 0.54, 0.005, 0.30),
                      "random": _pt(0.81, 0.40, 0.35, 0.44, 0.02, 0.36)}, SYN)
    assert v["measures"]["mia_auc_gap"] == "safer" and v["plan_safer_at_equal_utility"] is True
    assert v["supported"] == "plan"


def test_worse_utility_is_not_equal_and_worse_privacy_vetoes_better_utility():
    low = plan_verdict({"plan": _pt(0.70, 0.50, 0.46, 0.54, 0.0, 0.30),
                        "random": _pt(0.80, 0.40, 0.35, 0.44, 0.02, 0.36)}, SYN)
    assert low["plan_safer"] is True and low["equal_utility"] is False and low["supported"] == "random"
    risky = plan_verdict({"plan": _pt(0.90, 0.50, 0.46, 0.54, 0.03, 0.30),
                          "random": _pt(0.80, 0.50, 0.46, 0.54, 0.01, 0.30)}, SYN)
    assert risky["measures"]["mia_tpr_at_1pct_fpr"] == "worse" and risky["supported"] == "random"
    better = plan_verdict({"plan": _pt(0.90, 0.50, 0.46, 0.54, 0.01, 0.30),
                           "random": _pt(0.80, 0.50, 0.46, 0.54, 0.01, 0.30)}, SYN)
    assert better["supported"] == "plan" and better["plan_safer"] is False


def test_missing_method_is_not_measured():
    v = plan_verdict({"plan": _pt(0.8, 0.5, 0.45, 0.55, 0.0, 0.3)}, SYN)
    assert v["supported"] is None and v["verdict"].startswith("not measured")


def test_the_val_based_mia_and_the_attacker_decide_where_the_sites_measured_them():
    # test-based MIA says plan is safer, but the val-based one (same source as train) and the
    # re-identification attacker say it is worse: the verdict follows val and the attacker
    plan = _pt(0.80, 0.50, 0.46, 0.54, 0.0, 0.30) | {"mia_val_auc": 0.62, "mia_val_auc_lo": 0.58,
                                                     "mia_val_auc_hi": 0.66, "mia_val_tpr_at_1pct_fpr": 0.05,
                                                     "attacker_max_id_prob": 0.40}
    rand = _pt(0.80, 0.40, 0.35, 0.44, 0.02, 0.30) | {"mia_val_auc": 0.50, "mia_val_auc_lo": 0.46,
                                                      "mia_val_auc_hi": 0.54, "mia_val_tpr_at_1pct_fpr": 0.01,
                                                      "attacker_max_id_prob": 0.20}
    v = plan_verdict({"plan": plan, "random": rand}, SYN)
    assert v["measures"] == {"mia_val_auc_gap": "worse", "mia_val_tpr_at_1pct_fpr": "worse",
                             "mean_indep_id_prob": "tie", "attacker_max_id_prob": "worse"}
    assert v["plan_safer"] is False and v["supported"] == "random"


# ---------------------------------------------------------------------------------------------- autoexport
RANDOM_WINS = {"plan": _pt(0.80, 0.48, 0.43, 0.53, 0.01, 0.38), "random": _pt(0.81, 0.49, 0.44, 0.54, 0.01, 0.35)}
PLAN_WINS = {"plan": _pt(0.80, 0.50, 0.46, 0.54, 0.005, 0.30), "random": _pt(0.81, 0.40, 0.35, 0.44, 0.02, 0.36)}


def test_auto_exports_what_the_verdict_supports_and_says_why():
    for points, want in ((RANDOM_WINS, "random"), (PLAN_WINS, "plan")):
        v = plan_verdict(points, SYN)
        c = export_choice("auto", v, SYN)
        assert (c.method, c.requested, v["supported"]) == (want, "auto", want)
        assert c.reason == f"auto: the site's verdict supports {want}: {v['verdict']}"


def test_an_explicit_method_is_exported_whatever_the_verdict_says():
    v = plan_verdict(RANDOM_WINS, SYN)
    for m in ("plan", "linear"):
        c = export_choice(m, v, SYN)
        assert (c.method, c.requested) == (m, m) and c.reason.startswith(f"{m} requested explicitly; the verdict: ")
    assert export_choice("random", None, SYN).reason == "random requested explicitly (no verdict: compare is off)"


def test_auto_without_a_verdict_or_an_undecided_one_exports_the_stated_fallback():
    off = export_choice("auto", None, SYN)
    assert off.method == SynthesisConfig().method_fallback == "plan" and "compare is off" in off.reason
    undecided = plan_verdict({"plan": _pt(0.8, 0.5, 0.45, 0.55, 0.0, 0.3)}, SYN)
    c = export_choice("auto", undecided, SynthesisConfig(method_fallback="random"))
    assert c.method == "random" and "cannot decide (not measured" in c.reason
    assert c.reason.endswith("exporting synthesis.method_fallback = random")


def test_the_default_is_plan_and_auto_lets_the_pool_accept_every_method():
    assert SynthesisConfig().method == "plan" and SynthesisConfig().exportable_methods() == ("plan",)
    syn = SynthesisConfig(method="auto")
    assert syn.exportable_methods() == ("plan", "linear", "random")
    assert SynthesisConfig(method="linear").exportable_methods() == ("linear",)


def _cov(pt: dict[str, float], coverage: float | None) -> dict[str, float | None]:
    return {**pt, "coverage": coverage}


def test_a_method_that_cannot_fill_its_quota_loses_to_one_that_does_unless_privacy_says_otherwise():
    syn = SYN.model_copy(update={"verdict_min_coverage": 0.9})
    tie_p, tie_r = _pt(0.80, 0.48, 0.43, 0.53, 0.01, 0.35), _pt(0.81, 0.49, 0.44, 0.54, 0.01, 0.35)
    full = plan_verdict({"plan": _cov(tie_p, 1.0), "random": _cov(tie_r, 0.95)}, syn)
    assert full["supported"] == "random" and full["coverage"] == {"plan": 1.0, "random": 0.95}
    starved = plan_verdict({"plan": _cov(tie_p, 1.0), "random": _cov(tie_r, 0.066)}, syn)
    assert starved["supported"] == "plan"  # a tie on privacy: the full pool wins
    assert "random fills only 0.07 of a class's full-size quota" in starved["verdict"]
    assert starved["verdict"].endswith("the measures support exporting plan")
    # plan worse on a measure: the switch would cost privacy, random stays although it is small
    risky = plan_verdict({"plan": _cov(_pt(0.80, 0.50, 0.46, 0.54, 0.05, 0.35), 1.0),
                          "random": _cov(_pt(0.81, 0.50, 0.46, 0.54, 0.01, 0.35), 0.066)}, syn)
    assert risky["measures"]["mia_tpr_at_1pct_fpr"] == "worse" and risky["supported"] == "random"
    # plan safer but starved: it keeps the verdict (random would cost privacy)
    safe = plan_verdict({"plan": _cov(_pt(0.80, 0.50, 0.46, 0.54, 0.005, 0.30), 0.2),
                         "random": _cov(_pt(0.81, 0.40, 0.35, 0.44, 0.02, 0.36), 1.0)}, syn)
    assert safe["plan_safer"] is True and safe["supported"] == "plan"
    # plan starved and not safer: random, which fills its quota
    weak = plan_verdict({"plan": _cov(_pt(0.95, 0.48, 0.43, 0.53, 0.01, 0.35), 0.2),
                         "random": _cov(tie_r, 1.0)}, syn)
    assert weak["supported"] == "random" and "plan fills only 0.20" in weak["verdict"]
    off = plan_verdict({"plan": _cov(tie_p, 1.0), "random": _cov(tie_r, 0.066)},
                       SYN.model_copy(update={"verdict_min_coverage": 0.0}))
    assert off["supported"] == "random"


def test_export_coverage_is_the_scarcest_class_share_of_its_quota():
    train = np.array([0] * 30 + [1] * 70)
    cov = export_coverage(np.array([0] * 15 + [1] * 70), train, 2, pool_factor=1.0)
    assert cov == {"exported_per_class": [15, 70], "target_per_class": [30, 70], "coverage": 0.5}
    assert export_coverage(np.array([1, 1]), train, 2, pool_factor=None)["coverage"] is None
    assert export_coverage(np.zeros(0, np.int64), train, 2, pool_factor=2.0)["coverage"] == 0.0


def test_precision_recall_in_a_given_feature_space_and_in_phi_class():
    import torch

    from plan_shared.classifiers import embed
    from plan_shared.metrics import precision_recall
    from plan_shared.models import Classifier
    from plan_shared.variety import FEATURE_SPACE, method_precision_recall

    torch.manual_seed(0)
    real, near, far = torch.rand(40, 1, 8, 8), torch.rand(30, 1, 8, 8), torch.rand(30, 1, 8, 8) + 3.0

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    got = method_precision_recall(flat, real, {"near": near, "far": far, "tiny": near[:3]}, 3, "pixels")
    assert (got["near"]["precision"], got["near"]["recall"]) == precision_recall(flat(real), flat(near), 3)
    assert got["far"]["precision"] == 0.0 and got["far"]["recall"] == 0.0  # outside the real manifold
    assert got["tiny"]["precision"] is None and got["near"]["pr_features"] == "pixels"
    phi = Classifier(2, 1, 8, width=4, depth=2, feature_dim=8).eval()
    by_phi = method_precision_recall(phi, real, {"near": near}, 3)["near"]
    assert by_phi["pr_features"] == FEATURE_SPACE
    assert (by_phi["precision"], by_phi["recall"]) == precision_recall(embed(phi, real), embed(phi, near), 3)


def test_fixed_precision_recall_is_the_random_feature_nets_and_not_phi_class():
    import torch

    from plan_shared.gan import RandomFeatureNet
    from plan_shared.metrics import precision_recall
    from plan_shared.variety import FIXED_FEATURES, fixed_precision_recall

    torch.manual_seed(1)
    real, near = torch.rand(40, 1, 16, 16) * 2 - 1, torch.rand(30, 1, 16, 16) * 2 - 1
    flat = torch.full((30, 1, 16, 16), -1.0)  # one black image 30 times: no variety at all
    got = fixed_precision_recall(real, {"near": near, "flat": flat, "tiny": near[:2]}, 3)
    net = RandomFeatureNet(1)
    assert (got["near"]["precision_fixed"], got["near"]["recall_fixed"]) == \
        precision_recall(net.embed(real), net.embed(near), 3)
    assert got["near"]["pr_features_fixed"] == FIXED_FEATURES
    assert got["flat"]["recall_fixed"] is not None and got["flat"]["recall_fixed"] < got["near"]["recall_fixed"]
    assert got["tiny"]["precision_fixed"] is None  # <= k images: undefined, not 0
    assert set(got["near"]) == {"precision_fixed", "recall_fixed", "pr_features_fixed"}
