"""Watch-points of the federated GAN: the per-round metrics line and the report's curve PNG."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from server.federation import watch_points
from server.report import training_curve_plot


def test_watch_points_from_the_aggregate():
    agg = {"d_real": 1.5, "d_fake": -0.5, "r1": 0.2, "loss_d": 1.1, "loss_g": 0.9, "num-examples": 30, "train-s": 3.0}
    w = watch_points(agg)
    assert w == {"d_real": 1.5, "d_fake": -0.5, "r1": 0.2, "loss_d": 1.1, "loss_g": 0.9, "d_gap": 2.0}
    assert watch_points({}) == {}


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
