"""Robust PLAN terms (plan_shared/nav_objectives.py): EOT scoring damps a pixel pattern, the L_class margin
stops the CE gradient above its target, the low-pass bound charges texture and not coarse change, and
optimise_paths optimises the objective it is given."""

import math

import numpy as np
import pytest
import torch

from plan_shared.config import NavigationConfig
from plan_shared.models import Classifier, Discriminator, StyleGenerator
from plan_shared.nav_objectives import Objective, eot_views, gaussian_blur, margin_ce, point_terms
from plan_shared.navigation import linear_paths, optimise_paths, path_losses


def _checker(size: int, amp: float) -> torch.Tensor:
    i = torch.arange(size)
    return amp * ((i.view(-1, 1) + i.view(1, -1)) % 2 * 2 - 1).float().view(1, 1, size, size)


def _smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).tanh()


def test_gaussian_blur_keeps_constants_and_removes_checkerboard():
    x = torch.full((2, 1, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(x, torch.tensor([0.8, 1.5])), x, atol=1e-6)
    c = _checker(16, 1.0)
    out = gaussian_blur(c, torch.tensor([1.0]))
    assert float(out[..., 3:-3, 3:-3].abs().max()) < 0.02  # Nyquist gain exp(-2 pi^2 sigma^2 / 4) = 0.007
    assert torch.equal(gaussian_blur(c, torch.tensor([0.0])), c)  # sigma 0: unchanged


def test_eot_scored_id_loss_moves_less_under_a_pixel_pattern_than_the_plain_one():
    torch.manual_seed(0)
    phi_id = Classifier(20, 1, 16, width=8, depth=2, feature_dim=16, head="cosine").eval()
    x = _smooth_images(8, 16)
    xp = x + _checker(16, 0.3)
    nav = NavigationConfig(eot_samples=8, lambda_smooth=0.0)
    eot = Objective.from_config(nav)
    plain = Objective.published(1.0, 0.0)
    y = torch.zeros(8, dtype=torch.long)

    def kl(img: torch.Tensor, obj: Objective) -> torch.Tensor:  # same seed: identical views for both images
        return point_terms(img, None, phi_id, phi_id, y, obj, torch.Generator().manual_seed(3))["id"]

    with torch.no_grad():
        d_plain = (kl(xp, plain) - kl(x, plain)).abs().mean()
        d_eot = (kl(xp, eot) - kl(x, eot)).abs().mean()
    assert float(d_plain) > 0
    assert float(d_eot) < 0.5 * float(d_plain), (float(d_eot), float(d_plain))


def test_eot_views_are_fresh_each_call_and_the_image_itself_when_off():
    x = _smooth_images(3, 16)
    obj = Objective.from_config(NavigationConfig(eot_samples=2))
    g = torch.Generator().manual_seed(0)
    a, b = eot_views(x, obj, g), eot_views(x, obj, g)
    assert a.shape == (6, 1, 16, 16) and not torch.allclose(a, b)
    assert eot_views(x, Objective.published(1.0, 1.0), g) is x


def test_margin_stops_the_ce_gradient_above_target():
    logits = torch.tensor([[4.0, 0.0], [0.2, 0.0], [0.0, 3.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1])
    p_y = torch.softmax(logits, 1)[torch.arange(3), y]
    assert bool(p_y[0] > 0.9) and bool(p_y[1] < 0.9) and bool(p_y[2] > 0.9)
    margin_ce(logits, y, 0.9).sum().backward()
    g = logits.grad
    assert torch.count_nonzero(g[0]) == 0 and torch.count_nonzero(g[2]) == 0
    assert float(g[1].abs().sum()) > 0
    plain = margin_ce(logits.detach(), y, None)
    assert torch.allclose(plain, torch.nn.functional.cross_entropy(logits.detach(), y, reduction="none"))


def test_low_pass_bound_charges_texture_not_coarse_change():
    base = _smooth_images(4, 16)
    obj = Objective(0.0, 0.0, None, 0, (0.0, 0.0), 0.0, 0, 1.0, 1.0)
    dummy = torch.nn.Identity()
    y = torch.zeros(4, dtype=torch.long)
    coarse = point_terms(base + 0.3 * _smooth_images(4, 16, seed=1), base, dummy, dummy, y, obj,
                         torch.Generator())["smooth"]
    texture = point_terms(base + _checker(16, 0.3), base, dummy, dummy, y, obj, torch.Generator())["smooth"]
    assert float(texture.min()) > 10 * float(coarse.max())
    with pytest.raises(ValueError, match="img_lin"):
        point_terms(base, None, dummy, dummy, y, obj, torch.Generator())


def _tiny():
    torch.manual_seed(0)
    G = StyleGenerator(z_dim=8, w_dim=8, size=8, channels=1, mapping_layers=1, base_channels=8, min_channels=4).eval()
    phi_id = Classifier(5, 1, 8, width=4, depth=2, feature_dim=8, head="cosine").eval()
    phi_c = Classifier(2, 1, 8, width=4, depth=2, feature_dim=8).eval()
    return G, phi_id, phi_c


def test_optimise_paths_lowers_the_objective_it_is_given():
    G, phi_id, phi_c = _tiny()
    wa, wb = torch.randn(3, 8), torch.randn(3, 8)
    y = torch.tensor([0, 1, 0])
    nc = NavigationConfig(eot_samples=2, lambda_smooth=5.0, class_target=0.9, T=6, steps=15, lr=0.05)
    obj = Objective.from_config(nc)
    res = optimise_paths(G, phi_id, phi_c, wa, wb, y, nc, progress=False, seed=1)
    full, hist = res.paths, res.history
    assert set(hist[0]) >= {"dist", "id", "class", "smooth"}
    before = path_losses(G, phi_id, phi_c, linear_paths(wa, wb, 6), y, obj, seed=5)
    after = path_losses(G, phi_id, phi_c, full, y, obj, seed=5)
    def tot(L: dict[str, torch.Tensor]) -> float:
        return float(sum(obj.weight(k) * v.sum() for k, v in L.items() if k != "dist") + L["dist"].sum())

    assert tot(after) < tot(before)
    assert float(before["smooth"].abs().max()) == 0.0  # the straight line is its own reference
    assert math.isfinite(tot(after)) and not np.isnan(full.numpy()).any()


def test_config_refuses_an_inverted_blur_range_and_builds_the_objective():
    with pytest.raises(ValueError, match="eot_blur"):
        NavigationConfig(eot_blur=(1.0, 0.5))
    obj = Objective.from_config(NavigationConfig())
    assert obj.class_target == NavigationConfig().class_target and obj.weight("id") == NavigationConfig().lambda_id


class _Brightness(torch.nn.Module):
    """A stand-in critic with a known gradient: the logit is the mean pixel value (brighter = 'more real')."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1)


def test_realism_hinge_is_zero_on_the_linear_path_and_pushes_d_up_only_below_it():
    obj = Objective(0.0, 0.0, None, 0, (0.0, 0.0), 0.0, 0, 0.0, 1.0, lambda_real=1.0)
    dummy, disc = torch.nn.Identity(), _Brightness()
    y = torch.zeros(2, dtype=torch.long)
    lin = _smooth_images(2, 8)
    assert float(point_terms(lin, lin, dummy, dummy, y, obj, torch.Generator(), disc)["real"].abs().max()) == 0.0
    img = torch.stack([lin[0] - 0.2, lin[1] + 0.2]).requires_grad_(True)  # point 0 darker than its line point, 1 brighter
    real = point_terms(img, lin, dummy, dummy, y, obj, torch.Generator(), disc)["real"]
    assert float(real[0].detach()) == pytest.approx(0.2, rel=1e-4) and float(real[1].detach()) == 0.0
    real.sum().backward()
    g = img.grad
    assert float(g[0].max()) < 0 and torch.count_nonzero(g[1]) == 0  # descent brightens point 0, leaves point 1
    with pytest.raises(ValueError, match="disc"):
        point_terms(img, lin, dummy, dummy, y, obj, torch.Generator())


def test_optimise_paths_with_the_realism_hinge_needs_and_uses_the_discriminator():
    G, phi_id, phi_c = _tiny()
    wa, wb = torch.randn(2, 8), torch.randn(2, 8)
    y = torch.tensor([0, 1])
    nc = NavigationConfig(T=5, steps=3, lr=0.2, lambda_id=5.0, lambda_real=1.0, devices=["cpu"])
    with pytest.raises(ValueError, match="lambda_real"):
        optimise_paths(G, phi_id, phi_c, wa, wb, y, nc, progress=False)
    torch.manual_seed(1)
    D = Discriminator(size=8, channels=1, base_channels=4, max_channels=8).eval()
    res = optimise_paths(G, phi_id, phi_c, wa, wb, y, nc, progress=False, disc=D)
    assert res.history[0]["real"] == 0.0  # measured at the start: the straight line is its own reference
    assert res.history[-1]["real"] > 0.0  # L_id moved the points and D noticed
    L = path_losses(G, phi_id, phi_c, res.paths, y, Objective.from_config(nc), disc=D)
    assert set(L) >= {"real"} and bool((L["real"] >= 0).all())
