"""Federation report: pooled metrics from confusion matrices, schema, PNG and markdown."""

from __future__ import annotations

import json

import numpy as np
import pytest

from plan_shared.protocol import ClassifierScore, SiteEvaluation, SynthesisSummary
from server.report import (
    PhaseResult,
    SiteFailure,
    build_report,
    metrics_from_confusion,
    privacy_utility_plot,
    synthesis_entry,
    write_report,
)


def _score(cm) -> ClassifierScore:
    cm = np.asarray(cm, dtype=np.int64)
    m = metrics_from_confusion(cm)
    return ClassifierScore(m["accuracy"], m["balanced_accuracy"], m["qwk"], int(cm.sum()), cm)


def _site(cm_syn, cm_real, mia, n_members, **privacy):
    return SiteEvaluation("s", len(cm_syn), 1.0, _score(cm_syn), _score(cm_real),
                          {"mia_auc": mia, "mia_tpr_at_1pct_fpr": 0.0, "dcr_ratio": 1.0, "too_close_rate": 0.0,
                           "n_members": n_members, "n_synthetic": 10, **privacy})


def _phase(sites: dict) -> PhaseResult:
    res = PhaseResult()
    for i, (name, entry) in enumerate(sites.items()):
        res.add(name, i, entry)
    return res


def _summary(name: str, **kw) -> SynthesisSummary:
    base = dict(site_id=name, bundle_id="", export_status="stored", n_candidates=9, n_accepted=3, planted_total=2,
                planted_rejected=2, tau_id=0.5, delta=0.1, num_classes=2, synthesis_s=1.0)
    return SynthesisSummary(**{**base, **kw})


FAILED = SiteFailure(None, "boom", "boom")


def test_metrics_from_confusion():
    m = metrics_from_confusion(np.array([[8, 2], [1, 9]]))
    assert m["accuracy"] == pytest.approx(17 / 20)
    assert m["balanced_accuracy"] == pytest.approx((0.8 + 0.9) / 2)
    # quadratic kappa of the labels the matrix counts, by scikit-learn's own formula
    from sklearn.metrics import cohen_kappa_score

    y_true = np.repeat([0, 0, 1, 1], [8, 2, 1, 9])
    y_pred = np.repeat([0, 1, 0, 1], [8, 2, 1, 9])
    assert m["qwk"] == pytest.approx(cohen_kappa_score(y_true, y_pred, weights="quadratic"))
    assert metrics_from_confusion(np.array([[5, 0], [0, 5]]))["qwk"] == pytest.approx(1.0)


def test_build_report_pools_exactly(tmp_path):
    ev = _phase({"site-0": _site([[5, 0], [5, 0]], [[5, 0], [0, 5]], 0.6, 100),
                 "site-1": _site([[0, 5], [0, 5]], [[4, 1], [1, 4]], 0.5, 300),
                 "site-2": FAILED})
    syn = _phase({"site-0": _summary("site-0"), "site-2": FAILED})
    rep = build_report(federation={"rounds_done": 2}, synthesis=syn,
                       downstream={"pool": {"n_images": 6, "n_files": 6, "per_site": {"site-0": 6}}},
                       evaluation=ev, timing={"total_s": 1.0}, config={}, method="plan")
    assert rep["sites"] == ["site-0", "site-1", "site-2"]
    pooled = rep["utility"]["pooled"]["synthetic"]
    assert pooled["confusion"] == [[5, 5], [5, 5]] and pooled["accuracy"] == pytest.approx(0.5)
    assert rep["utility"]["real_accuracy"] == pytest.approx(18 / 20)
    assert rep["privacy"]["mia_auc"] == pytest.approx((0.6 * 100 + 0.5 * 300) / 400)
    assert rep["utility"]["sites"]["site-2"] == {"status": "failed", "reason": "boom"}
    assert rep["synthesis"]["site-0"]["n_accepted"] == 3 and rep["synthesis"]["site-2"]["reason"] == "boom"
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

    why = "<script>alert(1)</script> see [here](https://x.example)"
    ev = _phase({"site-0": _site([[5, 0], [1, 4]], [[5, 0], [0, 5]], 0.55, 100), "site-1": SiteFailure(1, why, why)})
    syn = _phase({"site-0": _summary("site-0")})
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


def test_pooled_privacy_interval_and_table(tmp_path):
    a = _site([[5, 0], [0, 5]], [[5, 0], [0, 5]], 0.52, 100, mia_auc_lo=0.42, mia_auc_hi=0.62, mia_auc_gap=0.02,
              mia_tpr_at_1pct_fpr=0.02, mia_tpr_lo=0.0, mia_tpr_hi=0.08, mia_tpr_chance=0.011)
    b = _site([[5, 0], [0, 5]], [[5, 0], [0, 5]], 0.48, 100, mia_auc_lo=0.38, mia_auc_hi=0.58, mia_auc_gap=0.02,
              mia_tpr_at_1pct_fpr=0.04, mia_tpr_lo=0.01, mia_tpr_hi=0.12, mia_tpr_chance=0.011)
    rep = build_report(federation={"rounds_done": 1}, synthesis=_phase({}),
                       downstream={"pool": {"n_images": 1, "n_files": 1, "per_site": {}}},
                       evaluation=_phase({"site-0": a, "site-1": b}), timing={}, config={}, method="plan")
    p = rep["privacy"]
    assert p["mia_auc"] == pytest.approx(0.5) and p["mia_auc_gap"] == pytest.approx(0.0)
    # two equal-weight sites, each with standard error 0.1 / 1.96: pooled standard error 0.1 / 1.96 / sqrt(2)
    assert p["mia_auc_hi"] - p["mia_auc"] == pytest.approx(0.1 / np.sqrt(2), rel=1e-6)
    assert p["sites"]["site-0"]["mia_auc_lo"] == 0.42
    # the TPR's bootstrap bounds stay per site (a mean of bounds bounds nothing); the TPR and chance pool
    assert p["sites"]["site-1"]["mia_tpr_hi"] == 0.12 and "mia_tpr_hi" not in p and "mia_tpr_lo" not in p
    assert p["mia_tpr_at_1pct_fpr"] == pytest.approx(0.03) and p["mia_tpr_chance"] == pytest.approx(0.011)
    _, md = write_report(rep, tmp_path, {})
    text = md.read_text()
    assert "0.520 [0.420, 0.620]" in text and "0.500 [0.429, 0.571]" in text
    assert "| 0.040 [0.010, 0.120] |" in text  # site-1's TPR vs test with its interval (no chance key given)
    assert "site alone" in text and "real reference" not in text


def test_the_val_based_mia_is_pooled_on_its_own_and_leads_the_privacy_table(tmp_path):
    # non-members = val (mia_val_*) and = test (mia_*) are two attacks: each pooled from its own site figures
    a = _site([[5, 0], [0, 5]], [[5, 0], [0, 5]], 0.40, 300, mia_auc_lo=0.35, mia_auc_hi=0.45,
              mia_val_auc=0.46, mia_val_auc_lo=0.40, mia_val_auc_hi=0.52, mia_val_tpr_at_1pct_fpr=0.01)
    b = _site([[5, 0], [0, 5]], [[5, 0], [0, 5]], 0.44, 100, mia_auc_lo=0.39, mia_auc_hi=0.49,
              mia_val_auc=0.54, mia_val_auc_lo=0.48, mia_val_auc_hi=0.60, mia_val_tpr_at_1pct_fpr=0.02)
    rep = build_report(federation={"rounds_done": 1}, synthesis=_phase({}),
                       downstream={"pool": {"n_images": 1, "n_files": 1, "per_site": {}}},
                       evaluation=_phase({"site-0": a, "site-1": b}), timing={}, config={}, method="plan")
    p = rep["privacy"]
    assert p["mia_auc"] == pytest.approx(0.41)  # weighted 3:1 by members
    assert p["mia_val_auc"] == pytest.approx(0.48) and p["mia_val_auc_gap"] == pytest.approx(0.02)
    assert p["mia_val_auc_lo"] < 0.48 < p["mia_val_auc_hi"] and p["mia_val_auc_hi"] != p["mia_auc_hi"]
    assert p["mia_val_tpr_at_1pct_fpr"] == pytest.approx(0.0125)
    _, md = write_report(rep, tmp_path, {})
    privacy = md.read_text().split("## Privacy", 1)[1]
    row = next(line for line in privacy.splitlines() if line.startswith("| site-1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0.540 [0.480, 0.600]" and cells[4] == "0.440 [0.390, 0.490]"


def _svg_text(path) -> str:
    import re

    return " ".join(re.findall(r">([^<>]+)</text>", path.read_text()))


def test_privacy_utility_plot_names_its_references(tmp_path):
    import matplotlib

    from server.post_training import POOL_RECIPE, SITE_RECIPE, _comparison_points

    compare = {m: {"mia_auc": auc, "accuracy": acc, "mia_auc_lo": auc - 0.03, "mia_auc_hi": min(auc + 0.03, 1.0)}
               for m, (auc, acc) in {"plan": (0.52, 0.80), "linear": (0.55, 0.78), "random": (0.5, 0.82),
                                     "real": (1.0, 0.70)}.items()}
    report = {"utility": {"accuracy": 0.88, "real_accuracy": 0.89},
              "privacy": {"mia_auc": 0.51, "mia_auc_lo": 0.47, "mia_auc_hi": 0.55}}
    pts = _comparison_points(_phase({"site-0": _summary("site-0", compare=compare), "site-1": FAILED}), report, "plan")
    assert set(pts) == {SITE_RECIPE, POOL_RECIPE}
    # one real reference per recipe panel, named for what it is; never the old ambiguous "real (site)"
    assert pts[SITE_RECIPE]["site alone (real train split)"][:2] == (1.0, 0.70)
    assert pts[POOL_RECIPE]["site alone (phi_down recipe)"][1] == 0.89
    assert pts[POOL_RECIPE]["plan (pooled phi_down)"] == (0.51, 0.88, 0.47, 0.55)
    for panel in pts.values():
        assert sum(k.startswith("site alone") for k in panel) == 1
        assert not any(k.startswith("real") for k in panel)
    old = matplotlib.rcParams["svg.fonttype"]
    matplotlib.rcParams["svg.fonttype"] = "none"  # keep text as text in the SVG
    try:
        svg = privacy_utility_plot(pts, tmp_path / "pu.svg")
    finally:
        matplotlib.rcParams["svg.fonttype"] = old
    text = _svg_text(svg)
    assert text.count("site alone") >= 2 and "plan (site TSTR)" in text and "plan (pooled phi_down)" in text
    assert "membership-inference ROC AUC" in text and "accuracy on the sites" in text
    assert SITE_RECIPE in text and POOL_RECIPE in text
    png = privacy_utility_plot(pts, tmp_path / "pu.png")
    assert png.stat().st_size > 1000


def test_synthesis_entry_keeps_the_report_json_keys():
    """report.json's synthesis section shows a site's typed summary under the keys it always had."""
    s = _summary("site-0", bundle_id="abc", compare={"plan": {"accuracy": 0.8, "mia_auc": 0.5}},
                 methods={"linear": {"n": 40.0, "accept_rate": 0.25}}, utility={"synthetic": 0.7},
                 timing={"inversion": 2.0})
    e = synthesis_entry(s, 7)
    assert e == {"status": "ok", "node_id": 7, "n_candidates": 9, "n_accepted": 3, "planted_total": 2,
                 "planted_rejected": 2, "tau_id": 0.5, "delta": 0.1, "num_classes": 2,
                 "compare.plan.accuracy": 0.8, "compare.plan.mia_auc": 0.5, "linear.n": 40.0,
                 "linear.accept_rate": 0.25, "utility.synthetic.accuracy": 0.7, "synthesis_s": 1.0,
                 "timing.inversion": 2.0, "site-id": "site-0", "bundle-id": "abc", "export-status": "stored"}


# fedreal: per-recipe utility against the same recipe's real references
def _refs(site: str, pool_cm, alone_cm, fed_cm, central_cm, recipe: str = "plain"):
    from plan_shared.protocol import ReferenceEvaluation

    return ReferenceEvaluation(site, 2, 1.0, {(recipe, "pool"): _score(pool_cm), (recipe, "site_alone"): _score(alone_cm),
                                             (recipe, "federated_real"): _score(fed_cm),
                                             (recipe, "central_real"): _score(central_cm)})


def test_recipes_section_pools_each_reference_and_gives_pool_over_reference_ratios(tmp_path):
    from server.report import recipes_section

    res = _phase({"site-0": _refs("site-0", [[4, 1], [1, 4]], [[5, 0], [5, 0]], [[4, 1], [0, 5]], [[5, 0], [0, 5]]),
                  "site-1": _refs("site-1", [[3, 2], [0, 5]], [[2, 3], [1, 4]], [[5, 0], [1, 4]], [[5, 0], [1, 4]]),
                  "site-2": FAILED})
    sec = recipes_section(res)
    plain = sec["by_recipe"]["plain"]
    assert plain["pool"]["accuracy"] == pytest.approx(16 / 20) and plain["pool"]["n"] == 20
    assert plain["central_real"]["accuracy"] == pytest.approx(19 / 20)
    kappa = metrics_from_confusion(np.array([[7, 3], [1, 9]]))["qwk"]  # the pool's summed matrix
    assert plain["pool"]["kappa"] == pytest.approx(kappa)
    r = plain["ratio_pool_over"]
    assert r["central_real"]["accuracy"] == pytest.approx(16 / 19)
    assert r["federated_real"]["kappa"] == pytest.approx(kappa / plain["federated_real"]["kappa"])
    assert set(r) == {"site_alone", "federated_real", "central_real"}
    assert plain["site_alone"]["sites"]["site-0"]["accuracy"] == pytest.approx(0.5)
    assert sec["failed"] == {"site-2": "boom"}
    # phi_down's site alone comes from the evaluation phase's real reference
    phi = _phase({"site-0": _refs("site-0", [[4, 1], [1, 4]], [[5, 0], [5, 0]], [[4, 1], [0, 5]], [[5, 0], [0, 5]],
                                  recipe="phi_down")})
    del phi.sites["site-0"].scores[("phi_down", "site_alone")]  # type: ignore[union-attr]
    ev = _phase({"site-0": _site([[5, 0], [0, 5]], [[3, 2], [0, 5]], 0.5, 10)})
    assert recipes_section(phi, ev)["by_recipe"]["phi_down"]["site_alone"]["accuracy"] == pytest.approx(0.8)

    rep = build_report(federation={"rounds_done": 1}, synthesis=_phase({"site-0": _summary("site-0")}),
                       downstream={"pool": {"n_images": 6, "n_files": 6, "per_site": {"site-0": 6}}},
                       evaluation=_phase({"site-0": _site([[5, 0], [0, 5]], [[5, 0], [0, 5]], 0.5, 10)}),
                       timing={}, config={}, method="plan", references=res)
    assert rep["utility"]["recipes"]["by_recipe"]["plain"]["pool"]["n"] == 20
    _, md = write_report(rep, tmp_path, {})
    text = md.read_text()
    assert "## Utility per downstream recipe" in text
    for label in ("pool (synthetic)", "site alone (own real train split)", "federated real (FedAvg",
                  "central real (all sites' real train splits pooled; simulation only)"):
        assert f"| plain | {label}" in text
    assert f"| {16 / 19:.3f} |" in text


def test_pool_seeds_get_mean_sd_and_range_and_the_markdown_states_them(tmp_path):
    from server.report import recipes_markdown, recipes_section

    e = _refs("site-0", [[4, 1], [1, 4]], [[5, 0], [1, 4]], [[4, 1], [0, 5]], [[5, 0], [0, 5]])
    e.scores[("plain", "pool_s1")] = _score([[5, 0], [3, 2]])  # type: ignore[index]
    e.scores[("plain", "pool_s2")] = _score([[3, 2], [0, 5]])  # type: ignore[index]
    sec = recipes_section(_phase({"site-0": e}))
    entry = sec["by_recipe"]["plain"]
    assert entry["pool_s1"]["accuracy"] == pytest.approx(0.7) and entry["pool_s2"]["n"] == 10
    ps = entry["pool_seeds"]
    assert ps["references"] == ["pool", "pool_s1", "pool_s2"] and ps["accuracy"]["values"] == pytest.approx([0.8, 0.7, 0.8])
    assert ps["accuracy"]["mean"] == pytest.approx(2.3 / 3) and ps["accuracy"]["sd"] == pytest.approx(np.std([0.8, 0.7, 0.8], ddof=1))
    assert (ps["accuracy"]["min"], ps["accuracy"]["max"]) == pytest.approx((0.7, 0.8))
    assert ps["accuracy"]["mean_over"]["site_alone"] == pytest.approx((2.3 / 3) / 0.9)
    assert set(ps["kappa"]["mean_over"]) == {"site_alone", "federated_real", "central_real"}
    assert "pool_s1" not in entry["ratio_pool_over"]
    text = "\n".join(recipes_markdown(sec))
    assert f"plain on the pool over 3 training seeds: accuracy {2.3 / 3:.3f} (sd {np.std([0.8, 0.7, 0.8], ddof=1):.3f}, " \
           "0.700-0.800)" in text
    assert f"site_alone x{(2.3 / 3) / 0.9:.3f} acc." in text
    one = recipes_section(_phase({"site-0": _refs("site-0", [[4, 1], [1, 4]], [[5, 0], [1, 4]], [[4, 1], [0, 5]],
                                                  [[5, 0], [0, 5]])}))
    assert "pool_seeds" not in one["by_recipe"]["plain"]  # one seed: nothing to summarise


def test_privacy_utility_plot_has_a_panel_per_recipe_with_labelled_references(tmp_path):
    import matplotlib

    from server.post_training import SITE_RECIPE, _comparison_points, recipe_panel_title, recipe_panels
    from server.report import recipes_section

    res = _phase({"site-0": _refs("site-0", [[4, 1], [1, 4]], [[5, 0], [5, 0]], [[4, 1], [0, 5]], [[5, 0], [0, 5]])})
    refs2 = _refs("site-0", [[3, 2], [2, 3]], [[4, 1], [1, 4]], [[4, 1], [1, 4]], [[5, 0], [0, 5]], recipe="phi_down")
    res.sites["site-0"].scores.update(refs2.scores)  # type: ignore[union-attr]
    report = {"utility": {"recipes": recipes_section(res)},
              "privacy": {"mia_auc": 0.51, "mia_auc_lo": 0.47, "mia_auc_hi": 0.55}}
    compare = {"plan": {"mia_auc": 0.52, "accuracy": 0.8}, "real": {"mia_auc": 1.0, "accuracy": 0.7}}
    pts = _comparison_points(_phase({"site-0": _summary("site-0", compare=compare)}), report, "plan")
    assert list(pts) == [SITE_RECIPE, recipe_panel_title("plain"), recipe_panel_title("phi_down")]
    assert pts[recipe_panel_title("plain")] == {"plan pool": (0.51, 0.8, 0.47, 0.55)}
    lines = recipe_panels(report["utility"]["recipes"], report["privacy"], "plan")[1]
    assert lines[recipe_panel_title("plain")] == {"site alone": 0.5, "federated real": 0.9, "central real": 1.0}
    old = matplotlib.rcParams["svg.fonttype"]
    matplotlib.rcParams["svg.fonttype"] = "none"
    try:
        svg = privacy_utility_plot(pts, tmp_path / "pu.svg", references=lines)
    finally:
        matplotlib.rcParams["svg.fonttype"] = old
    text = _svg_text(svg)
    for label in ("site alone: 0.500", "federated real: 0.900", "central real: 1.000", "plan pool"):
        assert label in text
    assert text.count("central real") == 2 and recipe_panel_title("phi_down") in text
    assert "membership-inference ROC AUC" in text  # the x label is drawn (inside the saved figure)

    res.sites["site-0"].scores[("plain", "pool_s1")] = _score([[5, 0], [3, 2]])  # type: ignore[union-attr]
    seeded = {"utility": {"recipes": recipes_section(res)}, "privacy": report["privacy"]}
    pts = recipe_panels(seeded["utility"]["recipes"], seeded["privacy"], "plan")[0]
    assert pts[recipe_panel_title("plain")] == {"plan pool (mean of 2 seeds)": (0.51, 0.75, 0.47, 0.55)}
    assert pts[recipe_panel_title("phi_down")] == {"plan pool": (0.51, 0.6, 0.47, 0.55)}  # one seed: as before


def test_report_shows_the_method_each_site_exported(tmp_path):
    """autoexport: with synthesis.method auto each site states the method its verdict chose; the report says which."""
    ev = _phase({"site-0": _site([[5, 0], [1, 4]], [[5, 0], [0, 5]], 0.55, 100),
                 "site-1": _site([[4, 1], [1, 4]], [[5, 0], [0, 5]], 0.5, 100)})
    why = "auto: the site's verdict supports random: plan is not shown safer"
    syn = _phase({"site-0": _summary("site-0", method="plan", method_reason="auto: supports plan"),
                  "site-1": _summary("site-1", method="random", method_reason=why)})
    rep = build_report(federation={"rounds_done": 2}, synthesis=syn,
                       downstream={"pool": {"n_images": 6, "n_files": 6, "per_site": {"site-0": 3, "site-1": 3}}},
                       evaluation=ev, timing={}, config={}, method="auto")
    assert (rep["synthesis"]["site-1"]["method"], rep["synthesis"]["site-1"]["method_reason"]) == ("random", why)
    _, md = write_report(rep, tmp_path, {})
    text = md.read_text()
    assert "exported method: `auto` (per site: site-0 plan, site-1 random)" in text
    assert "| site-1 | ok (stored) | random | 9 | 3 | 2/2 |" in text
    old = build_report(federation={"rounds_done": 2}, synthesis=_phase({"site-0": _summary("site-0")}),
                       downstream={}, evaluation=ev, timing={}, config={}, method="plan")
    assert "method" not in old["synthesis"]["site-0"]  # a site that did not state it


def test_the_pool_label_names_the_methods_the_sites_exported_not_auto():
    from server.post_training import pool_method_label

    syn = _phase({"a": _summary("a", method="random"), "b": _summary("b", method="plan"),
                  "c": _summary("c", method="random"), "d": FAILED})
    assert pool_method_label(syn, "auto") == "plan+random"
    assert pool_method_label(_phase({"a": _summary("a")}), "auto") == "auto"  # no site stated its method
    assert pool_method_label(_phase({"a": _summary("a", method="linear")}), "plan") == "linear"
