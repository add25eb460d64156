"""PLAN navigation (method.md B5): losses against hand-computed values, straight line
without classifier terms, chunked accumulation equals one big batch."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from plan_shared.models import Classifier, StyleGenerator
from plan_shared.navigation import (
    NavWeights,
    dist_loss,
    kl_uniform,
    linear_paths,
    optimise_paths,
    path_losses,
    sequential_reference,
)


def tiny():
    torch.manual_seed(0)
    G = StyleGenerator(z_dim=8, w_dim=8, size=8, channels=1, mapping_layers=1, base_channels=8, min_channels=4).eval()
    phi_id = Classifier(5, 1, 8, width=4, depth=2, feature_dim=8, head="cosine").eval()
    phi_c = Classifier(2, 1, 8, width=4, depth=2, feature_dim=8).eval()
    return G, phi_id, phi_c


def test_kl_uniform_hand_values():
    assert float(kl_uniform(torch.zeros(1, 4))) == pytest.approx(0.0, abs=1e-6)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    # KL(U||p) = sum 1/3 log((1/3)/p_j)
    want = sum(1 / 3 * math.log((1 / 3) / p) for p in (0.5, 0.25, 0.25))
    assert float(kl_uniform(logits)) == pytest.approx(want, rel=1e-5)


def test_dist_loss_is_sum_over_segments():
    full = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]]])
    assert float(dist_loss(full)[0]) == pytest.approx(1.0 + 4.0)
    lin = linear_paths(torch.zeros(1, 2), torch.tensor([[3.0, 0.0]]), 4)
    assert torch.allclose(lin[0, :, 0], torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert float(dist_loss(lin)[0]) == pytest.approx(3.0)  # 3 segments of length 1: minimal = |b-a|^2/(T-1)


def test_path_losses_are_means_over_interior_points():
    G, phi_id, phi_c = tiny()
    wa, wb = torch.randn(2, 8), torch.randn(2, 8)
    full = linear_paths(wa, wb, 5)
    y = torch.tensor([0, 1])
    L = path_losses(G, phi_id, phi_c, full, y)
    img = G.render(full[1, 1:-1])
    ce = nn.functional.cross_entropy(phi_c(img), torch.ones(3, dtype=torch.long))
    assert float(L["class"][1].detach()) == pytest.approx(float(ce.detach()), rel=1e-4)
    assert float(L["id"][1].detach()) == pytest.approx(float(kl_uniform(phi_id(img)).mean().detach()), rel=1e-4)


def test_without_classifier_terms_path_stays_straight():
    G, phi_id, phi_c = tiny()
    wa, wb = torch.randn(3, 8), torch.randn(3, 8)
    out = optimise_paths(G, phi_id, phi_c, wa, wb, torch.zeros(3), T=6, steps=20, lr=0.05,
                         weights=NavWeights(1.0, 0.0, 0.0), progress=False)
    assert torch.allclose(out, linear_paths(wa, wb, 6), atol=1e-5)
    # perturbed start relaxes back towards the line: L_dist alone is minimal there
    assert torch.equal(out[:, 0], wa) and torch.equal(out[:, -1], wb)


def test_chunked_batched_equals_sequential_reference():
    G, phi_id, phi_c = tiny()
    torch.manual_seed(3)
    wa, wb = torch.randn(3, 8), torch.randn(3, 8)
    y = torch.tensor([0, 1, 1])
    kw = dict(T=7, steps=5, lr=0.05, weights=NavWeights(1.0, 1.2, 12.0), w_scale=0.7)
    batched = optimise_paths(G, phi_id, phi_c, wa, wb, y, chunk=4, progress=False, **kw)  # chunks cross paths
    for p in range(3):
        ref = sequential_reference(G, phi_id, phi_c, wa[p], wb[p], int(y[p]), **kw)
        assert torch.allclose(batched[p], ref, atol=1e-4), (p, (batched[p] - ref).abs().max())
    assert not torch.allclose(batched, linear_paths(wa, wb, 7))  # the classifier terms moved it


def test_max_offset_bounds_points():
    G, phi_id, phi_c = tiny()
    wa, wb = torch.randn(2, 8), torch.randn(2, 8)
    out = optimise_paths(G, phi_id, phi_c, wa, wb, torch.zeros(2), T=5, steps=5, lr=0.5,
                         weights=NavWeights(0.0, 10.0, 10.0), max_offset=0.1, progress=False)
    off = (out - linear_paths(wa, wb, 5)).norm(dim=2)
    assert float(off.max()) <= 0.1 + 1e-5
