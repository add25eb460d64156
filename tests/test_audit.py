"""Site-side evaluation and privacy audit on constructed inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.evaluate import score_classifier
from plan_shared.audit import attacker_audit, dcr_audit, distance_mia, loss_mia, privacy_audit
from plan_shared.config import AttackerConfig
from plan_shared.data import ImageDataset, Split


class _Fixed(torch.nn.Module):
    """A 'classifier' that returns preset logits (one row per call order)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.num_classes = num_classes

    def forward(self, x):  # predicts class = round(mean pixel > 0)
        m = x.reshape(x.shape[0], -1).mean(1)
        return torch.stack([-m, m], 1) * 10


def test_score_classifier_confusion_and_metrics():
    x = torch.cat([torch.full((3, 1, 4, 4), -0.5), torch.full((2, 1, 4, 4), 0.5)])
    y = np.array([0, 0, 1, 1, 1])
    rep = score_classifier(_Fixed(2), x, y, 2)
    assert rep["confusion"] == [[2, 0], [1, 2]]
    assert rep["accuracy"] == pytest.approx(4 / 5)
    assert rep["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert rep["n"] == 5


def test_distance_mia_copies_vs_fresh():
    g = torch.Generator().manual_seed(0)
    members, nonmembers = torch.rand(40, 1, 8, 8, generator=g), torch.rand(40, 1, 8, 8, generator=g)
    leaked = distance_mia(members, nonmembers, members.clone())  # the pool holds the members themselves
    assert leaked["mia_auc"] == pytest.approx(1.0) and leaked["mia_tpr_at_1pct_fpr"] == pytest.approx(1.0)
    fresh = distance_mia(members, nonmembers, torch.rand(200, 1, 8, 8, generator=g))
    assert 0.3 < fresh["mia_auc"] < 0.7


def test_a_shifted_nonmember_split_moves_the_auc_without_any_leak_and_val_does_not():
    """A pool that knows nothing of membership (fresh draws, denser around typical images, as a GAN's):
    non-members from the members' distribution leave the AUC at chance; a test split of another source
    (here only typical images) pushes it below 0.5 by itself (why mia_val_* is reported)."""
    g = torch.Generator().manual_seed(1)
    members, val = torch.rand(300, 1, 1, 4, generator=g), torch.rand(300, 1, 1, 4, generator=g)
    shifted_test = 0.3 + 0.4 * torch.rand(300, 1, 1, 4, generator=g)
    pool = torch.cat([torch.rand(150, 1, 1, 4, generator=g), 0.3 + 0.4 * torch.rand(150, 1, 1, 4, generator=g)])
    same = distance_mia(members, val, pool, n_boot=200, prefix="mia_val")
    assert same["mia_val_auc_lo"] < 0.5 < same["mia_val_auc_hi"] and same["mia_val_tpr_at_1pct_fpr"] <= 0.05
    # the TPR with its bootstrap interval and chance's band at 300 non-members (j = 4: mean 4 / 301)
    assert same["mia_val_tpr_lo"] <= same["mia_val_tpr_at_1pct_fpr"] <= same["mia_val_tpr_hi"]
    assert same["mia_val_tpr_chance"] == 4 / 301 < same["mia_val_tpr_chance_hi"] < 0.03
    shifted = distance_mia(members, shifted_test, pool, n_boot=200)
    assert shifted["mia_auc_hi"] < 0.4


def test_dcr_audit_ratio_and_too_close():
    g = torch.Generator().manual_seed(1)
    train, held = torch.rand(50, 1, 8, 8, generator=g), torch.rand(50, 1, 8, 8, generator=g)
    copies = dcr_audit(train, held, train[:10] + 0.001)
    assert copies["too_close_rate"] == 1.0 and copies["dcr_ratio"] < 0.05
    fresh = dcr_audit(train, held, torch.rand(50, 1, 8, 8, generator=g))
    assert 0.7 < fresh["dcr_ratio"] < 1.3 and fresh["too_close_rate"] < 0.2


def test_loss_mia_detects_a_memorising_model():
    x_m = torch.full((10, 1, 4, 4), 0.5)
    x_n = torch.full((10, 1, 4, 4), -0.5)
    # members predicted right (low loss), non-members wrong (high loss) -> AUC 1
    res = loss_mia(_Fixed(2), (x_m, np.ones(10, int)), (x_n, np.ones(10, int)))
    assert res["loss_mia_auc"] == pytest.approx(1.0)


def test_privacy_audit_keys_and_empty_pool():
    rng = np.random.default_rng(0)

    def split(n):
        return Split(rng.integers(0, 255, (n, 1, 8, 8), dtype=np.uint8), (np.arange(n) % 2).astype(np.int64))

    ds = ImageDataset("t", split(20), split(6), split(10), ["a", "b"], 1, 8, "memory")
    out = privacy_audit(ds, ds.train.images[:5], _Fixed(2))
    for k in ("mia_auc", "mia_tpr_at_1pct_fpr", "dcr_ratio", "too_close_rate", "loss_mia_auc", "n_synthetic",
              "mia_val_auc", "mia_val_auc_lo", "mia_val_tpr_at_1pct_fpr"):
        assert k in out
    assert out["n_nonmembers_val"] == 6 and out["mia_val_auc"] > 0.5  # the pool holds members: both attacks see it
    assert out["too_close_rate"] == 1.0  # exported copies of training images are all too close
    empty = privacy_audit(ds, np.zeros((0, 1, 8, 8), np.uint8), None)
    assert np.isnan(empty["mia_auc"]) and "loss_mia_auc" not in empty


def test_attacker_audit_scores_each_set_against_the_train_images():
    """Copies of train images sit at attacker DCR 0, other images do not; the attacker's own figures say what it
    was trained on; a subsample is renumbered but DCR still counts every train image; bad input is named.
    (How well the attacker learns identities: tests/test_attacker.py.)"""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(16, 1, 4, 4, generator=g) * 2 - 1
    train = F.interpolate(base, size=12, mode="bilinear")
    heldout = F.interpolate(torch.rand(8, 1, 4, 4, generator=g) * 2 - 1, size=12, mode="bilinear")
    noise = torch.rand(8, 1, 12, 12, generator=g) * 2 - 1
    cfg = AttackerConfig(width=4, blocks=[1], feature_dim=8, epochs=2, batch_size=4)
    res = attacker_audit(cfg, train, torch.arange(16), heldout, {"copies": train[:8], "noise": noise,
                                                                 "none": train[:0]}, "cpu")
    a = res.attacker
    assert a["n_images"] == 16 and a["n_ids"] == 16 and a["epochs"] == 2 and 0 <= a["member_top1"] <= 1
    assert 1 / 16 <= a["heldout_max_id_prob"] <= 1 and a["seconds"] > 0
    c, n = res.sets["copies"], res.sets["noise"]
    assert c["attacker_dcr"] == pytest.approx(0.0, abs=1e-4) and n["attacker_dcr"] > 1e-3
    assert c["attacker_dcr_p05"] <= c["attacker_dcr"] and n["attacker_n"] == 8 == c["attacker_n"]
    assert 1 / 16 <= c["attacker_max_id_prob"] <= 1 and 1 / 16 <= n["attacker_max_id_prob"] <= 1
    assert np.isnan(res.sets["none"]["attacker_max_id_prob"]) and res.sets["none"]["attacker_n"] == 0
    sub = attacker_audit(cfg.model_copy(update={"max_images": 6, "epochs": 1}), train, torch.arange(16) * 3, heldout,
                         {"copies": train}, "cpu")
    assert sub.attacker["n_images"] == 6 and sub.attacker["n_ids"] == 6  # identities renumbered 0..5
    assert sub.sets["copies"]["attacker_dcr"] == pytest.approx(0.0, abs=1e-4)  # DCR still to every train image
    with pytest.raises(ValueError, match="16 train images but 3 identity labels"):
        attacker_audit(cfg, train, torch.arange(3), heldout, {}, "cpu")
