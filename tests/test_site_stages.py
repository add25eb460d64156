"""Each stage of the site pipeline (client/site_stages.py) on its own, on tiny in-memory data."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from client import site_stages as S
from client.pipeline import run_site_pipeline
from client.site_report import UtilityScore
from client.site_stages import GeneratorSnapshot, PrivacyInvariantError
from plan_shared.classifiers import predict_logits
from plan_shared.config import PlanConfig, config_from_dict
from plan_shared.data import ImageDataset, Split
from plan_shared.gan import GanTrainer, file_sha256, generator_digest
from plan_shared.manifest import Thresholds, read_site_manifest
from plan_shared.privacy import reject_reasons
from tests.test_site_report import FILTER, TOP
from tests.test_synthesize import TINY

SIZE = 16
DEV = torch.device("cpu")


def _split(rng: np.random.Generator, n: int, patients: bool = False) -> Split:
    base = torch.tensor(rng.random((n, 1, 4, 4)), dtype=torch.float32)
    img = (torch.nn.functional.interpolate(base, size=SIZE, mode="bilinear").numpy() * 255).astype(np.uint8)
    pid = np.repeat(np.arange(100, 100 + n // 2), 2)[:n] * 7 if patients else None  # two images per patient
    return Split(img, np.arange(n) % 2, pid)


def _dataset(patients: bool = False, n_val: int = 10) -> ImageDataset:
    rng = np.random.default_rng(0)
    return ImageDataset("toy", _split(rng, 40, patients), _split(rng, n_val), _split(rng, 10), ["a", "b"], 1, SIZE,
                        "memory")


def _cfg(**over: object) -> PlanConfig:
    d = copy.deepcopy(TINY)
    d["data"] = {"source": "medmnist", "size": SIZE, "download": False}
    d.update(over)
    return config_from_dict(d)


@dataclass
class Site:
    cfg: PlanConfig
    ds: ImageDataset
    snap: GeneratorSnapshot
    gen: S.SiteGenerator
    data: S.SiteData
    ids: S.IdentityModels
    cls: S.ClassModel
    cal: S.Calibration
    inv: S.Inversion
    ap: S.AnchorPairs
    paths: S.Paths
    cand: dict
    flt: S.FilterOutcome


@pytest.fixture(scope="module")
def site() -> Site:
    """The stages up to the filter, run once for the module (each is tested on its output below)."""
    torch.manual_seed(0)
    cfg, ds = _cfg(), _dataset()
    trainer = GanTrainer(cfg, 1, SIZE)
    snap = GeneratorSnapshot({k: v for k, v in trainer.weights("g").items() if k.startswith("g_ema.")}, 1, SIZE)
    gen = S.load_generator(cfg, snap, ds, DEV)
    data = S.load_site_data(ds)
    ids = S.IdentityModels(S.train_identity_model(cfg, ds, data, DEV, False),
                           S.train_identity_model(cfg, ds, data, DEV, False, independent=True))
    cls = S.train_class_model(cfg, ds, data, DEV, False)
    cal = S.calibrate_filter(cfg, data, ids.indep)
    inv = S.invert_train_images(cfg, ds, data, gen.G, ids.phi_id, gen.sha256, DEV, False)
    ap = S.anchor_pairs(cfg, ds, inv, DEV)
    paths = S.navigate_paths(cfg, gen.G, ids.phi_id, cls.phi_class, ap, inv.sigma_w, DEV, False)
    cand = S.render_candidates(cfg, gen.G, paths, cls.phi_class)
    flt = S.filter_candidates(cfg, "plan", cand, ids, cal, data)
    return Site(cfg, ds, snap, gen, data, ids, cls, cal, inv, ap, paths, cand, flt)


# ------------------------------------------------------------------------------------------ load
def test_snapshot_and_checkpoint_give_the_same_generator_and_digest_at_every_site(tmp_path, site):
    ckpt = GanTrainer(site.cfg, 1, SIZE)
    ckpt.set_weights(dict(site.snap.state))
    path = ckpt.save_checkpoint(tmp_path / "g.pt")
    from_file = S.load_generator(site.cfg, path, site.ds, DEV)
    assert from_file.checkpoint == str(path) and site.gen.checkpoint is None
    assert from_file.sha256 == site.gen.sha256 == site.snap.digest() == generator_digest(ckpt.G_ema)
    w = from_file.G.sample_w(3, torch.Generator().manual_seed(1))
    assert torch.equal(from_file.G.render(w, noise_mode="const"), site.gen.G.render(w, noise_mode="const"))
    # another site (its own id and seed) records the same digest for the same weights
    other = S.load_generator(_cfg(site_id="hospital-b", seed=99), site.snap, site.ds, DEV)
    assert other.sha256 == site.gen.sha256
    # unprefixed keys are the same snapshot
    bare = GeneratorSnapshot(site.snap.weights(), 1, SIZE)
    assert bare.digest() == site.snap.digest()


def test_snapshot_of_another_shape_is_refused_naming_both_shapes(site):
    with pytest.raises(ValueError, match=r"3x16x16 images but the data are 1x16x16"):
        S.load_generator(site.cfg, GeneratorSnapshot(site.snap.state, 3, SIZE), site.ds, DEV)
    wider = _cfg(generator=dict(TINY["generator"], w_dim=16))
    with pytest.raises(ValueError, match="does not fit this site's generator config section"):
        S.load_generator(wider, site.snap, site.ds, DEV)


def test_identities_are_patients_where_the_split_knows_them():
    ds = _dataset(patients=True)
    data = S.load_site_data(ds)
    assert data.identity_unit == "patient" and data.n_id == 20
    assert data.id_labels.tolist() == np.repeat(np.arange(20), 2).tolist()  # dense 0..n-1, not the opaque ids
    assert data.section().n_identities == 20
    cfg = _cfg()
    phi_id = S.train_identity_model(cfg, ds, data, DEV, False)
    # one output per train patient, then one per held-out reference image (these splits know no patients)
    assert predict_logits(phi_id, data.x_tr[:2]).shape == (2, 20 + 5 + 10)
    plain = S.load_site_data(_dataset())
    assert plain.identity_unit == "image" and plain.n_id == 40


def test_identity_models_know_every_protected_identity_but_the_calibration_images(site):
    idset = S.identity_training_set(site.cfg, site.data)
    assert idset.mode == "protected" and idset.by_split == {"train": 40, "val": 5, "test": 10}
    assert predict_logits(site.ids.indep, site.data.x_te[:3]).shape == (3, 55)
    zone = site.cal.zone  # the images left out of every class are exactly the zone's calibration rows
    assert torch.equal(idset.unseen, site.data.x_va[torch.as_tensor(zone.index[zone.calib])])
    assert torch.equal(idset.labels[:40], site.data.id_labels)  # a train image keeps its class
    sec = S.identity_section(site.cfg, site.data, site.ids)
    assert (sec.identity_classes, sec.n_identity_classes, sec.identity_classes_by_split) == ("protected", 55, idset.by_split)
    old = S.identity_training_set(_cfg(filter={**TINY["filter"], "identity_classes": "train"}), site.data)
    assert old.n_classes == 40 and torch.equal(old.x, site.data.x_tr)


def test_method_names_are_checked():
    assert S.check_method("linear") == "linear"
    with pytest.raises(ValueError, match="'pln'"):
        S.check_method("pln")
    assert S.check_requested_method("auto") == "auto" and S.check_requested_method("random") == "random"
    with pytest.raises(ValueError, match="'auto'.*'gan'"):
        S.check_requested_method("gan")
    with pytest.raises(ValueError, match="'auto'"):  # auto is a request, not a method of an image
        S.check_method("auto")


# ------------------------------------------------------------------------------------------ calibration, inversion, anchors
def test_calibration_protects_every_split_and_falls_back_to_test_without_val(site):
    z = site.cal.zone.summary()
    assert z["protected"] == {"train": 40, "val": 10, "test": 10} and site.cal.split == "val"
    assert site.cal.thresholds.delta == site.cal.zone.delta and site.cal.thresholds.tau_id == 0.99
    ds = _dataset(n_val=0)
    data = S.load_site_data(ds)
    cal = S.calibrate_filter(site.cfg, data, site.ids.indep)
    assert cal.split == "test" and "val" not in cal.protected_x


def test_inversion_subsamples_and_anchors_pair_within_class(site):
    assert site.inv.section.n_inverted == 20 and site.inv.section.subsampled
    assert np.bincount(site.inv.labels).tolist() == [10, 10]  # stratified
    assert site.inv.w.shape == (20, site.gen.G.w_dim)
    assert 0 < len(site.ap.pairs) <= site.cfg.synthesis.max_paths
    lab = site.ap.anchors.labels
    assert all(lab[a] == lab[b] for a, b in site.ap.pairs)
    assert site.ap.section.n_paths == len(site.ap.pairs)


def test_spread_anchors_keep_the_groups_and_move_away_from_w_avg(site):  # recall: anchors.spread (#11.6)
    assert site.inv.centre is not None and site.inv.centre.radius > 0
    def with_spread(spread: str) -> S.AnchorPairs:
        cfg = site.cfg.model_copy(update={"anchors": site.cfg.anchors.model_copy(update={"spread": spread})})
        return S.anchor_pairs(cfg, site.ds, site.inv, DEV)

    ap, none = with_spread("generator"), with_spread("none")
    assert site.cfg.anchors.spread == "generator"  # the default since stop 22
    assert all(np.array_equal(a, b) for a, b in zip(ap.anchors.groups, none.anchors.groups, strict=True))
    c = site.inv.centre.w_avg
    plain = (none.anchors.anchors.cpu() - c).norm(dim=1)
    spread = (ap.anchors.anchors.cpu() - c).norm(dim=1)
    assert bool((spread >= plain - 1e-5).all()) and float(spread.mean()) > float(plain.mean())


# ------------------------------------------------------------------------------------------ candidates
def test_candidates_per_method(site):
    T, P = site.cfg.navigation.T, len(site.ap.pairs)
    assert site.paths.plan.shape == site.paths.linear.shape == (P, T, site.gen.G.w_dim)
    assert torch.allclose(site.paths.plan[:, 0], site.paths.linear[:, 0])  # same anchors
    for m in ("plan", "linear"):
        c = site.cand[m]
        assert len(c) == P * (T - 2) and c.method == m
        assert c.position.min() == 1 and c.position.max() == T - 2
        assert c.image_id(T - 2) == f"{m}_p0001_t001"
    r = site.cand["random"]
    assert r.path_id is None and r.image_id(7) == "random_00007"
    # synthesis.random_per_class (default): drawn to PLAN's class counts, each label phi_class's own
    quota = np.bincount(site.cand["plan"].labels, minlength=2)
    assert r.draw["per_class"] and r.draw["quota_per_class"] == quota.tolist()
    got = np.bincount(r.labels, minlength=2)
    assert (got <= quota).all() and r.draw["drawn"] >= len(r)
    assert np.array_equal(r.labels, predict_logits(site.cls.phi_class, r.images).argmax(1).numpy())
    stats = site.flt.methods["random"]
    assert stats.drawn == r.draw["drawn"] and stats.quota_per_class == quota.tolist()
    assert stats.candidates_per_class == got.tolist() and site.flt.methods["plan"].candidates_per_class == quota.tolist()


def test_random_baseline_unconditional_when_asked(site):
    """synthesis.random_per_class false: as many unconditional draws as the path methods' candidates."""
    cfg = site.cfg.model_copy(update={"synthesis": site.cfg.synthesis.model_copy(update={"random_per_class": False})})
    r = S.render_candidates(cfg, site.gen.G, site.paths, site.cls.phi_class)["random"]
    assert len(r) == len(site.cand["plan"]) and r.draw == {"per_class": False, "drawn": len(r)}


def test_each_site_draws_its_own_random_samples(site):
    """The shared G and seed gave every site the same random samples (a second site exporting random added copies)."""
    again = S.render_candidates(site.cfg, site.gen.G, site.paths, site.cls.phi_class)["random"]
    assert torch.equal(again.images, site.cand["random"].images)  # reproducible at one site
    other_cfg = site.cfg.model_copy(update={"site_id": site.cfg.site_id + "-other"})
    other = S.render_candidates(other_cfg, site.gen.G, site.paths, site.cls.phi_class)["random"]
    a, b = other.images.flatten(1), site.cand["random"].images.flatten(1)  # the quotas may keep different counts
    assert len(a) and len(b) and not torch.isclose(a[:, None], b[None]).all(-1).any()


# ------------------------------------------------------------------------------------------ filter
def test_filter_rejects_planted_duplicates_and_copies_of_real_images(site):
    s = site.flt.section
    assert s.planted_total == 5 and s.planted_rejected == 5 and site.flt.sensitivity_ok and not site.flt.blocked
    # the real images themselves as "candidates": every one is inside the exclusion zone
    copies = S.Candidates("plan", site.data.x_tr[:6], site.ds.train.labels[:6], None, None)
    flt = S.filter_candidates(site.cfg, "plan", {"plan": copies}, site.ids, site.cal, site.data)
    assert not flt.accept["plan"].any() and len(flt.exported("plan")) == 0
    assert flt.methods["plan"].n == 6 and flt.methods["plan"].n_accepted == 0


def test_a_failed_planted_test_blocks_the_export(site):
    loose = _cfg(filter=dict(TINY["filter"], tau_id=1.0, tau_indep=1.0, pixel_zone=False,
                             block_on_planted=True))
    cal = S.calibrate_filter(loose, site.data, site.ids.indep)
    cal.thresholds = Thresholds(1.0, 1.0, -1.0)  # nothing can be rejected: the planted test must fail
    flt = S.filter_candidates(loose, "plan", site.cand, site.ids, cal, site.data)
    assert not flt.sensitivity_ok and flt.blocked and flt.section.export_blocked
    assert len(flt.passed("plan")) == len(site.cand["plan"]) and len(flt.exported("plan")) == 0


# ------------------------------------------------------------------------------------------ writer
def test_writer_refuses_a_record_that_fails_the_thresholds_and_writes_nothing(tmp_path, site):
    scores, th = site.flt.scores["plan"], site.cal.thresholds
    rejected, passed = np.flatnonzero(~site.flt.accept["plan"]), site.flt.passed("plan")
    if len(rejected):  # a record the tiny filter rejected, slipped in after the passing ones
        idx = np.concatenate([passed, rejected[:1]])
    else:  # the tiny filter passed everything (it depends on the tiny G): thresholds its last passing record fails
        assert len(passed), "the tiny pipeline should have candidates"
        idx, th = passed, replace(th, tau_id=float(scores.max_id_prob[int(passed[-1])]))
    with pytest.raises(PrivacyInvariantError, match=r"plan_p\d{4}_t\d{3} .*fails the filter"):
        S.write_site_dir(tmp_path, site.cfg, site.cand["plan"], scores, idx, th, site.cal.delta_pixel,
                         site.ds.class_names, site.gen.sha256, 3)
    assert not list(tmp_path.rglob("*"))  # no PNG, no manifest
    # the pixel zone is an invariant too: a record inside it is refused even when the embedding thresholds pass
    i = int(passed[0]) if len(passed) else int(rejected[0])
    tight = float(scores.pixel_dcr[i]) + 1.0
    with pytest.raises(PrivacyInvariantError, match="pixel_dcr"):
        S.check_exportable(scores, i, Thresholds(1.0, 1.0, -1.0), tight, "x")


def test_writer_writes_the_passing_images_and_their_manifest(tmp_path, site):
    idx = site.flt.exported("plan")
    man = S.write_site_dir(tmp_path, site.cfg, site.cand["plan"], site.flt.scores["plan"], idx,
                           site.cal.thresholds, site.cal.delta_pixel, site.ds.class_names, site.gen.sha256, 3)
    back = read_site_manifest(tmp_path / "manifest.json")
    assert len(back.images) == len(idx) == len(man.images) and back.generator_round == 3
    assert back.generator_sha256 == site.gen.sha256
    for r in back.images:
        assert r.passes() and r.method == "plan" and r.file.startswith(f"images/{r.class_name}/")
        assert file_sha256(tmp_path / r.file) == r.sha256
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == sorted(
        r.file for r in back.images)


# ------------------------------------------------------------------------------------------ utility, compare, figures
def test_utility_with_too_few_images_is_not_trained(site):
    u = S.train_utility(site.cfg, site.ds, site.data.x_tr[:1], site.data.y_tr[:1], site.data.x_te, site.data.y_te,
                        0, "u", DEV, False)
    assert not u.trained and u.to_json() == {"n_train": 1, "accuracy": None, "balanced_accuracy": None, "qwk": None}
    sec = S.utility_of_site(site.cfg, site.ds, site.data, site.cand["plan"], site.flt.passed("plan"), True, DEV, False)
    assert sec.synthetic_set.endswith("(export blocked: not exported)")
    assert sum(sec.synthetic.per_class_train.values()) == len(site.flt.passed("plan"))
    assert sec.real.n_train == 40 and sec.real.accuracy is not None


def test_compare_and_figures(tmp_path, site):
    cmp = S.compare_methods(site.cfg, site.ds, site.data, site.cand, site.flt, DEV, False)
    assert set(cmp.points) == set(cmp.utility) == {"plan", "linear", "random", "real"}
    assert cmp.points["real"].mia["mia_auc"] == 1.0 and cmp.points["plan"].accuracy == cmp.utility["plan"].accuracy
    assert cmp.points["linear"].n == int(site.flt.accept["linear"].sum())
    # each method's utility is trained on what it would export: its filter-passing images after prevalence matching
    for m in ("plan", "linear", "random"):
        export_idx, _ = S.match_class_shares(site.cfg, site.ds, site.cand[m], site.flt.passed(m))
        assert cmp.utility[m].n_train == len(export_idx)
    figs = S.write_figures(site.cfg, tmp_path, site.gen.G, site.paths, site.ids, site.cal, site.cand, site.flt,
                           "plan", site.ds.class_names)
    assert {"path_strips", "dcr_hist", "samples"} <= set(figs)
    assert all((tmp_path / name).is_file() for name in figs.values())


def test_utility_of_the_exported_method_is_compares_entry_not_trained_again(site):
    """autoexport: the utility section reuses the compare stage's scores of the exported method and of real."""
    known = {"random": UtilityScore(0.123, 0.2, 0.3, 7), "real": UtilityScore(0.456, 0.5, 0.6, 40)}
    passed = site.flt.passed("random")
    sec = S.utility_of_site(site.cfg, site.ds, site.data, site.cand["random"], passed, False, DEV, False, known=known)
    assert (sec.synthetic.accuracy, sec.synthetic.n_train, sec.real.accuracy) == (0.123, 7, 0.456)
    assert sum(sec.synthetic.per_class_train.values()) == len(passed) and known["random"].per_class_train is None
    assert sec.classifier.endswith("epoch chosen on the site's real val split")
    # without compare's entries the section trains its own (epoch on val unless classes.utility_select_on_val is off)
    plain = _cfg(classes=dict(TINY["classes"], utility_select_on_val=False))
    own = S.utility_of_site(plain, site.ds, site.data, site.cand["plan"], site.flt.passed("plan"), False, DEV, False,
                            known={"random": known["random"]})
    assert own.real.n_train == 40 and own.real.accuracy != 0.456 and "val split" not in own.classifier
    assert S.utility_val(plain, site.data) is None and S.utility_val(site.cfg, site.data) is not None
    balanced = _cfg(classes=dict(TINY["classes"], utility_balanced=True))
    assert "class-balanced sampling" in S.utility_recipe(balanced, site.data)
    assert "plain sampling (no class balancing)" in sec.classifier  # the default (classes.utility_balanced)


def test_filter_with_auto_tests_every_method_in_the_planted_batch(site):
    """autoexport: with synthesis.method auto the export method is chosen after the filter, so the planted test
    scores every method's candidates; the reject reasons are those of the method finally exported."""
    assert site.flt.planted_checked == ["plan"] and site.flt.section.reject_reasons  # forced method: its own
    flt = S.filter_candidates(site.cfg, None, site.cand, site.ids, site.cal, site.data)
    assert flt.planted_checked == ["plan", "linear", "random"] and flt.section.reject_reasons == {}
    assert all(np.array_equal(flt.accept[m], site.flt.accept[m]) for m in site.cand)
    for m in ("plan", "random"):
        sec = S.filter_for_export(flt, m, site.cal).section
        assert sec.reject_reasons == reject_reasons(flt.scores[m], site.cal.thresholds, site.cal.delta_pixel)
    with pytest.raises(PrivacyInvariantError, match="did not score the random candidates"):
        S.filter_for_export(site.flt, "random", site.cal)


# ------------------------------------------------------------------------------------------ orchestrator
def test_unknown_method_is_refused_before_any_work(tmp_path, site):
    with pytest.raises(ValueError, match="method must be one of"):
        run_site_pipeline(site.cfg, site.ds, site.snap, tmp_path / "o", method="gan", progress=False)
    assert not (tmp_path / "o").exists()


def test_synthesis_at_a_site_uses_the_sent_weights_in_memory(tmp_path):
    """client/post_training.py passes the coordinator's G_ema weights as a snapshot: no checkpoint, the model's digest;
    the orchestrator's report.json has today's keys."""
    from client.post_training import synthesize_at_site
    from client.site import Site
    from tests.test_synthesize import _npz

    cfg = _cfg(data={"source": "medmnist", "path": str(_npz(tmp_path / "d.npz")), "size": SIZE, "download": False},
               site={"state_dir": str(tmp_path / "state")}, synthesis=dict(TINY["synthesis"], compare=False, method="auto"))
    trainer = GanTrainer(cfg, 1, SIZE)
    site = Site.from_node_config({"partition-id": 0, "num-partitions": 2}, cfg)
    res = synthesize_at_site(site, cfg, trainer.weights("g"), 1, SIZE, generator_round=4)
    out = site.state_dir / "synthesis"
    rep = json.loads((out / "out" / "report.json").read_text())
    assert res.n_accepted == rep["n_accepted"] and res.n_candidates == rep["n_candidates"]
    top = [k for k in TOP if k != "compare"]
    assert [k for k in rep if k != "prevalence"] == top[:3] + ["method_requested", "method_reason"] + top[3:]
    assert list(rep["filter"]) == FILTER
    # autoexport: auto without compare has no verdict: the documented fallback (synthesis.method_fallback), said why
    assert (rep["method_requested"], rep["method"], res.method) == ("auto", "plan", "plan")
    assert "compare is off" in rep["method_reason"] and res.method_reason == rep["method_reason"]
    assert rep["filter"]["reject_reasons"] and rep["timing"]["export"] >= 0
    gen = rep["generator"]
    assert gen == {"checkpoint": None, "sha256": generator_digest(trainer.G_ema), "round": 4}
    assert not (out / "generator.pt").exists()
    assert read_site_manifest(out / "out" / "manifest.json").generator_sha256 == gen["sha256"]
