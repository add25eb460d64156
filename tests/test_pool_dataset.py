"""plan_shared.pool_dataset: a pulled pool (real pool process, real pull) as a torch Dataset, and its datasheet."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from client.export import export
from plan_shared.pool_dataset import PoolDatasetError, PooledDataset, datasheet_text, label_names
from server.pool.client import pull
from tests.pool_support import THRESHOLDS, Pki, PoolServer, make_site_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pulled(tmp_path_factory):
    """Two sites' bundles pulled from a real pool; yields (folder, {bundle_id: site dir manifest})."""
    root = tmp_path_factory.mktemp("pooled")
    pki = Pki(root / "pki")
    a, b = root / "a", root / "b"
    ma = make_site_dir(a, "site-a", 8, seed=1)
    mb = make_site_dir(b, "site-b", 6, seed=2, classes=("normal", "pneumonia", "covid"))
    with PoolServer(root / "store", pki.certs, root) as srv:
        ra = export(a, srv.address, pki.site("site-a"), progress=False)
        rb = export(b, srv.address, pki.site("site-b"), progress=False)
        pull(srv.address, pki.reader, root / "out", progress=False)
    return root / "out", {ra.bundle_id: ma, rb.bundle_id: mb}


def test_items_labels_and_provenance(pulled):
    folder, sources = pulled
    ds = PooledDataset(folder)
    assert len(ds) == 14 and ds.classes == ["normal", "pneumonia", "covid"]
    assert sorted(ds.targets) == sorted([i % 2 for i in range(8)] + [i % 3 for i in range(6)])
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    x, y = next(iter(loader))
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32 and -1.0 <= x.min() and x.max() <= 1.0
    assert y.tolist() == ds.targets[:5]
    by_sha = {r["sha256"]: (bid, m, r) for bid, m in sources.items() for r in m["images"]}
    for i, rec in enumerate(ds.records):
        bid, m, src = by_sha[rec.sha256]
        p = ds.provenance(i)
        assert p["site_id"] == m["site_id"] and p["bundle_id"] == bid
        assert p["generator_sha256"] == m["generator_sha256"] and p["generator_round"] is None
        assert p["method"] == src["method"] and p["privacy"] == src  # the signed record, unchanged
        assert rec.record.thresholds.tau_id == THRESHOLDS["tau_id"] and rec.class_name == src["class_name"]
    # the pixels are the pulled file's
    from PIL import Image
    arr = np.array(Image.open(folder / ds.records[0].file))
    assert torch.equal(ds[0][0][0], torch.from_numpy(arr).float().div(127.5).sub(1.0))


def test_transform_gets_the_pil_image(pulled):
    ds = PooledDataset(pulled[0], transform=lambda img: img.size)
    assert ds[3] == ((28, 28), ds.targets[3])


def test_missing_tampered_and_foreign_folders_are_named(pulled, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(pulled[0], copy)
    ds = PooledDataset(copy)
    victim = copy / ds.records[2].file
    victim.write_bytes(b"\0" * victim.stat().st_size)
    PooledDataset(copy)  # name and presence only
    with pytest.raises(PoolDatasetError, match="does not match its sha256") as e:
        PooledDataset(copy, verify=True)
    assert str(victim) in str(e.value)
    victim.unlink()
    with pytest.raises(PoolDatasetError, match="missing") as e:
        PooledDataset(copy)
    assert str(victim) in str(e.value)

    doc = json.loads((copy / "manifest.json").read_text())
    doc["images"][0]["file"] = "../../etc/passwd"
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(PoolDatasetError, match=r"images\[0\]: key 'file'"):
        PooledDataset(copy)
    doc["format"] = "something-else"
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(PoolDatasetError, match="key 'format'"):
        PooledDataset(copy)
    with pytest.raises(PoolDatasetError, match="not found"):
        PooledDataset(tmp_path)


def test_datasheet_counts_and_label_names(pulled):
    folder, _ = pulled
    sheet = (folder / "DATASHEET.md").read_text()
    assert sheet == datasheet_text(json.loads((folder / "manifest.json").read_text()))  # written from the manifest
    assert "**14 image record(s)**" in sheet and "from 2 site(s) and 2 bundle(s)" in sheet
    assert "| 0 | normal | 6 |" in sheet and "| 1 | pneumonia | 6 |" in sheet and "| 2 | covid | 2 |" in sheet
    assert "| site-a | 1 | 8 | 4 | 4 | 0 |" in sheet and "| site-b | 1 | 6 | 2 | 2 | 2 |" in sheet
    # older bundles without names ("0") beside named ones: the real name wins; absent labels get numbers
    doc = {"images": [{"label": 0, "class_name": "0"}] * 3 + [{"label": 0, "class_name": "normal"},
                                                               {"label": 2, "class_name": "2"}]}
    assert label_names(doc) == ["normal", "1", "2"]
