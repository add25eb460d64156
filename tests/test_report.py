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


def test_report_html_is_self_contained(tmp_path):
    import base64
    from html.parser import HTMLParser

    from PIL import Image

    ev = {"sites": {"site-0": _site([[5, 0], [1, 4]], [[5, 0], [0, 5]], 0.55, 100),
                    "site-1": {"status": "failed", "reason": "<script>alert(1)</script> see [here](https://x.example)"}}}
    syn = {"sites": {"site-0": {"status": "ok", "n_candidates": 9, "n_accepted": 3}}}
    rep = build_report(federation={"rounds_done": 2}, synthesis=syn,
                       downstream={"pool": {"n_images": 3, "n_files": 3, "per_site": {"site-0": 3}}},
                       evaluation=ev, timing={"total_s": 1.0}, config={}, method="plan")
    png = privacy_utility_plot({"plan": (0.55, 0.9)}, tmp_path / "pu.png")
    (tmp_path / "samples").mkdir()
    Image.new("L", (8, 8), 200).save(tmp_path / "samples" / "round-2.png")
    figures = {"privacy vs utility": png.name, "generator after the last round": "samples/round-2.png",
               "gone": "missing.png", "outside": "../elsewhere.png"}
    (tmp_path.parent / "elsewhere.png").write_bytes((tmp_path / "samples" / "round-2.png").read_bytes())
    write_report(rep, tmp_path, figures)
    page = (tmp_path / "report.html").read_text()

    class Refs(HTMLParser):
        def __init__(self):
            super().__init__()
            self.imgs, self.refs, self.tables = [], [], 0

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            self.tables += tag == "table"
            if tag == "img":
                self.imgs.append(a)
            self.refs += [v for k, v in attrs if k in ("src", "href") and v]

    p = Refs()
    p.feed(page)
    assert p.tables == 3  # utility, privacy, synthesis: as in report.md
    assert [i["alt"] for i in p.imgs] == ["privacy vs utility", "generator after the last round"]
    for i, f in zip(p.imgs, (png, tmp_path / "samples" / "round-2.png")):
        assert i["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(i["src"].split(",", 1)[1]) == f.read_bytes()
    assert all(r.startswith("data:") or r == "#" for r in p.refs), p.refs
    assert "http://" not in "".join(p.refs) and "https://" not in "".join(p.refs)
    assert "[figure missing: missing.png]" in page and "[figure missing: ../elsewhere.png]" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "site-1" in page and "0.550" in page  # the tables' content, as in report.md
