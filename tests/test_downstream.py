"""phi_down from a pulled pool folder (class folders + manifest)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from plan_shared.config import load_config
from server.downstream import load_pool, train_downstream


def _pool(tmp_path, n=24, size=16, dup=True):
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        label = i % 2
        arr = (rng.random((size, size)) * 80 + 120 * label).astype(np.uint8)
        data_path = tmp_path / "tmp.png"
        Image.fromarray(arr).save(data_path)
        sha = hashlib.sha256(data_path.read_bytes()).hexdigest()
        (tmp_path / str(label)).mkdir(exist_ok=True)
        data_path.rename(tmp_path / str(label) / f"{sha}.png")
        images.append({"file": f"{label}/{sha}.png", "sha256": sha, "class_name": str(label), "label": label,
                       "method": "plan", "site_id": f"site-{i % 3}", "bundle_id": "b", "record": {}})
    if dup:
        images.append(dict(images[0], bundle_id="b2"))
    (tmp_path / "manifest.json").write_text(json.dumps({"images": images}))
    return tmp_path


def test_load_pool_counts_each_file_once(tmp_path):
    pool = load_pool(_pool(tmp_path), num_classes=2, channels=1)
    assert pool.images.shape == (24, 1, 16, 16) and pool.images.dtype == np.uint8
    assert np.bincount(pool.labels).tolist() == [12, 12]
    assert set(pool.sites) == {"site-0", "site-1", "site-2"}


def test_load_pool_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pool pull"):
        load_pool(tmp_path, 2, 1)
    _pool(tmp_path)
    with pytest.raises(ValueError, match="label 1 outside"):
        load_pool(tmp_path, 1, 1)
    with pytest.raises(ValueError, match="channels"):
        load_pool(tmp_path, 2, 3)


def test_train_downstream_learns_an_easy_task(tmp_path):
    pool = load_pool(_pool(tmp_path, n=60), 2, 1)
    cfg = load_config(overrides={"downstream.epochs": 10, "downstream.width": 8, "downstream.batch_size": 16})
    model, info = train_downstream(cfg, pool, 2, 1, 16, progress=False)
    assert info["n_train"] + info["n_val"] == 60 and info["n_val"] > 0
    assert info["synthetic_val_acc"] >= 0.8
    assert info["arch"] == {"num_classes": 2, "channels": 1, "size": 16}
