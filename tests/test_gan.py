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
