"""`plan-client train-gan` end to end on a tiny real data file (MedMNIST format)."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from client.cli import app
from tests.test_gan import TINY


def _tiny_npz(path, n=40, size=28):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in (("train", n), ("val", 8), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (k, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(k) % 2).astype(np.uint8).reshape(-1, 1)
    np.savez(path, **arrays)
    return path


def _sets(extra=()):
    out = []
    for k, v in {**TINY, "data.size": 16, "gan.sample_every": 2, "gan.checkpoint_every": 2, "device": "cpu"}.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out + list(extra)


def test_train_gan_writes_checkpoint_grids_report_and_resumes(tmp_path):
    npz = _tiny_npz(tmp_path / "tiny.npz")
    out = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(app, ["train-gan", "--data", str(npz), "--out", str(out), "--steps", "4", *_sets()])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 4 and report["params"]["generator"] > 0
    assert (out / "checkpoint.pt").is_file() and (out / "samples" / "final.png").is_file()
    assert sorted(p.name for p in (out / "samples").glob("step-*.png")) == ["step-000002.png", "step-000004.png"]
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2

    res = runner.invoke(app, ["train-gan", "--data", str(npz), "--out", str(out), "--steps", "6", "--resume", *_sets()])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 6 and report["steps_this_run"] == 2


def test_train_gan_bad_config_names_key(tmp_path):
    res = CliRunner().invoke(app, ["train-gan", "--out", str(tmp_path), "--set", "gan.r1_gamma=-3"])
    assert res.exit_code == 2
    assert "gan.r1_gamma" in res.output


def test_train_gan_missing_data_file(tmp_path):
    res = CliRunner().invoke(app, ["train-gan", "--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "nope.npz" in str(res.exception) + res.output


def test_dry_run_prints_resolved_config(tmp_path):
    res = CliRunner().invoke(app, ["train-gan", "--dataset", "breastmnist", "--steps", "9", "--dry-run"])
    assert res.exit_code == 0
    assert "name: breastmnist" in res.output and "steps: 9" in res.output
