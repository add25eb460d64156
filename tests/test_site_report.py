"""SiteReport.to_json: exactly the report.json keys (and order) the coordinator, the pool policy and the tests read."""

from __future__ import annotations

import json

import numpy as np

from client.site_report import (
    AnchorsSection,
    ClassesSection,
    ComparePoint,
    DataSection,
    FilterSection,
    GeneratorSection,
    IdentitySection,
    InversionSection,
    MethodStats,
    NavigationSection,
    SiteReport,
    UtilityScore,
    UtilitySection,
    finite,
    json_default,
)

TOP = ["site_id", "dataset", "method", "device", "data", "identity", "classes", "inversion", "anchors", "navigation",
       "filter", "methods", "methods_note", "utility", "compare", "figures", "n_candidates", "n_accepted", "generator",
       "config_sha256", "timing"]
FILTER = ["sensitivity_ok", "export_blocked", "tau_id", "tau_indep", "delta", "delta_quantile", "planted_total",
          "planted_rejected", "planted_reject_reasons", "planted_mean_dcr", "planted_mean_max_id_prob",
          "planted_heldout_total", "planted_heldout_rejected", "planted_heldout_by_split",
          "planted_heldout_reject_reasons", "reject_reasons", "delta_pixel", "dcr_reject_nearest_split", "zone",
          "heldout_dcr"]
MIA = {"mia_auc": 0.5, "mia_auc_lo": 0.4, "mia_auc_hi": 0.6, "mia_auc_gap": 0.0, "mia_tpr_at_1pct_fpr": 0.01}


def _report(navigation: bool = True, compare: bool = True) -> SiteReport:
    stats = MethodStats(12, 0.3, 0.2, 0.4, 0.5, 0.25, 3)
    nav = NavigationSection(5, 2, 0.1, 1.0, 1.2, 12.0, 8, 0.8, None, 4, 100.0, {"id": 2.0}, {"id": 1.0})
    return SiteReport(
        site_id="site-0", dataset="toy", method="plan", device="cpu",
        data=DataSection(40, 10, 10, 40, "image", ["0", "1"]),
        identity=IdentitySection(0.05, 0.07, 0.6, None, 0.05, 0.5, 0.4),
        classes=ClassesSection(0.5, 0.4, 0),
        inversion=InversionSection(20, 40, True, 2, 16, 0.05, 0.8, 0.6, 0.7, 0.01, 300.0),
        anchors=AnchorsSection({"n_anchors": 10, "per_class": {0: 5, 1: 5}, "group_sizes": {2: 10},
                                "skipped_classes": {}}, 2, 1, 7, 4, []),
        navigation=nav if navigation else None,
        filter=FilterSection(True, False, 0.99, 0.99, 0.34, 0.05, 5, 5, {"dcr": 2}, 0.37, 0.55, 5, 5,
                             {"train": 0, "val": 1, "test": 4}, {"dcr": 4}, {"dcr": 11}, 5.8,
                             {"train": 2, "val": 0, "test": 9}, {"protected": {"train": 40}}, {"mean_dcr": 0.39}),
        methods={"plan": stats, "linear": stats, "random": stats},
        methods_note="note",
        utility=UtilitySection(UtilityScore(0.5, 0.5, 0.0, 3, {"0": 2, "1": 1}), UtilityScore(0.6, 0.6, 0.1, 40),
                               "images passing the per-image filter"),
        compare={m: ComparePoint(0.5, 0.0, 3, dict(MIA)) for m in ("plan", "linear", "random", "real")}
        if compare else None,
        figures={"dcr_hist": "dcr_hist.png"}, n_candidates=12, n_accepted=3,
        generator=GeneratorSection(None, "ab" * 32, 3), config_sha256="cd" * 32, timing={"load": 0.1, "total": 1.0},
    )


def test_to_json_has_todays_keys_in_todays_order():
    j = _report().to_json()
    assert list(j) == TOP
    assert list(j["filter"]) == FILTER
    assert list(j["anchors"]) == ["n_anchors", "per_class", "group_sizes", "skipped_classes", "k", "pairs_m",
                                  "n_pairs_available", "n_paths", "skipped_class_names"]
    assert list(j["inversion"])[-4:] == ["seconds_per_image", "image_steps_per_s", "generator_evals_per_image", "encoder"]
    assert list(j["identity"])[-4:] == ["embedding", "identity_classes", "n_identity_classes", "identity_classes_by_split"]
    assert list(j["utility"]) == ["synthetic", "real", "classifier", "synthetic_set"]
    assert list(j["utility"]["synthetic"]) == ["accuracy", "balanced_accuracy", "qwk", "n_train", "per_class_train"]
    assert "per_class_train" not in j["utility"]["real"]
    assert list(j["compare"]["plan"]) == ["accuracy", "qwk", "n", *MIA]
    assert list(j["methods"]["plan"]) == ["n", "mean_dcr", "p05_dcr", "mean_max_id_prob", "mean_indep_id_prob",
                                          "accept_rate", "n_accepted", "candidates_per_class", "drawn",
                                          "quota_per_class", "stopped"]
    assert j["generator"] == {"checkpoint": None, "sha256": "ab" * 32, "round": 3}


def test_optional_sections_are_absent_not_null():
    j = _report(navigation=False, compare=False).to_json()
    assert "navigation" not in j and "compare" not in j
    assert list(j) == [k for k in TOP if k not in ("navigation", "compare")]


def test_to_json_round_trips_through_report_json():
    j = _report().to_json()
    back = json.loads(json.dumps(j, default=json_default))
    assert back["anchors"]["per_class"] == {"0": 5, "1": 5}  # int keys become strings, as today
    assert back["filter"] == json.loads(json.dumps(j["filter"]))
    assert back["utility"]["synthetic"]["per_class_train"] == {"0": 2, "1": 1}
    assert back["navigation"]["max_offset"] is None and back["identity"]["phi_id_mean_max_prob_val"] is None


def test_non_finite_numbers_become_null_and_numpy_values_plain():
    assert finite(float("nan")) is None and finite(np.float32(np.inf)) is None and finite(np.float64(2.5)) == 2.5
    dumped = json.dumps({"a": np.int64(3), "b": np.float32(np.nan), "c": np.arange(2)}, default=json_default)
    assert json.loads(dumped) == {"a": 3, "b": None, "c": [0, 1]}
    untrained = UtilityScore(None, None, None, 1, trained=False).to_json()
    assert list(untrained) == ["n_train", "accuracy", "balanced_accuracy", "qwk"]
