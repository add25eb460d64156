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


def _setup():
    torch.manual_seed(0)
    G = StyleGenerator(z_dim=8, w_dim=8, size=8, channels=1, mapping_layers=1, base_channels=8, min_channels=4).eval()
    G.requires_grad_(False)
    G.mapping.w_avg.copy_(G.sample_w(256).mean(0))
    x = G.render(G.sample_w(6, torch.Generator().manual_seed(1))).detach()
    w_init = G.sample_w(6, torch.Generator().manual_seed(2))
    return G, x, w_init


def test_refinement_uses_refine_lr_and_schedule_only_from_w_init():
    from plan_shared.config import EncoderConfig

    G, x, w_init = _setup()

    def run(steps: int, lr: float = 0.05, **enc):
        ic = InversionConfig(lr=lr, batch_size=4, feature_weight=0.0, encoder=EncoderConfig(**enc))
        return invert(G, x, ic, sigma_w=1.0, w_init=w_init, steps=steps, progress=False)

    # refine_lr replaces inversion.lr from w_init; null falls back to it
    assert torch.equal(run(5, lr=0.3, refine_lr=0.05).w, run(5, lr=0.05, refine_lr=None).w)
    assert not torch.equal(run(5, lr=0.3, refine_lr=None).w, run(5, lr=0.05, refine_lr=None).w)
    assert not torch.equal(run(5, lr=0.05).w, run(5, lr=0.05, refine_lr=None).w)  # default refine_lr 0.15
    # cosine: the first step is at the full rate, later steps slower (a different end point)
    assert torch.equal(run(1, refine_schedule="cosine").w, run(1).w)
    cos, const = run(6, refine_schedule="cosine"), run(6)
    assert not torch.equal(cos.w, const.w)
    assert float((cos.w - w_init).norm()) < float((const.w - w_init).norm())  # decayed steps move less
    # from w_avg neither key applies
    ic = InversionConfig(steps=4, batch_size=4, feature_weight=0.0)
    ic_r = ic.model_copy(update={"encoder": EncoderConfig(refine_lr=1.0, refine_schedule="cosine")})
    assert torch.equal(invert(G, x, ic, 1.0, progress=False).w, invert(G, x, ic_r, 1.0, progress=False).w)


def test_returns_the_best_visited_w_not_the_last_iterate():
    from plan_shared.config import EncoderConfig
    from plan_shared.inversion import reconstruction_losses

    G, x, _ = _setup()
    w_good = G.mapping.w_avg[None].repeat(6, 1).clone()
    # a start point already close to the targets, and a rate that overshoots from it
    ic = InversionConfig(batch_size=4, feature_weight=0.0, encoder=EncoderConfig(refine_lr=50.0))
    w_start = invert(G, x, InversionConfig(steps=40, lr=0.05, batch_size=4, feature_weight=0.0), 1.0,
                     w_init=w_good, steps=40, progress=False).w
    res = invert(G, x, ic, sigma_w=1.0, w_init=w_start, steps=3, progress=False)
    start_mse, _ = reconstruction_losses(G, w_start, x, None, None)
    # what plain Adam ends at: the last iterate, re-run by hand with the same rate
    w = w_start.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=50.0)
    for _ in range(3):
        loss = (G.render(w) - x).pow(2).flatten(1).mean(1).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    last_mse, _ = reconstruction_losses(G, w.detach(), x, None, None)
    assert bool((last_mse > start_mse).any())  # the overshoot this test is about happened
    assert bool((res.mse <= start_mse + 1e-7).all())  # never worse than where it started
    assert torch.allclose(res.mse, reconstruction_losses(G, res.w, x, None, None)[0].detach(), atol=1e-6)
    assert res.generator_evals == 6 * 3  # choosing costs no generator evaluation
