"""GAN training step: finite losses, EMA, exact resume, weights and checkpoints."""

from __future__ import annotations

import pytest
import torch

from plan_shared.config import load_config
from plan_shared.gan import GanTrainer, load_generator

TINY = {
    "generator.base_channels": 16,
    "generator.min_channels": 8,
    "generator.z_dim": 16,
    "generator.w_dim": 16,
    "discriminator.base_channels": 8,
    "discriminator.max_channels": 16,
    "gan.batch_size": 8,
    "gan.r1_every": 2,
    "gan.style_mixing": 0.5,
    "gan.augment": ["color", "translation", "cutout"],
}


@pytest.fixture()
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(24, 1, 16, 16, generator=g) * 2 - 1


def _trainer(seed=0):
    return GanTrainer(load_config(overrides={**TINY, "seed": seed}), channels=1, size=16)


def test_smoke_finite_losses_and_ema_moves(images):
    tr = _trainer()
    ema0 = [p.clone() for p in tr.G_ema.parameters()]
    m = tr.train_steps(images, 4)
    for k in ("loss_g", "loss_d", "r1", "d_real", "d_fake"):
        assert torch.isfinite(torch.tensor(m[k])), k
    assert m["r1"] > 0
    assert tr.step == 4 and tr.images_seen == 32
    assert any(not torch.equal(a, b) for a, b in zip(ema0, tr.G_ema.parameters()))


def test_same_seed_same_run(images):
    a, b = _trainer(), _trainer()
    assert a.train_steps(images, 2) == b.train_steps(images, 2)


def test_resume_gives_identical_next_step(images, tmp_path):
    tr = _trainer()
    tr.train_steps(images, 3)
    tr.save_checkpoint(tmp_path / "ck.pt")
    m_cont = tr.train_steps(images, 2)
    w_cont = tr.weights("gd")

    resumed = GanTrainer.from_checkpoint(tmp_path / "ck.pt")
    assert resumed.step == 3
    m_res = resumed.train_steps(images, 2)
    assert m_res == m_cont
    for k, v in resumed.weights("gd").items():
        assert torch.equal(v, w_cont[k]), k


def test_weights_share_modes_and_set_weights(images):
    tr = _trainer()
    gd, g = tr.weights("gd"), tr.weights("g")
    assert any(k.startswith("d.") for k in gd) and not any(k.startswith("d.") for k in g)
    assert {k for k in g} <= set(gd)
    other = _trainer(seed=1)
    other.set_weights(g)
    for k, v in other.weights("g").items():
        assert torch.equal(v, g[k])
    assert not all(torch.equal(other.weights("gd")[k], gd[k]) for k in gd if k.startswith("d."))


def test_bad_inputs(images, tmp_path):
    tr = _trainer()
    with pytest.raises(ValueError, match=r"\[N, 1, 16, 16\]"):
        tr.train_steps(torch.zeros(4, 3, 16, 16), 1)
    with pytest.raises(ValueError, match="at least 2"):
        tr.train_steps(images[:1], 1)
    with pytest.raises(FileNotFoundError):
        GanTrainer.from_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_generator(junk)


def test_load_generator_and_grid(images, tmp_path):
    tr = _trainer()
    tr.train_steps(images, 1)
    tr.save_checkpoint(tmp_path / "ck.pt")
    G = load_generator(tmp_path / "ck.pt")
    w = torch.randn(2, 16)
    assert torch.allclose(G.render(w), tr.G_ema.render(w))
    assert not any(p.requires_grad for p in G.parameters())
    p = tr.sample_grid(tmp_path / "s" / "grid.png", n=4)
    assert p.is_file() and p.stat().st_size > 0


def _variant(**gan):
    return GanTrainer(load_config(overrides={**TINY, "seed": 0, **{f"gan.{k}": v for k, v in gan.items()}}), 1, 16)


def _assert_same_run(a, b, images, n=6):
    ma, mb = a.train_steps(images, n), b.train_steps(images, n)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert ma[k] == pytest.approx(mb[k], rel=1e-4, abs=1e-5), k
    wa, wb = a.weights("gd"), b.weights("gd")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5), k
    # the same random draws were consumed: the next batches are the same
    assert torch.equal(a.rng.get_state(), b.rng.get_state())
    assert torch.equal(a._torch_rng, b._torch_rng)


def test_fast_step_computes_what_the_reference_step_computes(images):
    # 6 steps at r1_every=2: steps with and without R1, with style mixing, all three augmentations
    _assert_same_run(_variant(fast=True), _variant(fast=False), images)


def test_fast_step_resumes_into_the_reference_step(images, tmp_path):
    tr = _variant(fast=True)
    tr.train_steps(images, 3)
    tr.save_checkpoint(tmp_path / "ck.pt")
    cfg = load_config(overrides={**TINY, "seed": 0, "gan.fast": False})
    ref = GanTrainer(cfg, 1, 16)
    ref.load_state_dict(torch.load(tmp_path / "ck.pt", weights_only=False))
    assert all(g["foreach"] is None for g in ref.opt_d.param_groups)
    _assert_same_run(tr, ref, images, n=3)


def test_discriminator_chunks_keep_minibatch_statistics():
    from plan_shared.models import build_discriminator

    D = build_discriminator(load_config(overrides=TINY), 16, 1)
    a, b = torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16)
    both = D(torch.cat([a, b]), chunks=2)
    assert torch.allclose(both, torch.cat([D(a), D(b)]), atol=1e-5)
    assert not torch.allclose(both, D(torch.cat([a, b])), atol=1e-5)  # one group over both would differ


def test_compile_switch():
    tr = _variant(compile="auto")
    assert not tr.use_compile(10_000)  # CPU: auto never compiles
    assert _variant(compile="on").use_compile(1) and not _variant(compile="off").use_compile(10_000)
    with pytest.raises(Exception, match="gan.compile"):
        load_config(overrides={"gan.compile": "sometimes"})


def test_fast_trainer_hands_out_contiguous_tensors(images, tmp_path):
    tr = _variant(fast=True)
    tr.train_steps(images, 2)
    assert tr.G.synthesis.convs[1].weight.is_contiguous(memory_format=torch.channels_last)  # NHWC inside
    assert tr.G_ema.synthesis.convs[1].weight.is_contiguous()  # G_ema renders like load_generator's copy
    assert all(v.is_contiguous() for v in tr.weights("gd").values())
    sd = tr.state_dict()
    for part in ("generator", "discriminator"):
        assert all(v.is_contiguous() for v in sd[part].values()), part
    for opt in ("opt_g", "opt_d"):
        assert all(v.is_contiguous() for st in sd[opt]["state"].values() for v in st.values()), opt
    # loading a reference checkpoint puts Adam's moments in the fast parameters' layout
    ref = _variant(fast=False)
    ref.train_steps(images, 2)
    tr.load_state_dict(ref.state_dict())
    for p, st in tr.opt_d.state.items():
        assert st["exp_avg"].stride() == p.stride()
