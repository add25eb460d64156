"""Privacy filter (method.md B6): planted near-duplicates rejected, nothing above a threshold accepted."""

import numpy as np
import pytest
import torch
from torch import nn

from plan_shared.manifest import Thresholds
from plan_shared.privacy import Scores, accept_mask, calibrate_delta, plant_duplicates, score_images


class NearestIdentity(nn.Module):
    """A perfect identity model: softmax over -squared distance to each training image."""

    def __init__(self, train: torch.Tensor, temp: float = 0.5):
        super().__init__()
        self.register_buffer("ref", train.flatten(1))
        self.temp = temp
        self.lin = nn.Linear(1, 1)  # gives the module a parameter (device lookup)

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return -torch.cdist(x.flatten(1), self.ref).pow(2) / self.temp


def test_accept_mask_never_above_thresholds():
    rng = np.random.default_rng(0)
    s = Scores(rng.random(500), rng.random(500), rng.random(500), np.zeros(500, int))
    t = Thresholds(0.4, 0.6, 0.3)
    ok = accept_mask(s, t)
    assert ok.any() and (~ok).any()
    assert (s.max_id_prob[ok] < 0.4).all() and (s.indep_id_prob[ok] < 0.6).all() and (s.dcr[ok] > 0.3).all()
    # boundary values are rejected (strict inequalities)
    edge = Scores(np.array([0.4]), np.array([0.0]), np.array([1.0]), np.zeros(1, int))
    assert not accept_mask(edge, t)[0]


def test_planted_duplicates_rejected_fresh_images_pass():
    torch.manual_seed(0)

    def smooth(n):  # low-frequency images: a 1-pixel shift is a light change, as for real scans
        return nn.functional.interpolate(torch.rand(n, 1, 4, 4) * 2 - 1, size=32, mode="bilinear", align_corners=False)

    train, held, fresh = smooth(30), smooth(20), smooth(20)
    ident = NearestIdentity(train, temp=100.0)
    from plan_shared.classifiers import embed

    train_emb = embed(ident, train)

    delta = calibrate_delta(embed(ident, held), embed(ident, train), 0.05)
    planted, src = plant_duplicates(train, 10, seed=1)
    assert len(planted) == 10 and len(set(src.tolist())) == 10
    t = Thresholds(0.5, 0.5, delta)
    sp = score_images(planted, ident, ident, train_emb)
    assert not accept_mask(sp, t).any()
    assert (sp.nearest == src).mean() >= 0.9
    sf = score_images(fresh, ident, ident, train_emb)
    assert accept_mask(sf, t).mean() > 0.5


# ---------------------------------------------------------------- symmetric exclusion zone


def _smooth(n, seed, base=4):
    g = torch.Generator().manual_seed(seed)
    return nn.functional.interpolate(torch.rand(n, 1, base, base, generator=g) * 2 - 1, size=16, mode="bilinear",
                                     align_corners=False)


def test_zone_calibrates_delta_on_rows_outside_its_reference():
    from plan_shared.privacy import build_zone, closest_distance

    emb = {"train": torch.randn(40, 6), "val": torch.randn(20, 6), "test": torch.randn(30, 6)}
    z = build_zone(emb, 0.1, "val", 0.5, seed=3)
    assert np.intersect1d(z.calib, z.reference).size == 0  # disjoint
    assert np.array_equal(np.union1d(z.calib, z.reference), np.arange(90))  # every protected image is in one of them
    assert len(z.calib) == 10 and set(z.split[z.calib]) == {"val"}
    assert z.summary()["protected"] == {"train": 40, "val": 20, "test": 30}
    # delta recomputed independently: the quantile of calibration -> closest reference distances
    d = torch.cdist(z.embeddings[z.calib], z.embeddings[z.reference]).min(1).values.numpy()
    assert z.delta == pytest.approx(float(np.quantile(d, 0.1)), rel=1e-5)
    assert z.delta > 0  # a calibration row never meets itself
    # calibration rows are protected too: a candidate on one of them is at distance 0
    dist, near = closest_distance(z.embeddings[z.calib[:1]] + 1e-4, z.embeddings)
    assert dist[0] < 1e-3 and near[0] == z.calib[0]
    assert np.array_equal(build_zone(emb, 0.1, "val", 0.5, seed=3).calib, z.calib)  # seeded
    assert not np.array_equal(build_zone(emb, 0.1, "val", 0.5, seed=4).calib, z.calib)


def test_zone_refuses_a_missing_calibration_split():
    from plan_shared.privacy import build_zone

    with pytest.raises(ValueError, match="calibration_split='val'"):
        build_zone({"train": torch.randn(5, 3), "val": torch.zeros(0, 3)}, 0.05, "val", 0.5, seed=0)
    with pytest.raises(ValueError, match="needs images besides"):
        build_zone({"val": torch.randn(1, 3)}, 0.05, "val", 0.5, seed=0)


def test_candidate_near_a_heldout_image_is_rejected():
    from plan_shared.classifiers import embed
    from plan_shared.privacy import build_zone

    train, val, test = _smooth(30, 0), _smooth(20, 1), _smooth(20, 2)
    ident = NearestIdentity(train, temp=100.0)
    zone = build_zone({"train": embed(ident, train), "val": embed(ident, val), "test": embed(ident, test)},
                      0.05, "val", 0.5, seed=0)
    t = Thresholds(1.0, 1.0, zone.delta)
    near_test, src = plant_duplicates(test, 8, seed=5)  # near-copies of non-members (held-out patients)
    s = score_images(near_test, ident, ident, zone.embeddings)
    assert not accept_mask(s, t).any()
    assert zone.nearest_splits(s.nearest)["test"] == 8
    assert np.array_equal(zone.index[s.nearest], src)
    # the old, train-only zone lets the same images through: that was the membership leak
    train_only = score_images(near_test, ident, ident, embed(ident, train))
    assert accept_mask(train_only, t).mean() > 0.5
    fresh = score_images(_smooth(20, 9), ident, ident, zone.embeddings)
    assert accept_mask(fresh, t).mean() > 0.5


def test_symmetric_zone_leaves_distance_mia_at_chance():
    """Members and non-members from one distribution, a generator that spreads over it: a zone
    around members only makes members farther from the pool (AUC < 0.5); a zone around both
    keeps them at equal distance (AUC ~ 0.5, interval containing 0.5)."""
    from plan_shared.audit import distance_mia
    from plan_shared.privacy import build_zone

    g = torch.Generator().manual_seed(0)
    members, val, nonmembers = (torch.rand(n, 1, 1, 2, generator=g) for n in (400, 100, 400))
    cands = torch.rand(4000, 1, 1, 2, generator=g)
    flat = lambda x: x.flatten(1)  # noqa: E731
    zone = build_zone({"train": flat(members), "val": flat(val), "test": flat(nonmembers)}, 0.5, "val", 0.5, seed=0)

    def accepted(ref):
        d = torch.cdist(flat(cands), ref).min(1).values
        return cands[d > zone.delta]

    old = distance_mia(members, nonmembers, accepted(flat(members)), n_boot=300)
    new = distance_mia(members, nonmembers, accepted(zone.embeddings), n_boot=300)
    assert old["mia_auc"] < 0.4 and old["mia_auc_hi"] < 0.5
    assert new["mia_auc_gap"] < 0.05 and new["mia_auc_lo"] < 0.5 < new["mia_auc_hi"]
    assert new["mia_tpr_at_1pct_fpr"] <= 0.05


def test_pixel_zone_catches_what_the_embedding_misses():
    from plan_shared.privacy import build_zone, reject_reasons

    x = {"train": _smooth(30, 0), "val": _smooth(20, 1), "test": _smooth(20, 2)}

    class Blind(NearestIdentity):  # an embedding that knows nothing about held-out images
        def features(self, im):
            return torch.zeros(len(im), 8)

    ident = Blind(x["train"], temp=100.0)
    emb = {k: torch.randn(len(v), 8) for k, v in x.items()}
    zone = build_zone(emb, 0.05, "val", 0.5, seed=0, split_pixels=x)
    flat = torch.cat(list(x.values())).flatten(1)
    dp = torch.cdist(flat[zone.calib], flat[zone.reference]).min(1).values.numpy()
    assert zone.delta_pixel == pytest.approx(float(np.quantile(dp, 0.05)), rel=1e-5)  # same calibration rows
    copies = x["test"][:6] + 0.001 * torch.randn(6, 1, 16, 16)
    t = Thresholds(1.0, 1.0, -1.0)  # embedding check open: only the pixel zone decides
    s = score_images(copies, ident, ident, zone.embeddings, protected_pixels=zone.pixels)
    assert accept_mask(s, t).all() and not accept_mask(s, t, zone.delta_pixel).any()
    assert reject_reasons(s, t, zone.delta_pixel)["pixel_dcr"] == 6
    with pytest.raises(ValueError, match="pixel_dcr"):
        accept_mask(score_images(copies, ident, ident, zone.embeddings), t, zone.delta_pixel)


# ---------------------------------------------------------------- symmetric identity criteria


def test_zone_rows_are_the_rows_build_zone_draws():
    from plan_shared.privacy import build_zone, zone_rows

    emb = {"train": torch.randn(40, 6), "val": torch.randn(20, 6), "test": torch.zeros(0, 6), "x": torch.randn(7, 6)}
    rows = zone_rows({k: len(v) for k, v in emb.items()}, "val", 0.5, seed=3)
    z = build_zone(emb, 0.1, "val", 0.5, seed=3)
    assert np.array_equal(rows.calib, z.calib) and np.array_equal(rows.reference, z.reference)
    assert np.array_equal(rows.split, z.split) and "test" not in set(rows.split)  # empty split skipped
    with pytest.raises(ValueError, match="calibration_split='test'"):
        zone_rows({"train": 4, "test": 0}, "test", 0.5, seed=0)


def test_identity_set_has_one_class_per_protected_identity_and_none_for_calibration_rows():
    from plan_shared.privacy import identity_set, zone_rows

    x = {"train": torch.randn(8, 1, 2, 2), "val": torch.randn(6, 1, 2, 2), "test": torch.randn(5, 1, 2, 2)}
    train_labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # patients
    rows = zone_rows({k: len(v) for k, v in x.items()}, "val", 0.5, seed=1)
    test_patients = np.array([70, 70, 71, 72, 72])
    s = identity_set(x, train_labels, rows, "protected", {"val": None, "test": test_patients})
    cal_val = rows.index[rows.calib]
    ref_val = np.setdiff1d(np.arange(6), cal_val)
    assert s.by_split == {"train": 4, "val": 3, "test": 3} and s.n_classes == 10 and s.n_train_classes == 4
    assert s.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 7, 8, 9, 9]  # train first, as it was
    assert torch.equal(s.x[8:11], x["val"][ref_val]) and torch.equal(s.x[11:], x["test"])
    assert torch.equal(s.unseen, x["val"][cal_val])  # calibration images: in no class
    old = identity_set(x, train_labels, rows, "train")
    assert old.n_classes == 4 and torch.equal(old.x, x["train"]) and torch.equal(old.unseen, x["val"][cal_val])
    with pytest.raises(ValueError, match="identity_classes"):
        identity_set(x, train_labels, rows, "members")


def test_copies_of_heldout_images_are_rejected_exactly_like_copies_of_train_images():
    """Identity models over the protected identities: a synthetic set lying close to held-out
    images meets the same verdicts (and reasons) as one lying close to train images; over train
    identities only, the held-out copies pass the identity checks (the asymmetry of #11.2)."""
    from plan_shared.classifiers import embed
    from plan_shared.privacy import build_zone, identity_set, reject_reasons, zone_rows

    x = {"train": _smooth(24, 0, base=8), "val": _smooth(12, 1, base=8), "test": _smooth(24, 2, base=8)}
    rows = zone_rows({k: len(v) for k, v in x.items()}, "val", 0.5, seed=0)
    near_train, _ = plant_duplicates(x["train"], 12, seed=5)
    near_test, _ = plant_duplicates(x["test"], 12, seed=5)
    verdicts = {}
    for mode in ("protected", "train"):
        ids = identity_set(x, torch.arange(24), rows, mode)
        ident = NearestIdentity(ids.x, temp=5.0)
        zone = build_zone({k: embed(ident, v) for k, v in x.items()}, 0.05, "val", 0.5, seed=0)
        th = Thresholds(0.5, 0.5, -1.0)  # the distance zone open: the identity checks alone decide
        verdicts[mode] = {name: (accept_mask(s, th), reject_reasons(s, th)) for name, s in (
            ("train", score_images(near_train, ident, ident, zone.embeddings)),
            ("test", score_images(near_test, ident, ident, zone.embeddings)))}
        fresh = score_images(_smooth(12, 9, base=8), ident, ident, zone.embeddings)
        assert accept_mask(fresh, th).mean() >= 0.5  # the checks do not reject everything
    sym = verdicts["protected"]
    assert not sym["train"][0].any() and np.array_equal(sym["train"][0], sym["test"][0])
    assert sym["train"][1] == sym["test"][1] == {"id_prob": 12, "indep_id_prob": 12, "dcr": 0}
    old = verdicts["train"]
    assert not old["train"][0].any() and old["test"][0].mean() > 0.5
