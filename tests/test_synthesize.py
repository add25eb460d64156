"""plan-client synthesize end to end on a tiny configuration: output dir, manifest, report."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from client.cli import app
from plan_shared.gan import file_sha256
from plan_shared.manifest import read_site_manifest

TINY = {
    "seed": 3,
    "device": "cpu",
    "generator": {"z_dim": 8, "w_dim": 8, "mapping_layers": 1, "base_channels": 16, "min_channels": 8},
    "discriminator": {"base_channels": 8, "max_channels": 16},
    "gan": {"steps": 2, "batch_size": 8},
    "identity": {"width": 4, "depth": 2, "feature_dim": 16, "epochs": 1, "batch_size": 16, "indep_width": 4},
    "classes": {"width": 4, "depth": 2, "feature_dim": 16, "epochs": 1, "utility_epochs": 1, "batch_size": 16},
    "inversion": {"steps": 2, "max_images": 20, "batch_size": 16,
                  "encoder": {"enabled": True, "steps": 5, "batch": 16, "width": 8, "refine_steps": 2,
                              "adapt_epochs": 1}},
    "anchors": {"k": 2, "pairs_m": 1},
    "navigation": {"T": 5, "steps": 2, "chunk": 8, "layers": "coarse_middle", "fine_from": 16},  # W+ at 16 px
    "filter": {"planted": 5, "tau_id": 0.99, "tau_indep": 0.99, "block_on_planted": False},
    "synthesis": {"max_paths": 4, "strip_pairs": 1},
    "audit": {"attacker": {"width": 4, "blocks": [1], "feature_dim": 8, "epochs": 1, "batch_size": 8}},
}


def _npz(path: Path) -> Path:
    rng = np.random.default_rng(0)

    def split(n):
        base = rng.random((n, 1, 4, 4))
        img = torch.nn.functional.interpolate(torch.tensor(base, dtype=torch.float32), size=28, mode="bilinear")
        return (img[:, 0].numpy() * 255).astype(np.uint8), (np.arange(n) % 2).reshape(-1, 1)

    arrays = {}
    for name, n in (("train", 40), ("val", 10), ("test", 10)):
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = split(n)
    np.savez(path, **arrays)
    return path


def test_synthesize_cli_end_to_end(tmp_path):
    npz = _npz(tmp_path / "toy.npz")
    cfg = dict(TINY, data={"source": "medmnist", "path": str(npz), "size": 16, "download": False},
               synthesis=dict(TINY.get("synthesis", {}), method="auto"))
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    # synthesis.method auto: the site exports the method its own verdict supports
    res = CliRunner().invoke(app, ["synthesize", "--config", str(tmp_path / "site.yaml"), "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert (out / "generator.pt").is_file()  # trained locally: no --generator given
    rep = json.loads((out / "report.json").read_text())
    for key in ("n_candidates", "n_accepted", "filter", "methods", "timing", "utility", "identity", "classes", "inversion", "anchors"):
        assert key in rep, key
    for key in ("tau_id", "delta", "planted_total", "planted_rejected", "sensitivity_ok", "export_blocked"):
        assert key in rep["filter"]
    assert rep["filter"]["planted_total"] == 5
    # symmetric exclusion zone: every real image protected, delta calibrated on half of val against the rest
    zone = rep["filter"]["zone"]
    assert zone["protected"] == {"train": 40, "val": 10, "test": 10}
    assert zone["calibration_split"] == "val" and zone["n_calibration"] == 5 and zone["n_reference"] == 55
    assert rep["filter"]["planted_heldout_total"] == 5 and "pixel_dcr" in rep["filter"]["reject_reasons"]
    assert rep["filter"]["delta_pixel"] == zone["delta_pixel"] > 0
    for m in ("plan", "linear", "random", "real"):
        c = rep["compare"][m]
        if c["mia_auc"] is not None:
            assert c["mia_auc_lo"] <= c["mia_auc"] <= c["mia_auc_hi"] and c["mia_auc_gap"] == abs(c["mia_auc"] - 0.5)
    for m in ("plan", "linear"):
        assert set(rep["methods"][m]) >= {"n", "mean_dcr", "p05_dcr", "mean_max_id_prob", "accept_rate"}
        assert rep["methods"][m]["n"] == rep["anchors"]["n_paths"] * 3
    m = rep["method"]
    assert rep["n_candidates"] == rep["methods"][m]["n"]
    # the path plan (plan_shared/pool_plan.py): per-class targets from the priors, capped by max_paths (4)
    anc = rep["anchors"]
    assert anc["plan_target_total"] == sum(anc["plan_target_per_class"]) >= 40 and sum(anc["plan_paths_per_class"]) == 4
    # PLAN's candidates (the exported method may be random, drawn to PLAN's class counts: at most as many)
    assert sum(anc["plan_candidates_per_class"]) == rep["methods"]["plan"]["n"] >= rep["methods"]["random"]["n"]
    assert rep["methods"]["random"]["quota_per_class"] == rep["methods"]["plan"]["candidates_per_class"]
    v = rep["verdict"]  # computed from compare: plan vs filtered random
    assert v["supported"] in ("plan", "random") and set(v["measures"]) == {
        "mia_val_auc_gap", "mia_val_tpr_at_1pct_fpr", "mean_indep_id_prob", "attacker_max_id_prob"}
    assert v["measures"]["attacker_max_id_prob"] is not None  # the attacker ran in the tiny pipeline
    assert rep["method_requested"] == "auto" and m == v["supported"]  # autoexport: the export follows the verdict
    assert rep["method_reason"] == f"auto: the site's verdict supports {m}: {v['verdict']}"
    for meth in ("plan", "random"):  # how much of the full-size quota each export set fills (verdict_min_coverage)
        c = rep["compare"][meth]
        assert c["target_per_class"] == anc["plan_target_per_class"] and sum(c["exported_per_class"]) <= c["n"]
        assert v["coverage"][meth] == c["coverage"] == round(min(
            e / t for e, t in zip(c["exported_per_class"], c["target_per_class"]) if t > 0), 4)
    stages = [k for k in rep["timing"] if k not in ("total", "local_gan")]
    assert stages == ["load", "phi_id", "indep_id", "phi_class", "calibrate", "inversion", "anchors", "navigation",
                      "render", "filter", "compare", "export", "utility", "figures"]  # compare before the export
    assert set(rep["utility"]) >= {"synthetic", "real"}
    assert set(rep["compare"]) == {"plan", "linear", "random", "real"}
    assert rep["compare"]["real"]["mia_auc"] == 1.0  # sharing the train images themselves: every member found
    assert rep["compare"]["real"]["mia_val_auc"] == 1.0 and "mia_val_auc_lo" in rep["compare"]["plan"]
    assert rep["compare"][m]["accuracy"] == rep["utility"]["synthetic"]["accuracy"]  # compare's entry, not retrained
    assert rep["compare"]["real"]["accuracy"] == rep["utility"]["real"]["accuracy"]
    # the audit's re-identification attacker, trained once on the 40 train images: per method and for real
    assert rep["attacker"]["n_images"] == 40 and 0 <= rep["attacker"]["member_top1"] <= 1
    for meth in ("plan", "linear", "random", "real"):
        c = rep["compare"][meth]
        assert c["attacker_n"] == c["n"] and (c["n"] == 0 or 0 < c["attacker_max_id_prob"] <= 1), (meth, c)
    assert rep["compare"]["real"]["attacker_dcr"] == pytest.approx(0.0, abs=1e-5)  # the train images themselves
    assert rep["navigation"]["objective"]["layers"] == "coarse_middle"
    man = read_site_manifest(out / "manifest.json")
    assert len(man.images) == rep["n_accepted"] > 0
    # exported class shares follow the real train priors; each method's precision/recall on phi_class features
    prev = rep["prevalence"]
    assert sum(prev["exported_per_class"]) == rep["n_accepted"] and abs(sum(prev["real_train_priors"]) - 1) < 1e-3
    assert all(e <= a for e, a in zip(prev["exported_per_class"], prev["accepted_per_class"]))
    assert prev["dropped"] == sum(prev["accepted_per_class"]) - rep["n_accepted"]
    for meth in ("plan", "linear", "random"):
        c = rep["compare"][meth]
        assert c["pr_k"] == 3 and "phi_class" in c["pr_features"]
        assert c["precision"] is None if c["pr_n"] <= 3 else 0.0 <= c["precision"] <= 1.0 and 0.0 <= c["recall"] <= 1.0
        assert "RandomFeatureNet" in c["pr_features_fixed"]  # and in a space navigation never saw
        assert (c["precision_fixed"] is None) == (c["precision"] is None)
        assert c["recall_fixed"] is None or 0.0 <= c["recall_fixed"] <= 1.0
    pngs = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png"))
    assert pngs == sorted(r.file for r in man.images)  # accepted images only, nothing else
    for r in man.images:
        assert r.passes() and r.method == m
        assert file_sha256(out / r.file) == r.sha256
        assert r.thresholds.delta == rep["filter"]["delta"]
    for fig in ("dcr_hist.png", "path_strips.png"):
        assert (out / fig).is_file()
    # What the site exports is what a pool with this configuration's policy accepts: canonical PNGs of the
    # federation's shape, the weights-only generator digest, a report.json the policy can read.
    from plan_shared.bundle import BundleLimits, build_bundle, check_bundle, generate_signing_key
    from plan_shared.config import config_from_dict
    from plan_shared.gan import generator_digest, load_generator
    from plan_shared.png_check import check_png
    from plan_shared.policy import check_policy, policy_from_config

    assert man.generator_sha256 == generator_digest(load_generator(out / "generator.pt"))
    policy = policy_from_config(config_from_dict(cfg), generator_sha256=man.generator_sha256, channels=1,
                                num_classes=2)
    assert set(policy.methods) == {"plan", "linear", "random"}  # auto: the pool takes whichever a site's verdict picks
    for r in man.images:
        check_png((out / r.file).read_bytes(), policy.image_size, policy.channels, policy.max_pixels)
    bm = build_bundle(out, generate_signing_key()).manifest
    check_bundle(bm, BundleLimits(), policy)
    check_policy(policy, bm, (out / "report.json").read_bytes())
