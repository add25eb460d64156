"""PLAN navigation (method.md B5): losses against hand-computed values, straight line
without classifier terms, chunked accumulation equals one big batch."""

import math

import pytest
import torch
from torch import nn

from plan_shared.config import NavigationConfig
from plan_shared.models import Classifier, StyleGenerator
from plan_shared.nav_objectives import Objective
from plan_shared.navigation import (
    class_rate_upper_bound,
    compose_styles,
    dist_loss,
    draw_to_class_quotas,
    free_layers,
    kl_uniform,
    linear_paths,
    official_loop,
    offset_bound,
    optimise_paths,
    path_losses,
    path_styles,
    project_offsets,
    sequential_reference,
)


def tiny():
    torch.manual_seed(0)
    G = StyleGenerator(z_dim=8, w_dim=8, size=8, channels=1, mapping_layers=1, base_channels=8, min_channels=4).eval()
    phi_id = Classifier(5, 1, 8, width=4, depth=2, feature_dim=8, head="cosine").eval()
    phi_c = Classifier(2, 1, 8, width=4, depth=2, feature_dim=8).eval()
    return G, phi_id, phi_c


def nav(**kw) -> NavigationConfig:
    return NavigationConfig(**{"devices": ["cpu"], **kw})


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
    """L_dist alone is minimal on the evenly spaced line: 20 Adam steps must not drift off it (the offset
    parametrisation makes its gradient exactly 0 there). The steps really ran and measured the minimum."""
    G, phi_id, phi_c = tiny()
    wa, wb = torch.randn(3, 8), torch.randn(3, 8)
    res = optimise_paths(G, phi_id, phi_c, wa, wb, torch.zeros(3), nav(T=6, steps=20, lr=0.05, lambda_id=0.0, lambda_class=0.0),
                         progress=False)
    lin = linear_paths(wa, wb, 6)
    assert torch.allclose(res.paths, lin, atol=1e-5)
    assert res.steps_run.tolist() == [20, 20, 20] and len(res.history) == 20
    assert res.history[-1]["dist"] == pytest.approx(float(dist_loss(lin).sum()), rel=1e-5)
    assert res.history[-1]["id"] == 0.0 and res.history[-1]["class"] == 0.0  # terms with weight 0 are not evaluated


def test_dist_weight_pulls_paths_towards_the_line():
    """The same classifier pull with a stronger elastic band ends closer to the straight line, and the
    classifier terms alone move it off (so the straight-line test above is not passed by a no-op)."""
    G, phi_id, phi_c = tiny()
    torch.manual_seed(4)
    wa, wb = torch.randn(3, 8), torch.randn(3, 8)
    y = torch.tensor([0, 1, 0])
    lin = linear_paths(wa, wb, 6)
    off = {}
    for ld in (0.0, 5.0):
        res = optimise_paths(G, phi_id, phi_c, wa, wb, y, nav(T=6, steps=15, lr=0.1, lambda_dist=ld, lambda_id=1.0,
                                                               lambda_class=4.0), progress=False)
        off[ld] = float((res.paths - lin).norm(dim=2).mean())
    assert off[0.0] > 0.05
    assert off[5.0] < 0.7 * off[0.0], off


def test_chunked_batched_equals_sequential_reference():
    G, phi_id, phi_c = tiny()
    torch.manual_seed(3)
    wa, wb = torch.randn(3, 8), torch.randn(3, 8)
    y = torch.tensor([0, 1, 1])
    cfg = nav(T=7, steps=5, lr=0.05, lambda_dist=1.0, lambda_id=1.2, lambda_class=12.0, chunk=4)  # chunks cross paths
    batched = optimise_paths(G, phi_id, phi_c, wa, wb, y, cfg, w_scale=0.7, progress=False).paths
    for p in range(3):
        ref = sequential_reference(G, phi_id, phi_c, wa[p], wb[p], int(y[p]), cfg, w_scale=0.7)
        assert torch.allclose(batched[p], ref, atol=1e-4), (p, (batched[p] - ref).abs().max())
    assert not torch.allclose(batched, linear_paths(wa, wb, 7))  # the classifier terms moved it


def test_official_loop_has_the_same_objective_when_splits_are_whole():
    """T - 2 = 8 interior points = two splits of 4: the published loop's summed split-means with weights
    4*lambda/(T-2) equal our per-path means, so the two optimisers follow the same trajectory; with
    T - 2 = 6 (splits 4 + 2) the published weighting differs and so does the path."""
    G, phi_id, phi_c = tiny()
    torch.manual_seed(6)
    wa, wb = torch.randn(2, 8), torch.randn(2, 8)
    y = torch.tensor([1, 0])
    cfg = nav(T=10, steps=6, lr=0.05, lambda_id=1.0, lambda_class=6.0, class_target=None)  # the published objective
    ours = optimise_paths(G, phi_id, phi_c, wa, wb, y, cfg, w_scale=0.8, progress=False)
    losses: list[float] = []
    for p in range(2):
        off = official_loop(G, phi_id, phi_c, wa[p], wb[p], int(y[p]), cfg, w_scale=0.8,
                            on_step=lambda k, pts, loss: losses.append(loss))
        assert torch.allclose(ours.paths[p], off, atol=1e-4), (p, (ours.paths[p] - off).abs().max())
    assert len(losses) == 12
    assert losses[5] + losses[11] == pytest.approx(float(ours.final_loss.sum()), rel=1e-4)
    cfg8 = nav(T=8, steps=6, lr=0.05, lambda_id=1.0, lambda_class=6.0, class_target=None)
    ours8 = optimise_paths(G, phi_id, phi_c, wa, wb, y, cfg8, w_scale=0.8, progress=False).paths
    off8 = official_loop(G, phi_id, phi_c, wa[0], wb[0], int(y[0]), cfg8, w_scale=0.8)
    assert not torch.allclose(ours8[0], off8, atol=1e-4)


def test_max_offset_bounds_points():
    G, phi_id, phi_c = tiny()
    wa, wb = torch.randn(2, 8), torch.randn(2, 8)
    out = optimise_paths(G, phi_id, phi_c, wa, wb, torch.zeros(2),
                         nav(T=5, steps=5, lr=0.5, lambda_dist=0.0, lambda_id=10.0, lambda_class=10.0, max_offset=0.1),
                         progress=False).paths
    off = (out - linear_paths(wa, wb, 5)).norm(dim=2)
    assert float(off.max()) <= 0.1 + 1e-5
    assert float(off.max()) > 0.09  # the bound was reached, i.e. it acted


def test_trust_ratio_bounds_points_by_their_anchor_pair_distance():
    """Each point's offset from the straight line stays within trust_ratio x ||w_b - w_a|| of ITS path (in real W,
    whatever sigma_W), the bound is reached (it acted), and paths of far pairs may move farther than near ones."""
    G, phi_id, phi_c = tiny()
    torch.manual_seed(3)
    wa = torch.randn(2, 8)
    wb = wa + torch.randn(2, 8) * torch.tensor([[0.3], [3.0]])  # a near and a far pair
    cfg = nav(T=5, steps=6, lr=0.5, lambda_dist=0.0, lambda_id=10.0, lambda_class=10.0, class_target=None, trust_ratio=0.2)
    out = optimise_paths(G, phi_id, phi_c, wa, wb, torch.zeros(2), cfg, w_scale=0.7, progress=False).paths
    off = (out - linear_paths(wa, wb, 5)).norm(dim=2)  # [2, T]; 0 at the anchors
    bound = 0.2 * (wb - wa).norm(dim=1)
    assert (off.max(1).values <= bound * (1 + 1e-4)).all()
    assert (off[:, 1:-1].max(1).values > 0.9 * bound).all()
    assert float(off[1].max()) > 5 * float(off[0].max())
    free = optimise_paths(G, phi_id, phi_c, wa, wb, torch.zeros(2), cfg.model_copy(update={"trust_ratio": None}),
                          w_scale=0.7, progress=False).paths
    assert float((free - linear_paths(wa, wb, 5)).norm(dim=2)[0].max()) > 2 * float(bound[0])  # unbounded goes farther


def test_offset_bound_takes_the_tighter_of_trust_ratio_and_max_offset():
    wa, wb = torch.zeros(2, 3), torch.tensor([[1.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    assert offset_bound(nav(trust_ratio=None), wa, wb) is None
    assert torch.allclose(offset_bound(nav(), wa, wb), NavigationConfig().trust_ratio * torch.tensor([1.0, 10.0]))  # default on
    assert torch.allclose(offset_bound(nav(trust_ratio=0.5), wa, wb), torch.tensor([0.5, 5.0]))
    assert torch.allclose(offset_bound(nav(trust_ratio=0.5, max_offset=2.0), wa, wb), torch.tensor([0.5, 2.0]))
    assert torch.allclose(offset_bound(nav(trust_ratio=None, max_offset=2.0), wa, wb), torch.tensor([2.0, 2.0]))
    D = torch.tensor([[[3.0, 4.0], [0.3, 0.4]], [[0.0, 0.0], [6.0, 8.0]]])  # norms 5, 0.5 | 0, 10
    project_offsets(D, torch.tensor([1.0, 20.0]))
    assert torch.allclose(D.norm(dim=2), torch.tensor([[1.0, 0.5], [0.0, 10.0]]))  # only the one outside moved
    assert torch.allclose(D[0, 0], torch.tensor([0.6, 0.8]))  # radially: the direction is kept


def test_early_stopping_stops_each_path_on_its_own_plateau():
    G, phi_id, phi_c = tiny()
    torch.manual_seed(7)
    wa, wb = torch.randn(4, 8), torch.randn(4, 8)
    y = torch.tensor([0, 1, 0, 1])
    full = nav(T=6, steps=200, lr=0.1)
    ref = optimise_paths(G, phi_id, phi_c, wa, wb, y, full, progress=False)
    es = optimise_paths(G, phi_id, phi_c, wa, wb, y, nav(T=6, steps=200, lr=0.1, early_stop_patience=5,
                                                         early_stop_rel_tol=1e-3), progress=False)
    assert int(es.steps_run.max()) < 200 and int(es.steps_run.min()) >= 5
    assert len(set(es.steps_run.tolist())) > 1  # per path, not all at once
    assert es.history[-1]["active"] == 0.0
    # each path holds the best point it measured, and final_loss is that point's objective: re-evaluate it
    L = path_losses(G, phi_id, phi_c, es.paths, y)
    obj = full.lambda_dist * L["dist"] + full.lambda_id * L["id"] + full.lambda_class * L["class"]
    assert torch.allclose(obj.detach().double(), es.final_loss, rtol=1e-4)
    L0 = path_losses(G, phi_id, phi_c, linear_paths(wa, wb, 6), y)
    obj0 = full.lambda_dist * L0["dist"] + full.lambda_id * L0["id"] + full.lambda_class * L0["class"]
    # never worse than the straight start (up to float rounding: a path that never improves holds its start, whose
    # objective the chunked engine and path_losses sum in different orders; 1e-6 absolute failed on an AVX-512 CPU)
    assert bool((es.final_loss <= obj0.detach().double() * (1 + 1e-5)).all())
    # and it stopped on a plateau: close to what 200 steps reach
    assert float(es.final_loss.sum()) <= 1.05 * float(ref.final_loss.sum())


def test_sharded_over_two_cpu_workers_equals_one_worker():
    G, phi_id, phi_c = tiny()
    torch.manual_seed(8)
    wa, wb = torch.randn(5, 8), torch.randn(5, 8)
    y = torch.tensor([0, 1, 1, 0, 1])
    kw = {"T": 6, "steps": 8, "lr": 0.1, "chunk": 8, "early_stop_patience": 3}
    one = optimise_paths(G, phi_id, phi_c, wa, wb, y, nav(**kw), w_scale=0.9, progress=False)
    two = optimise_paths(G, phi_id, phi_c, wa, wb, y, nav(devices=["cpu", "cpu"], **kw), w_scale=0.9, progress=False)
    assert torch.allclose(one.paths, two.paths, atol=1e-5), (one.paths - two.paths).abs().max()
    assert torch.equal(one.steps_run, two.steps_run)
    assert [(s["device"], s["first_path"], s["paths"]) for s in two.shards] == [("cpu", 0, 3), ("cpu", 3, 2)]
    assert len(one.shards) == 1 and one.shards[0]["paths"] == 5
    assert two.history[-1]["dist"] == pytest.approx(one.history[-1]["dist"], rel=1e-5)
    assert not any(q.requires_grad for q in G.parameters())


def test_bf16_precision_runs_in_bfloat16_and_stays_near_fp32():
    G, phi_id, phi_c = tiny()
    torch.manual_seed(8)
    wa, wb = torch.randn(4, 8), torch.randn(4, 8)
    y = torch.tensor([0, 1, 1, 0])
    kw = {"T": 6, "steps": 6, "lr": 0.05, "chunk": 8}
    seen: list[torch.dtype] = []
    hook = phi_id.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        half = optimise_paths(G, phi_id, phi_c, wa, wb, y, nav(precision="bf16", **kw), w_scale=0.9, progress=False)
    finally:
        hook.remove()
    full = optimise_paths(G, phi_id, phi_c, wa, wb, y, nav(**kw), w_scale=0.9, progress=False)
    assert seen and all(d == torch.bfloat16 for d in seen)  # the passes really ran in bf16 ...
    assert half.paths.dtype == torch.float32 and half.final_loss.dtype == torch.float64
    assert torch.isfinite(half.final_loss).all()
    assert not torch.equal(half.paths, full.paths)
    # ... and the paths moved like the fp32 ones: the same direction off the straight line, within a few per cent
    lin = linear_paths(wa, wb, 6)
    d_half, d_full = (half.paths - lin).flatten(), (full.paths - lin).flatten()
    assert torch.nn.functional.cosine_similarity(d_half, d_full, dim=0) > 0.9
    assert (d_half.norm() / d_full.norm() - 1).abs() < 0.2


def test_precision_is_checked():
    with pytest.raises(ValueError, match="precision"):
        NavigationConfig(precision="fp16")


def test_devices_are_checked():
    with pytest.raises(ValueError, match="gpu0"):
        NavigationConfig(devices=["cpu", "gpu0"])
    if not torch.cuda.is_available():
        G, phi_id, phi_c = tiny()
        with pytest.raises(ValueError, match="cuda:0 is not visible"):
            optimise_paths(G, phi_id, phi_c, torch.randn(1, 8), torch.randn(1, 8), torch.zeros(1), nav(devices=["cuda:0"]),
                           progress=False)


# ---------------------------------------------------------------------------------------------- W+ (navigation.layers)
def test_wplus_with_every_layer_sharing_w_renders_what_w_renders():
    G, _, _ = tiny()
    w = G.sample_w(4, torch.Generator().manual_seed(1))
    n_ws = G.synthesis.num_ws
    assert torch.equal(G.render(w.unsqueeze(1).expand(-1, n_ws, -1)), G.render(w))
    every = torch.ones(n_ws, dtype=torch.bool)
    assert torch.equal(G.render(compose_styles(w, torch.randn_like(w), every)), G.render(w))
    assert compose_styles(w, torch.randn_like(w), None) is w  # layers all: plain W
    mixed = compose_styles(w, torch.randn_like(w), torch.tensor([True, True, False, False, False]))
    assert not torch.allclose(G.render(mixed), G.render(w))  # a held layer with another w changes the image
    with pytest.raises(ValueError, match=r"\[B, 5, 8\] \(W\+\)"):
        G.render(torch.randn(2, 4, 8))


def test_free_layers_are_the_blocks_below_fine_from():
    G, _, _ = tiny()  # 8 px: styles of the 4, 4, 8, 8, 8 px blocks
    assert G.synthesis.ws_resolution == [4, 4, 8, 8, 8]
    assert free_layers(G, nav(layers="coarse_middle", fine_from=8)).tolist() == [True, True, False, False, False]
    assert free_layers(G, nav(layers="all", fine_from=8)) is None
    assert NavigationConfig().layers == "coarse_middle"  # the measured default (benchmarks/plan_vs_linear.py)
    assert free_layers(G, nav(layers="coarse_middle", fine_from=16)) is None  # nothing at 16 px or above: plain W
    G32 = StyleGenerator(z_dim=8, w_dim=8, size=32, channels=1, mapping_layers=1, base_channels=8, min_channels=4)
    held = ~free_layers(G32, nav(layers="coarse_middle"))  # the default fine_from: 32 px
    assert held.tolist() == [False] * 8 + [True] * 3


def test_coarse_middle_paths_hold_the_fine_layers_exactly_on_the_linear_path():
    G, phi_id, phi_c = tiny()
    torch.manual_seed(9)
    wa, wb = torch.randn(2, 8), torch.randn(2, 8)
    y = torch.tensor([0, 1])
    kw = {"T": 6, "steps": 4, "lr": 0.1, "class_target": None, "fine_from": 8}
    cfg = nav(layers="coarse_middle", **kw)
    res = optimise_paths(G, phi_id, phi_c, wa, wb, y, cfg, w_scale=0.8, progress=False)
    styles = path_styles(G, res.paths, cfg)
    free = free_layers(G, cfg)
    lin = linear_paths(wa, wb, 6)
    assert styles.shape == (2, 6, 5, 8)
    assert torch.equal(styles[:, :, ~free], lin.unsqueeze(2).expand(-1, -1, 3, -1))  # fine: the linear path's w
    assert torch.equal(styles[:, :, free], res.paths.unsqueeze(2).expand(-1, -1, 2, -1))  # coarse/middle: navigated
    assert not torch.allclose(res.paths, lin, atol=1e-3)  # and navigation did move them
    plain = optimise_paths(G, phi_id, phi_c, wa, wb, y, nav(layers="all", **kw), w_scale=0.8, progress=False)
    assert not torch.allclose(plain.paths, res.paths, atol=1e-4)  # the restriction changes the optimisation
    assert torch.equal(path_styles(G, lin, cfg), lin.unsqueeze(2).expand(-1, -1, 5, -1))  # linear stays linear
    # the chunked optimiser agrees with the one-batch reference under the restriction too
    chunked = optimise_paths(G, phi_id, phi_c, wa, wb, y, nav(layers="coarse_middle", chunk=3, **kw), w_scale=0.8,
                             progress=False).paths
    for p in range(2):
        ref = sequential_reference(G, phi_id, phi_c, wa[p], wb[p], int(y[p]), cfg, w_scale=0.8)
        assert torch.allclose(chunked[p], ref, atol=1e-4), (p, (chunked[p] - ref).abs().max())


def test_gradient_reaches_only_the_coarse_middle_offsets():
    """d loss / d w of a composed point is exactly the sum of the free layers' style gradients: the fine layers'
    gradient (non-zero, so they do shape the image) goes to the straight-line start, never to the navigated w."""
    G, phi_id, _ = tiny()
    free = torch.tensor([True, True, False, False, False])
    w = G.sample_w(3, torch.Generator().manual_seed(2)).requires_grad_(True)
    w_lin = G.sample_w(3, torch.Generator().manual_seed(3)).requires_grad_(True)
    (g_w, g_lin) = torch.autograd.grad(kl_uniform(phi_id(G.render(compose_styles(w, w_lin, free)))).sum(), [w, w_lin])
    ws = compose_styles(w, w_lin, free).detach().requires_grad_(True)
    (g_ws,) = torch.autograd.grad(kl_uniform(phi_id(G.render(ws))).sum(), [ws])
    assert float(g_ws[:, ~free].abs().sum()) > 0
    assert torch.allclose(g_w, g_ws[:, free].sum(1), atol=1e-6)
    assert torch.allclose(g_lin, g_ws[:, ~free].sum(1), atol=1e-6)


def test_coarse_middle_with_early_stopping_sharded_equals_one_worker():
    G, phi_id, phi_c = tiny()
    torch.manual_seed(10)
    wa, wb = torch.randn(5, 8), torch.randn(5, 8)
    y = torch.tensor([1, 0, 1, 0, 1])
    kw = {"T": 5, "steps": 40, "lr": 0.1, "chunk": 7, "early_stop_patience": 2, "layers": "coarse_middle", "fine_from": 8}
    one = optimise_paths(G, phi_id, phi_c, wa, wb, y, nav(**kw), progress=False)
    two = optimise_paths(G, phi_id, phi_c, wa, wb, y, nav(devices=["cpu", "cpu"], **kw), progress=False)
    assert torch.allclose(one.paths, two.paths, atol=1e-5), (one.paths - two.paths).abs().max()
    assert torch.equal(one.steps_run, two.steps_run) and int(one.steps_run.max()) < 40
    cfg = nav(**kw)
    # final_loss is the objective of the point each path holds, rendered W+ (unit w_scale: L_dist in real W)
    L = path_losses(G, phi_id, phi_c, one.paths, y, Objective.from_config(cfg), free=free_layers(G, cfg))
    obj = cfg.lambda_dist * L["dist"] + cfg.lambda_id * L["id"] + cfg.lambda_class * L["class"]
    assert torch.allclose(obj.detach().double(), one.final_loss, rtol=1e-4)


def _by_sign(G):
    """A labeller that a test can predict: class 1 when the render's mean is above the median of a probe."""
    probe = G.render(G.sample_w(256, torch.Generator().manual_seed(99))).flatten(1).mean(1)
    cut = float(probe.median())

    def render_and_label(w):
        img = G.render(w)
        return img, (img.flatten(1).mean(1) > cut).long().numpy()

    return render_and_label


def test_draw_to_class_quotas_keeps_each_class_to_its_quota_in_draw_order():
    G, _, _ = tiny()
    label = _by_sign(G)
    d = draw_to_class_quotas(G, [7, 3], label, truncation=0.7, seed=5, batch=4)
    assert d.kept == d.quota == [7, 3] and len(d.w) == len(d.images) == len(d.labels) == 10
    assert sorted(d.labels.tolist()) == [0] * 7 + [1] * 3
    img, lab = label(d.w)
    assert torch.allclose(img, d.images, atol=1e-5) and (lab == d.labels).all()  # each kept under its own label
    again = draw_to_class_quotas(G, [7, 3], label, truncation=0.7, seed=5, batch=4)
    assert torch.equal(again.w, d.w) and again.drawn == d.drawn >= 10  # seeded


def test_draw_to_class_quotas_stops_at_the_cap_and_reports_the_shortfall():
    G, _, _ = tiny()
    never = lambda w: (G.render(w), torch.zeros(len(w), dtype=torch.long).numpy())  # noqa: E731 - class 1 never comes
    d = draw_to_class_quotas(G, [2, 5], never, seed=0, batch=8, max_draws=20)
    assert d.drawn == 20 and d.kept == [2, 0] and len(d.w) == 2
    assert d.stopped == "max_draws"
    assert draw_to_class_quotas(G, [0, 0], never).drawn == 0
    with pytest.raises(ValueError, match="quotas must be >= 0"):
        draw_to_class_quotas(G, [-1, 2], never)


def test_draw_to_class_quotas_gives_up_early_only_on_a_class_that_cannot_gain():
    G, _, _ = tiny()
    never = lambda w: (G.render(w), torch.zeros(len(w), dtype=torch.long).numpy())  # noqa: E731 - class 1 never comes
    # class 1 never comes: after b draws with no hit its 95 % bound is ~3 / b, so the 1000 - b draws left could add
    # ~3000 / b - 3 < 0.05 x 30 = 1.5 samples once b > 667: the draw stops at the first batch boundary past that
    d = draw_to_class_quotas(G, [2, 30], never, seed=0, batch=100, max_draws=1000, give_up=0.05)
    assert d.stopped == "no class can gain" and d.kept == [2, 0] and d.drawn == 700
    full = draw_to_class_quotas(G, [2, 30], never, seed=0, batch=100, max_draws=1000)
    assert full.stopped == "max_draws" and full.drawn == 1000 and torch.equal(full.w, d.w)  # the same kept set
    # a class that does come, however slowly, keeps drawing: one hit in 50 (rate 0.02) x 1000 is far above 2
    rare = lambda w: (G.render(w), (torch.arange(len(w)) % 50 == 0).long().numpy())  # noqa: E731
    r = draw_to_class_quotas(G, [2, 40], rare, seed=0, batch=100, max_draws=1000, give_up=0.05)
    assert r.stopped == "max_draws" and r.drawn == 1000 and r.kept == [2, 20]
    met = draw_to_class_quotas(G, [2, 1], rare, seed=0, batch=100, max_draws=1000, give_up=0.05)
    assert met.stopped == "quotas met" and met.drawn == 100


def test_class_rate_upper_bound_is_the_rule_of_three_without_hits():
    assert class_rate_upper_bound(0, 0) == 1.0 and class_rate_upper_bound(5, 5) == 1.0
    assert class_rate_upper_bound(0, 2560) == pytest.approx(3 / 2560, rel=0.01)
    assert 10 / 100 < class_rate_upper_bound(10, 100) < 0.17  # above the observed rate, by the interval's width
    assert class_rate_upper_bound(10, 1000) < class_rate_upper_bound(10, 100)
