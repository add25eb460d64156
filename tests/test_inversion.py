"""Batched W inversion reduces the reconstruction error of images the generator can make."""

import torch

from plan_shared.config import InversionConfig
from plan_shared.inversion import invert
from plan_shared.models import Classifier, StyleGenerator


def test_inversion_reduces_error():
    torch.manual_seed(0)
    G = StyleGenerator(z_dim=8, w_dim=8, size=8, channels=1, mapping_layers=1, base_channels=8, min_channels=4).eval()
    G.requires_grad_(False)
    G.mapping.w_avg.copy_(G.sample_w(256).mean(0))
    target_w = G.sample_w(6)
    x = G.render(target_w).detach()
    f = Classifier(3, 1, 8, width=4, depth=2, feature_dim=8).eval()
    res = invert(G, x, InversionConfig(steps=60, lr=0.05, batch_size=4), sigma_w=1.0, feature_net=f, progress=False)
    w, err = res.w, res.mse
    base = (G.render(G.w_avg[None].repeat(6, 1)) - x).pow(2).flatten(1).mean(1)
    assert w.shape == (6, 8) and err.shape == (6,)
    assert float(err.mean()) < 0.5 * float(base.mean())
    assert res.steps == 60 and res.generator_evals == 6 * 60 and res.feature_loss is not None
