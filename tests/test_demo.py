"""The whole federation end to end on a tiny configuration (issue 6).

Real components: Flower's simulation engine with 3 virtual hospitals, a real pool
service process with mutual TLS, real files. One site is given broken credentials
(its signing key is missing), so its export fails: it must be reported and the other
sites' bundles must still land.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from plan_shared.manifest import read_site_manifest
from server.demo import make_credentials
from server.post_training import short_reason

TINY = Path(__file__).parent / "configs" / "tiny.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``plan-server demo`` as a user runs it (its own process); (out, report, terminal output)."""
    import subprocess
    import sys

    if not os.environ.get("PLAN_DATA_DIR"):
        pytest.skip("PLAN_DATA_DIR is not set")
    out = tmp_path_factory.mktemp("demo")
    make_credentials(out / "certs", out / "keys", ["site-0", "site-1", "site-2"])
    (out / "keys" / "sites" / "site-1" / "signing.key").unlink()
    sets = ["filter.tau_id=1.0", "filter.tau_indep=1.0", "filter.delta_quantile=0.001", "filter.block_on_planted=false"]
    r = subprocess.run([sys.executable, "-m", "server.cli", "demo", "--out", str(out), "--sites", "3", "--dataset",
                        "breastmnist", "--config", str(TINY), *[x for v in sets for x in ("--set", v)]],
                       capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parent.parent)
    terminal = r.stdout + r.stderr
    assert r.returncode == 0, terminal[-4000:]
    return out, json.loads((out / "report.json").read_text()), terminal


@pytest.fixture(scope="module")
def demo(demo_run):
    return demo_run[:2]


def test_terminal_shows_only_our_lines_and_the_sites_progress(demo_run):
    import re

    _, _, terminal = demo_run
    lines = terminal.splitlines()
    for bad in ("DEBUG", "DeprecationWarning", "DEPRECATED", "FutureWarning", "ClientAppActor", "alembic"):
        assert not [x for x in lines if bad in x], bad
    ours = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR) plan\.[a-z_.]+: |^demo finished in |^report: ")
    assert [x for x in lines if not ours.match(x)] == []
    for site in ("site-0", "site-1", "site-2"):  # each site's stages reached the demo's terminal
        assert any(f"plan.progress: [{site}] inversion started (stage 6/" in x for x in lines), site
        assert any(f"plan.progress: [{site}] evaluation started" in x for x in lines), site


def test_phases_ran_in_order_and_wrote_their_outputs(demo):
    out, report = demo
    assert (out / "federation.json").is_file() and (out / "checkpoints" / "latest.json").is_file()
    files = [out / n for n in ("checkpoints/latest.json", "synthesis.json", "downstream.json", "evaluation.json", "report.json")]
    assert all(f.is_file() for f in files)
    mtimes = [f.stat().st_mtime for f in files]
    assert mtimes == sorted(mtimes)
    assert list(report["timing"])[:4] == ["federation_s", "synthesis_s", "downstream_s", "evaluation_s"]
    assert (out / "report.md").is_file()


def test_report_schema(demo):
    _, report = demo
    for key in ("sites", "rounds", "pool", "utility", "privacy", "timing"):
        assert key in report
    assert report["sites"] == ["site-0", "site-1", "site-2"] and report["rounds"] == 1
    assert set(report["pool"]) >= {"n_images", "per_site"}
    for key in ("accuracy", "balanced_accuracy", "qwk", "real_accuracy", "real_balanced_accuracy", "real_qwk"):
        assert key in report["utility"]
    for key in ("mia_auc", "mia_tpr_at_1pct_fpr", "dcr_ratio", "too_close_rate"):
        assert key in report["privacy"]
    pooled = report["utility"]["pooled"]
    assert pooled["synthetic"]["n"] == pooled["real"]["n"] > 0


def test_every_recipe_is_compared_with_its_real_references(demo):
    # fedreal: pool vs site alone vs federated real (a Flower phase) vs central real (simulation), per recipe
    out, report = demo
    sec = report["utility"]["recipes"]
    assert set(sec["by_recipe"]) == {"phi_down", "plain"}
    for entry in sec["by_recipe"].values():
        assert {"pool", "site_alone", "federated_real", "central_real"} <= set(entry)
        assert entry["pool"]["n"] == entry["federated_real"]["n"] == entry["central_real"]["n"] > 0
        assert set(entry["ratio_pool_over"]) == {"site_alone", "federated_real", "central_real"}
    refs = json.loads((out / "references.json").read_text())
    fed = refs["info"]["federated_real"]
    assert all(fed[r]["complete"] and fed[r]["history"][0]["sites"] == ["site-0", "site-1", "site-2"]
               for r in ("phi_down", "plain"))
    assert "references_s" in report["timing"] and (out / "privacy_utility.png").is_file()
    assert "Utility per downstream recipe" in (out / "report.md").read_text()


def test_failed_site_is_reported_and_others_land(demo):
    out, report = demo
    syn = report["synthesis"]
    assert syn["site-1"]["status"] == "failed"
    assert "signing" in syn["site-1"]["reason"]
    ok = [s for s in ("site-0", "site-2") if syn[s]["status"] == "ok"]
    assert ok == ["site-0", "site-2"]
    landed = {s for s in ok if syn[s]["n_accepted"] > 0}
    assert landed and set(report["pool"]["per_site"]) == landed
    assert report["utility"]["sites"]["site-1"]["synthetic"]["n"] > 0  # it is still evaluated


def test_pool_equals_union_of_exports(demo):
    out, report = demo
    exported = set()
    for s, rec in report["synthesis"].items():
        man = out / "sites" / s / "synthesis" / "out" / "manifest.json"
        if rec["status"] == "ok" and man.is_file():
            exported |= {r.sha256 for r in read_site_manifest(man).images}
    pulled = json.loads((out / "pool" / "manifest.json").read_text())
    assert {e["sha256"] for e in pulled["images"]} == exported
    on_disk = {p.stem for p in (out / "pool").rglob("*.png")}
    assert on_disk == exported


def test_the_coordinator_trained_the_inversion_encoder_and_every_site_used_it(demo):
    # issue 14 item 2: E trained once by the coordinator on G's samples, shipped with G, no site trains one
    out, report = demo
    enc = json.loads((out / "synthesis.json").read_text())["encoder"]
    assert enc["trained_by"] == "coordinator" and not enc["loaded"] and Path(enc["path"]) == out / "encoder.pt"
    assert (out / "encoder.pt").is_file() and enc["generator_evals"] == enc["steps"] * enc["batch"] * 2
    assert report["timing"]["synthesis_encoder_s"] == enc["wall_s"] <= report["timing"]["synthesis_s"]
    assert report["inversion_encoder"] == enc
    for s in ("site-0", "site-2"):  # site-1's export fails after its pipeline ran
        inv = json.loads((out / "sites" / s / "synthesis" / "out" / "report.json").read_text())["inversion"]
        assert inv["encoder"]["source"] == "coordinator" and inv["encoder"]["train_generator_evals"] == 0, s
        assert inv["encoder"]["e_train_generator_evals"] == enc["generator_evals"]
        ad = inv["encoder"]["adapt_epochs"]  # the site adapted a copy of E to its own images (1 epoch in TINY)
        assert ad == 1 and inv["encoder"]["adapt_generator_evals"] == ad * inv["n_inverted"]
        assert inv["generator_evals_per_image"] == inv["encoder"]["refine_steps"] + inv["encoder"]["adapt_epochs"]


def test_short_reason_strips_tracebacks():
    raw = "Traceback...\n  File x\n\x1b[36mray\x1b[39m\nException ClientAppException occurred. Message: boom: bad key'>"
    assert short_reason(raw) == "boom: bad key"
