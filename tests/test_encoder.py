"""The learned inversion encoder (plan_shared.encoder): trained on generator samples only, it predicts
held-out samples' w better than w_avg; inversion refines from its output; files are tied to one G."""

import pytest
import torch

from plan_shared import encoder as encoder_mod
from plan_shared.config import ConfigError, EncoderConfig, InversionConfig, load_config
from plan_shared.encoder import (
    Encoder,
    EncoderPayload,
    adapt_encoder,
    encode,
    encoder_for,
    encoder_from_payload,
    encoder_init,
    encoder_payload,
    load_encoder,
    n_parameters,
    save_encoder,
    train_encoder,
    w_error,
)
from plan_shared.gan import generator_digest
from plan_shared.inversion import InversionResult, invert
from plan_shared.models import Classifier, StyleGenerator
from plan_shared.navigation import w_std


@pytest.fixture(scope="module")
def G():
    torch.manual_seed(0)
    g = StyleGenerator(z_dim=8, w_dim=8, size=8, channels=1, mapping_layers=1, base_channels=16, min_channels=8)
    g = g.eval().requires_grad_(False)
    g.mapping.w_avg.copy_(g.sample_w(512).mean(0))
    return g


@pytest.fixture(scope="module")
def trained(G):
    cfg = EncoderConfig(steps=100, batch=32, width=8, lr=3e-3, pixel_weight=0.0)  # the W loss alone
    return train_encoder(G, cfg, "cpu", progress=False, seed=0), cfg


def test_training_reduces_w_error_on_held_out_generator_samples(G, trained):
    E, cfg = trained
    sigma = w_std(G, seed=0)
    w = G.sample_w(64, torch.Generator().manual_seed(99))  # not drawn in training (other seed)
    x = G.render(w)
    err_enc = float(w_error(encode(E, x), w, sigma).mean())
    err_avg = float(w_error(G.w_avg[None].repeat(64, 1), w, sigma).mean())
    assert err_enc < 0.5 * err_avg, (err_enc, err_avg)
    assert E.stats is not None and E.stats.generator_evals == cfg.steps * cfg.batch
    assert E.stats.final_w_loss < err_avg


def test_encode_shapes_and_untrained_start_at_w_avg():
    torch.manual_seed(1)
    w_avg = torch.randn(12)
    E = Encoder(channels=1, size=28, w_dim=12, width=8, w_avg=w_avg, sigma_w=0.5)  # 28 px runs at native 32
    w = encode(E, torch.rand(5, 1, 28, 28) * 2 - 1, batch=2)
    assert w.shape == (5, 12) and w.device.type == "cpu"
    assert torch.allclose(w, w_avg.expand(5, -1))  # zero-initialised last layer: E(x) = w_avg
    assert encode(E, torch.zeros(0, 1, 28, 28)).shape == (0, 12)
    with pytest.raises(ValueError, match=r"encoder expects images \[B, 1, 28, 28\], got \(2, 3, 28, 28\)"):
        encode(E, torch.zeros(2, 3, 28, 28))
    E3 = Encoder(channels=3, size=32, w_dim=64, width=32, w_avg=torch.zeros(64), sigma_w=1.0)
    assert 2e5 < n_parameters(E3) < 8e5  # "a few hundred thousand" at the default width and 32 px


def test_refinement_from_the_encoder_reaches_at_most_the_error_of_its_start(G, trained):
    E, _ = trained
    torch.manual_seed(3)
    x = G.render(G.sample_w(12, torch.Generator().manual_seed(5)))
    x = (x + 0.05 * torch.randn_like(x)).clamp(-1, 1)  # a little off the generator's manifold
    f = Classifier(3, 1, 8, width=4, depth=2, feature_dim=8).eval()
    ic = InversionConfig(batch_size=5, encoder=EncoderConfig(refine_steps=8))
    sigma = w_std(G, seed=0)
    w0 = encode(E, x)
    start = invert(G, x, ic, sigma, feature_net=f, w_init=w0, steps=0, progress=False)
    assert torch.equal(start.w, w0) and start.generator_evals == 0
    ref = invert(G, x, ic, sigma, feature_net=f, w_init=w0, progress=False)
    assert ref.steps == 8 and ref.generator_evals == 12 * 8  # refine_steps from the config section
    def loss(r: InversionResult) -> float:
        return float((r.mse + r.feature_loss).mean())

    assert loss(ref) <= loss(start)
    with pytest.raises(ValueError, match=r"w_init must be \[12, 8\]"):
        invert(G, x, ic, sigma, w_init=w0[:3], progress=False)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"inversion\.encoder\.steps' = 0"):
        load_config(overrides={"inversion.encoder.steps": 0})
    with pytest.raises(ConfigError, match=r"inversion\.encoder\.refine_steps' = -1"):
        load_config(overrides={"inversion.encoder.refine_steps": -1})
    with pytest.raises(ConfigError, match=r"unknown key 'inversion\.encoder\.depth'"):
        load_config(overrides={"inversion.encoder.depth": 3})
    with pytest.raises(ConfigError, match=r"inversion\.encoder\.refine_lr' = 0"):
        load_config(overrides={"inversion.encoder.refine_lr": 0})
    with pytest.raises(ConfigError, match=r"inversion\.encoder\.refine_schedule"):
        load_config(overrides={"inversion.encoder.refine_schedule": "linear"})
    with pytest.raises(ConfigError, match=r"inversion\.encoder\.augment_noise' = 1.5"):
        load_config(overrides={"inversion.encoder.augment_noise": 1.5})
    with pytest.raises(ConfigError, match=r"inversion\.encoder\.train_noise_mode"):
        load_config(overrides={"inversion.encoder.train_noise_mode": "none"})
    assert load_config(overrides={"inversion.encoder.enabled": True}).inversion.encoder.enabled is True
    ec = load_config().inversion.encoder  # on by default since stop 24, trained by the coordinator and shipped with G
    assert ec.enabled is True and ec.train_at == "coordinator"
    with pytest.raises(ConfigError, match="train_at"):
        load_config(overrides={"inversion.encoder.train_at": "pool"})


def test_encoder_file_is_tied_to_its_generator(G, trained, tmp_path):
    E, cfg = trained
    sha = generator_digest(G)
    p = save_encoder(E, tmp_path / "enc.pt", sha)
    E2 = load_encoder(p, sha)
    x = G.render(G.sample_w(4))
    assert torch.equal(encode(E2, x), encode(E, x)) and E2.stats == E.stats
    with pytest.raises(ValueError, match="trained for generator"):
        load_encoder(p, "0" * 64)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt: not a readable encoder file"):
        load_encoder(tmp_path / "bad.pt", sha)
    # encoder_for: loads a matching file, trains (and rewrites) for another generator
    on_disk = cfg.model_copy(update={"path": str(p), "steps": 3})
    E3, loaded = encoder_for(G, on_disk, sha, "cpu", progress=False)
    assert loaded and torch.equal(encode(E3, x), encode(E, x))
    E4, loaded = encoder_for(G, on_disk, "f" * 64, "cpu", progress=False)
    assert not loaded and E4.stats is not None and E4.stats.steps == 3
    assert load_encoder(p, "f" * 64).stats == E4.stats


def test_encoder_init_follows_enabled(G):
    x = G.render(G.sample_w(6))
    off = InversionConfig(encoder=EncoderConfig(enabled=False))
    assert encoder_init(G, x, off, "sha", "cpu", progress=False) == (None, {"enabled": False, "shipped": False})
    on = InversionConfig(encoder=EncoderConfig(enabled=True, steps=4, batch=8, width=4, adapt_epochs=0))  # E as shipped
    w0, rep = encoder_init(G, x, on, "sha", "cpu", progress=False)
    assert w0 is not None and w0.shape == (6, 8)
    assert rep["enabled"] and not rep["loaded"] and rep["train_generator_evals"] == 2 * 32  # pixel loss: 2 per sample
    assert rep["source"] == "site" and rep["e_train_generator_evals"] == 2 * 32
    assert rep["mean_mse_at_init"] is not None and rep["refine_steps"] == on.encoder.refine_steps


def test_augmented_training_is_seeded_and_still_learns_w(G):
    cfg = EncoderConfig(steps=100, batch=32, width=8, lr=3e-3, augment_noise=0.2, train_noise_mode="random",
                        pixel_weight=0.0)
    E = train_encoder(G, cfg, "cpu", progress=False, seed=0)
    again = train_encoder(G, cfg, "cpu", progress=False, seed=0)
    plain = train_encoder(G, cfg.model_copy(update={"augment_noise": 0.0, "train_noise_mode": "const"}), "cpu",
                          progress=False, seed=0)
    sigma = w_std(G, seed=0)
    w = G.sample_w(64, torch.Generator().manual_seed(99))
    x = (G.render(w) + 0.1 * torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(7))).clamp(-1, 1)
    assert torch.equal(encode(E, x), encode(again, x))  # the noise comes from the seeded generator
    assert not torch.equal(encode(E, x), encode(plain, x))
    err = float(w_error(encode(E, x), w, sigma).mean())
    err_avg = float(w_error(G.w_avg[None].repeat(64, 1), w, sigma).mean())
    assert err < 0.5 * err_avg, (err, err_avg)
    assert E.stats is not None and E.stats.generator_evals == cfg.steps * cfg.batch  # noise costs no G evaluation


def test_pixel_loss_in_training_changes_e_and_costs_two_generator_passes_per_sample(G, trained):
    # (that it lowers the error at E(x) is measured on a trained G in benchmarks/inversion.py; on this tiny
    # random G it does not, so only the wiring and the cost accounting are tested here)
    E_w, cfg = trained
    E_px = train_encoder(G, cfg.model_copy(update={"pixel_weight": 30.0}), "cpu", progress=False, seed=0)
    assert E_px.stats is not None and E_px.stats.generator_evals == 2 * cfg.steps * cfg.batch
    x = G.render(G.sample_w(8, torch.Generator().manual_seed(99)))
    assert not torch.equal(encode(E_px, x), encode(E_w, x))


def test_payload_round_trip_rebuilds_the_same_encoder_and_names_what_is_wrong(G, trained):
    E, _ = trained
    sha = generator_digest(G)
    p = encoder_payload(E, sha)
    meta = p.meta()
    assert meta["format"] == "plan-encoder/2" and meta["generator-sha256"] == sha and meta["arch-w_dim"] == 8
    assert all(isinstance(v, (int, float, str)) for v in meta.values())  # a Flower ConfigRecord holds it as is
    back = EncoderPayload.from_meta(p.state, meta)
    assert back.arch == p.arch and back.stats == E.stats
    E2 = encoder_from_payload(back, sha)
    x = G.render(G.sample_w(4))
    assert torch.equal(encode(E2, x), encode(E, x))
    with pytest.raises(ValueError, match="shipped: encoder was trained for generator"):
        encoder_from_payload(back, "0" * 64, where="shipped")
    with pytest.raises(ValueError, match="task: missing or invalid key 'arch-width'"):
        EncoderPayload.from_meta(p.state, {k: v for k, v in meta.items() if k != "arch-width"}, "task")
    with pytest.raises(ValueError, match="not an encoder"):
        EncoderPayload.from_meta(p.state, dict(meta, format="plan-encoder/1"))
    wrong = EncoderPayload(p.state, sha, dict(p.arch, width=4), None)
    with pytest.raises(ValueError, match="do not fit its architecture"):
        encoder_from_payload(wrong, sha)


def test_a_shipped_encoder_is_used_and_the_site_trains_none(G, trained, monkeypatch):
    E, _ = trained
    sha = generator_digest(G)
    x = G.render(G.sample_w(6, torch.Generator().manual_seed(5)))

    def no_training(*a, **k):
        raise AssertionError("the site trained an encoder although one was shipped")

    monkeypatch.setattr(encoder_mod, "train_encoder", no_training)
    on = InversionConfig(encoder=EncoderConfig(enabled=True, steps=4, batch=8, width=4, adapt_epochs=0))  # E as shipped
    w0, rep = encoder_init(G, x, on, sha, "cpu", progress=False, shipped=encoder_payload(E, sha))
    assert w0 is not None and torch.equal(w0, encode(E, x))
    assert rep["source"] == "coordinator" and rep["train_generator_evals"] == 0 and rep["train_seconds"] == 0.0
    assert E.stats is not None and rep["e_train_generator_evals"] == E.stats.generator_evals  # what it cost there
    assert rep["train_steps"] == E.stats.steps  # E's own training, not this site's config
    with pytest.raises(ValueError, match="the encoder shipped with the generator: encoder was trained for generator"):
        encoder_init(G, x, on, "f" * 64, "cpu", progress=False, shipped=encoder_payload(E, sha))
    off = InversionConfig(encoder=EncoderConfig(enabled=False))
    assert encoder_init(G, x, off, sha, "cpu", progress=False, shipped=encoder_payload(E, sha)) == \
        (None, {"enabled": False, "shipped": True})  # a site may still start from w_avg


def test_adaptation_to_real_images_lowers_their_inversion_loss_and_leaves_e_unchanged(G, trained):
    E, _ = trained
    torch.manual_seed(4)
    x = G.render(G.sample_w(24, torch.Generator().manual_seed(8)))
    x = (0.7 * x + 0.3 * torch.rand_like(x) * 2 - 0.3).clamp(-1, 1)  # off the generator's manifold, as real images are
    f = Classifier(3, 1, 8, width=4, depth=2, feature_dim=8).eval().requires_grad_(False)
    ic = InversionConfig(encoder=EncoderConfig(adapt_epochs=6, adapt_lr=3e-3, adapt_batch=8))
    sigma = w_std(G, seed=0)
    before = {k: v.clone() for k, v in E.state_dict().items()}
    A, st = adapt_encoder(E, G, x, ic, f, seed=0, progress=False)
    assert A is not E and all(torch.equal(before[k], v) for k, v in E.state_dict().items())  # E as shipped
    assert st.epochs == 6 and st.steps == 6 * 3 and st.generator_evals == 6 * 24
    assert st.first_epoch_loss is not None and st.last_epoch_loss is not None
    assert st.last_epoch_loss < st.first_epoch_loss

    def loss(enc: Encoder) -> float:
        r = invert(G, x, ic, sigma, feature_net=f, w_init=encode(enc, x), steps=0, progress=False)
        assert r.feature_loss is not None
        return float((r.mse + r.feature_loss).mean())

    assert loss(A) < loss(E)
    A2, _ = adapt_encoder(E, G, x, ic, f, seed=0, progress=False)  # seeded: the same copy again
    assert torch.equal(encode(A2, x), encode(A, x))
    none = InversionConfig(encoder=EncoderConfig(adapt_epochs=0))
    same, st0 = adapt_encoder(E, G, x, none, f, progress=False)
    assert same is E and st0.generator_evals == 0


def test_encoder_init_adapts_the_shipped_encoder_and_reports_its_cost(G, trained):
    E, _ = trained
    sha = generator_digest(G)
    x = G.render(G.sample_w(10, torch.Generator().manual_seed(6)))
    f = Classifier(3, 1, 8, width=4, depth=2, feature_dim=8).eval().requires_grad_(False)
    ic = InversionConfig(encoder=EncoderConfig(enabled=True, adapt_epochs=2, adapt_batch=4, refine_steps=3))
    w0, rep = encoder_init(G, x, ic, sha, "cpu", progress=False, shipped=encoder_payload(E, sha), feature_net=f)
    assert w0 is not None and not torch.equal(w0, encode(E, x))  # encoded by the adapted copy
    assert rep["source"] == "coordinator" and rep["adapt_epochs"] == 2 and rep["adapt_steps"] == 2 * 3
    assert rep["adapt_generator_evals"] == 2 * 10 and rep["adapt_first_epoch_loss"] is not None
    assert rep["train_generator_evals"] == 0  # no E trained here: the adaptation is counted apart
    with pytest.raises(ConfigError, match=r"inversion\.encoder\.adapt_batch' = 0"):
        load_config(overrides={"inversion.encoder.adapt_batch": 0})
