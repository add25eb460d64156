"""Watch-points of the federated GAN: the per-round metrics line and the report's curve PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from plan_shared.config import PlanConfig, config_from_dict
from plan_shared.gan import GanTrainer, RandomFeatureNet, watch_fd, watch_real_subset
from plan_shared.metrics import frechet_distance
from plan_shared.protocol import TrainMetrics
from server.federation import watch_points
from server.report import training_curve_plot

ROOT = Path(__file__).resolve().parents[1]


def test_watch_points_from_the_aggregate():
    agg = {"d_real": 1.5, "d_fake": -0.5, "r1": 0.2, "loss_d": 1.1, "loss_g": 0.9, "num-examples": 30, "train-s": 3.0}
    w = watch_points(agg)
    assert w == {"d_real": 1.5, "d_fake": -0.5, "r1": 0.2, "loss_d": 1.1, "loss_g": 0.9, "d_gap": 2.0}
    assert watch_points({}) == {}
    assert watch_points({**agg, "fd": 12.5})["fd"] == 12.5  # the sites' FD watch-point, weighted like the rest


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_curve_png_from_metrics_jsonl(tmp_path):
    rows = [{"round": r, "watch": watch_points({"d_real": 0.1 * r, "d_fake": -0.1 * r, "r1": 0.1, "loss_d": 1.2,
                                                  "loss_g": 0.8})} for r in (1, 2, 3)]
    png = training_curve_plot(_write(tmp_path / "metrics.jsonl", rows), tmp_path / "fig" / "gan-rounds.png")
    assert png == tmp_path / "fig" / "gan-rounds.png"
    with Image.open(png) as im:
        assert im.size[0] > 300 and im.size[1] > 300


def test_curve_prefers_fd_and_reads_older_lines(tmp_path):
    # lines written before "watch" existed carry the same keys under "aggregate"
    rows = [{"round": 1, "aggregate": {"d_real": 0.5, "d_fake": 0.1, "loss_d": 1.3, "loss_g": 0.7}},
            {"round": 2, "watch": {"fd": 40.0, "loss_d": 1.2, "loss_g": 0.8}}]
    assert training_curve_plot(_write(tmp_path / "m.jsonl", rows), tmp_path / "a.png").is_file()


def test_no_rounds_no_figure_and_bad_line_named(tmp_path):
    assert training_curve_plot(tmp_path / "missing.jsonl", tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"round": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2"):
        training_curve_plot(bad, tmp_path / "y.png")


# ------------------------------------------------------------------ the FD watch-point (gan.watch_fd_samples)
def _real_images(n: int = 512) -> torch.Tensor:
    """Real chest X-rays at 28 px from $PLAN_DATA_DIR when present, else smooth random blobs."""
    npz = Path(os.environ.get("PLAN_DATA_DIR", "")) / "pneumoniamnist.npz"
    if npz.is_file():
        x = torch.from_numpy(np.load(npz)["train_images"][:n].astype(np.float32) / 127.5 - 1).unsqueeze(1)
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.nn.functional.interpolate(torch.rand(n, 1, 7, 7, generator=g), size=28, mode="bilinear") * 2 - 1
    return x


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    x = _real_images()
    net = RandomFeatureNet(1)
    a, b = x[:256], x[256:512]
    fa = net.embed(a)
    assert fa.shape == (256, 192)
    assert abs(frechet_distance(fa, fa)) < 1e-3 * frechet_distance(fa, net.embed((b + 0.5).clamp(-1, 1)))
    same = frechet_distance(fa, net.embed(b))  # another sample of the same images: only the small-sample bias
    brighter = frechet_distance(fa, net.embed((b + 0.3).clamp(-1, 1)))
    moved = frechet_distance(fa, net.embed(torch.roll(b, shifts=(6, 6), dims=(2, 3))))
    assert brighter > 3 * same and moved > 1.5 * same, (same, brighter, moved)
    assert frechet_distance(fa, net.embed((b + 0.6).clamp(-1, 1))) > brighter  # further shifted, further away


_FEATURES = """
import json, sys, torch
from plan_shared.gan import RandomFeatureNet
torch.manual_seed(int(sys.argv[1]))  # another global RNG state in each process: it must play no part
x = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32).sin()
print(json.dumps(RandomFeatureNet(3)(x).tolist()))
"""


def test_feature_net_is_the_same_in_two_processes():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run([sys.executable, "-c", _FEATURES, str(seed)], env=env, capture_output=True, text=True, timeout=120,
                           check=True).stdout.strip() for seed in (1, 2)]
    assert runs[0] == runs[1], "the feature net differs between two processes"  # bit for bit
    f = torch.tensor(json.loads(runs[0]))
    assert f.shape == (2, 192) and f.abs().sum() > 0
    x = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32).sin()
    torch.testing.assert_close(RandomFeatureNet(3)(x), f, rtol=1e-5, atol=1e-6)  # this process (any thread count)
    assert not torch.equal(RandomFeatureNet(3, seed=1).w0, RandomFeatureNet(3).w0)  # the seed is what fixes it


def test_watch_fd_repeats_and_leaves_rng_and_generator_alone():
    cfg = PlanConfig()
    tr = GanTrainer(config_from_dict({"generator": {"z_dim": 16, "w_dim": 16, "base_channels": 16, "min_channels": 8}}),
                    1, 16)
    images = torch.rand(40, 1, 16, 16) * 2 - 1
    real = watch_real_subset(images, 32, cfg.seed)
    assert real.shape == (32, 1, 16, 16) and torch.equal(real, watch_real_subset(images, 32, cfg.seed))  # every round
    assert torch.equal(watch_real_subset(images, 100, cfg.seed), images)  # fewer than asked: all of them
    rng, w_avg = torch.get_rng_state(), tr.G_ema.w_avg.clone()
    v1 = watch_fd(tr.G_ema, real, 48, seed=7)
    v2 = watch_fd(tr.G_ema, real, 48, seed=7, batch=20)  # batched rendering: the same samples
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(tr.G_ema.w_avg, w_avg)
    assert v1 == pytest.approx(v2, rel=1e-4) and v1 > 0
    assert watch_fd(tr.G_ema, real, 48, seed=8) != v1  # other z, other value
    with pytest.raises(ValueError, match="at least 2"):
        watch_fd(tr.G_ema, real, 1, seed=7)


def test_watch_fd_samples_config_and_protocol():
    assert PlanConfig().gan.watch_fd_samples == 256
    assert config_from_dict({"gan": {"watch_fd_samples": 0}}).gan.watch_fd_samples == 0
    with pytest.raises(ValueError, match="watch_fd_samples"):
        config_from_dict({"gan": {"watch_fd_samples": 1}})
    with pytest.raises(ValueError, match="watch_fd_samples"):
        config_from_dict({"gan": {"watch_fd_samples": -3}})
    from flwr.app import MetricRecord

    m = TrainMetrics(10, 0.5, 1.0, 0.1, 0.2, -0.2, 40, 5, 1.0, 1.2, fd=33.0, fd_s=0.4)
    assert m.as_dict()["fd"] == 33.0 and m.as_dict()["fd-s"] == 0.4
    assert TrainMetrics.from_metric_record(MetricRecord(m.as_dict()), "t") == m
    off = TrainMetrics(10, 0.5, 1.0, 0.1, 0.2, -0.2, 40, 5, 1.0, 1.2)
    assert not {"fd", "fd-s"} & off.as_dict().keys() and TrainMetrics.from_metric_record(MetricRecord(off.as_dict()), "t").fd is None
