"""Privacy filter (method.md B6): planted near-duplicates rejected, nothing above a threshold accepted."""

import numpy as np
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
