"""Model shapes at 28/32/64 px, grey and RGB; W-space rendering; classifier heads."""

from __future__ import annotations

import pytest
import torch

from plan_shared.config import load_config
from plan_shared.models import Classifier, build_discriminator, build_generator, native_resolution
from plan_shared.models.layers import modulated_conv2d


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_and_discriminator_shapes(size, channels):
    cfg = load_config(overrides={"generator.base_channels": 32, "generator.min_channels": 8})
    G, D = build_generator(cfg, size, channels), build_discriminator(cfg, size, channels)
    z = torch.randn(3, cfg.generator.z_dim)
    img = G(z)
    assert img.shape == (3, channels, size, size)
    assert D(img).shape == (3,)
    w = G.mapping(z)
    assert w.shape == (3, cfg.generator.w_dim)
    assert G.render(w).shape == (3, channels, size, size)
    ws = w.unsqueeze(1).repeat(1, G.synthesis.num_ws, 1)
    assert torch.allclose(G.synthesis(ws, "const"), G.render(w), atol=1e-5)


def test_render_is_deterministic_and_rejects_bad_shapes():
    G = build_generator(load_config(), 32, 1)
    w = torch.randn(2, 64)
    assert torch.equal(G.render(w), G.render(w))
    with pytest.raises(ValueError, match="w must be"):
        G.render(torch.randn(2, 3, 64))  # neither W [B, 64] nor W+ [B, num_ws = 11, 64]
    with pytest.raises(AssertionError):
        build_discriminator(load_config(), 32, 1)(torch.randn(2, 3, 32, 32))


def test_mapping_tracks_mean_w_and_truncation():
    G = build_generator(load_config(), 32, 1)
    assert torch.count_nonzero(G.w_avg) == 0
    z = torch.randn(16, 64)
    G.mapping(z, update_w_avg=True)
    assert torch.count_nonzero(G.w_avg) > 0
    assert torch.allclose(G.mapping(z, truncation=0.0), G.w_avg.expand(16, -1))


def test_tiny_default_sizes():
    cfg = load_config()
    G, D = build_generator(cfg, 32, 1), build_discriminator(cfg, 32, 1)
    n_g = sum(p.numel() for p in G.parameters())
    n_d = sum(p.numel() for p in D.parameters())
    assert 1e5 < n_g < 1e6 and 1e5 < n_d < 1e6


def test_native_resolution():
    assert [native_resolution(s) for s in (28, 32, 33, 256)] == [32, 32, 64, 256]
    with pytest.raises(ValueError):
        native_resolution(4)


def test_modulated_conv_matches_per_sample_weights():
    torch.manual_seed(0)
    x, wgt, s = torch.randn(3, 4, 8, 8), torch.randn(5, 4, 3, 3), torch.randn(3, 4)
    out = modulated_conv2d(x, wgt, s, demodulate=True)
    for b in range(3):
        wb = wgt * s[b].reshape(1, 4, 1, 1)
        wb = wb * torch.rsqrt(wb.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8)
        ref = torch.nn.functional.conv2d(x[b : b + 1], wb, padding=1)
        assert torch.allclose(out[b : b + 1], ref, atol=1e-4)


@pytest.mark.parametrize("head", ["linear", "cosine"])
@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (64, 1)])
def test_classifier_shapes(head, size, channels):
    C = Classifier(7, channels=channels, size=size, width=8, depth=3, feature_dim=16, head=head)
    x = torch.randn(4, channels, size, size)
    assert C(x).shape == (4, 7)
    assert C.features(x).shape == (4, 16)


def test_classifier_depth_is_checked():
    with pytest.raises(ValueError, match="too deep"):
        Classifier(2, size=8, depth=4)


def test_fused_layers_compute_the_reference_function():
    from plan_shared.models.discriminator import Discriminator
    from plan_shared.models.generator import StyleGenerator
    from plan_shared.models.layers import set_fused

    torch.manual_seed(0)
    G = StyleGenerator(z_dim=16, w_dim=16, size=16, base_channels=32, min_channels=8)
    D = Discriminator(16, 1, 8, 32)
    with torch.no_grad():  # non-trivial noise strengths and biases
        for name, p in list(G.named_parameters()) + list(D.named_parameters()):
            if "noise_strength" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.3)
    z, x = torch.randn(4, 16), torch.randn(4, 1, 16, 16)
    ref = (G(z, noise_mode="const"), D(x), G.render(G.sample_w(3, torch.Generator().manual_seed(1))))
    set_fused(G, True), set_fused(D, True)
    fused = (G(z, noise_mode="const"), D(x), G.render(G.sample_w(3, torch.Generator().manual_seed(1))))
    for a, b in zip(ref, fused):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    torch.manual_seed(5)
    r = G(z, noise_mode="random")
    set_fused(G, False)
    torch.manual_seed(5)
    assert torch.allclose(r, G(z, noise_mode="random"), rtol=1e-4, atol=1e-5)  # same noise draws


@pytest.mark.parametrize("channels", [1, 3])
def test_fused_channels_last_layers_give_the_reference_values_and_gradients(channels):
    import copy

    from plan_shared.models.discriminator import Discriminator
    from plan_shared.models.generator import StyleGenerator
    from plan_shared.models.layers import set_channels_last, set_fused

    torch.manual_seed(0)
    G = StyleGenerator(z_dim=16, w_dim=16, size=16, channels=channels, base_channels=32, min_channels=8)
    D = Discriminator(16, channels, 8, 32)
    with torch.no_grad():
        for _, p in list(G.named_parameters()) + list(D.named_parameters()):
            if p.ndim <= 1:
                p.add_(torch.randn_like(p) * 0.3)
    G2, D2 = copy.deepcopy(G), copy.deepcopy(D)
    set_channels_last(set_fused(G2, True)), set_channels_last(set_fused(D2, True))
    assert G2.synthesis.convs[1].weight.is_contiguous(memory_format=torch.channels_last)
    z = torch.randn(8, 16)

    def run(g, d):
        x = torch.randn(8, channels, 16, 16, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        img = g(z, noise_mode="const")
        feats = g.synthesis.convs[-1](torch.ones(8, 8, 16, 16), g.mapping(z), "const")
        loss = d(img).square().mean() + d(x).mean() + feats.mean()
        loss.backward()
        grads = {n: p.grad for n, p in list(g.named_parameters()) + [("d." + k, v) for k, v in d.named_parameters()]}
        return img, feats, x.grad, grads

    img_a, f_a, gx_a, ga = run(G, D)
    img_b, f_b, gx_b, gb = run(G2, D2)
    assert f_b.is_contiguous(memory_format=torch.channels_last) and not f_b.is_contiguous()  # activations stay NHWC
    for a, b in [(img_a, img_b), (f_a, f_b), (gx_a, gx_b)] + [(ga[k], gb[k]) for k in ga]:
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert ga.keys() == gb.keys() and all(v is not None for v in list(ga.values()) + list(gb.values()))
