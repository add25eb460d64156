"""Federation report: pooled metrics from confusion matrices, schema, PNG and markdown."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.report import build_report, metrics_from_confusion, privacy_utility_plot, write_report


def _site(cm_syn, cm_real, mia, n_members):
    k = len(cm_syn)
    flat = lambda cm: [int(v) for row in cm for v in row]  # noqa: E731
    d = {"status": "ok", "num_classes": k, "synthetic.confusion": flat(cm_syn), "real.confusion": flat(cm_real)}
    for which, cm in (("synthetic", cm_syn), ("real", cm_real)):
        for key, v in metrics_from_confusion(np.asarray(cm)).items():
            d[f"{which}.{key}"] = v
        d[f"{which}.n"] = int(np.sum(cm))
    d.update({"privacy.mia_auc": mia, "privacy.mia_tpr_at_1pct_fpr": 0.0, "privacy.dcr_ratio": 1.0,
              "privacy.too_close_rate": 0.0, "privacy.n_members": n_members, "privacy.n_synthetic": 10})
    return d


def test_metrics_from_confusion():
    m = metrics_from_confusion(np.array([[8, 2], [1, 9]]))
    assert m["accuracy"] == pytest.approx(17 / 20)
    assert m["balanced_accuracy"] == pytest.approx((0.8 + 0.9) / 2)
    assert -1 <= m["qwk"] <= 1


def test_build_report_pools_exactly(tmp_path):
    ev = {"sites": {"site-0": _site([[5, 0], [5, 0]], [[5, 0], [0, 5]], 0.6, 100),
                    "site-1": _site([[0, 5], [0, 5]], [[4, 1], [1, 4]], 0.5, 300),
                    "site-2": {"status": "failed", "reason": "boom"}}}
    syn = {"sites": {"site-0": {"status": "ok", "n_accepted": 3}, "site-2": {"status": "failed", "reason": "boom"}}}
    rep = build_report(federation={"rounds_done": 2}, synthesis=syn,
                       downstream={"pool": {"n_images": 6, "n_files": 6, "per_site": {"site-0": 6}}},
                       evaluation=ev, timing={"total_s": 1.0}, config={}, method="plan")
    assert rep["sites"] == ["site-0", "site-1", "site-2"]
    pooled = rep["utility"]["pooled"]["synthetic"]
    assert pooled["confusion"] == [[5, 5], [5, 5]] and pooled["accuracy"] == pytest.approx(0.5)
    assert rep["utility"]["real_accuracy"] == pytest.approx(18 / 20)
    assert rep["privacy"]["mia_auc"] == pytest.approx((0.6 * 100 + 0.5 * 300) / 400)
    assert rep["utility"]["sites"]["site-2"]["status"] == "failed"
    for key in ("sites", "rounds", "pool", "utility", "privacy", "timing"):
        assert key in rep
    for key in ("mia_auc", "mia_tpr_at_1pct_fpr", "dcr_ratio", "too_close_rate"):
        assert key in rep["privacy"]
    png = privacy_utility_plot({"plan": (0.5, 0.8), "real": (0.7, 0.9), "linear": (None, 0.7)}, tmp_path / "pu.png")
    rj, md = write_report(rep, tmp_path, {"privacy vs utility": png.name})
    assert json.loads(rj.read_text())["method"] == "plan"
    text = md.read_text()
    assert "site-2" in text and "failed" in text and "pu.png" in text and png.stat().st_size > 1000
