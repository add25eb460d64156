"""The shipped presets validate; quality builds G and D at 64 px and trains a step on CPU."""

from __future__ import annotations

import pytest
import torch

from plan_shared.config import load_config
from server.demo import demo_preset_path, preset_path


@pytest.mark.parametrize("name", ["demo", "quality"])
def test_presets_validate(name):
    cfg = load_config(preset_path(name))
    assert cfg.federation.rounds >= 1


def test_demo_preset_is_the_default_preset():
    assert preset_path("demo") == demo_preset_path()


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="'fast'.*demo.*quality"):
        preset_path("fast")


def test_quality_preset_trains_a_step_at_64px_on_cpu():
    from plan_shared.gan import GanTrainer

    cfg = load_config(preset_path("quality"), {"gan.batch_size": 4, "device": "cpu"})
    assert cfg.data.size == 64
    fed, demo = cfg.federation, load_config(demo_preset_path()).federation
    assert fed.rounds * fed.local_steps > demo.rounds * demo.local_steps  # longer training than the demo
    tr = GanTrainer(cfg, channels=1, size=cfg.data.size)
    assert tr.G.synthesis.native == 64 and tr.D.native == 64
    assert not tr.use_compile(fed.local_steps)  # CPU: stays eager
    images = torch.rand(8, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    m = tr.train_steps(images, 1)
    assert all(torch.isfinite(torch.tensor(m[k])) for k in ("loss_g", "loss_d", "r1"))
    out = tr.G_ema.render(tr.G_ema.sample_w(2))
    assert out.shape == (2, 1, 64, 64)


def test_cli_preset_errors_name_the_fault():
    from typer.testing import CliRunner

    from server.cli import app

    r = CliRunner().invoke(app, ["demo", "--preset", "bogus"])
    assert r.exit_code == 2 and "unknown preset 'bogus'" in r.output
    r = CliRunner().invoke(app, ["simulate", "--preset", "quality", "--config", "x.yaml"])
    assert r.exit_code == 2 and "not both" in r.output
