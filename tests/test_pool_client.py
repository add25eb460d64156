"""Reader side (server/pool/client.py): ``pool ls`` and incremental ``pool pull`` against a real pool."""

from __future__ import annotations

import hashlib
import json

import pytest

from client.export import export
from server.pool.client import PoolClientError, list_bundles, pull
from tests.pool_support import PoolServer, make_site_dir, run_cli

pytestmark = pytest.mark.slow


def test_ls_and_incremental_pull(pki, tmp_path):
    a1, b1, a2 = tmp_path / "a1", tmp_path / "b1", tmp_path / "a2"
    make_site_dir(a1, "site-a", 12, seed=1)
    make_site_dir(b1, "site-b", 8, seed=2)
    make_site_dir(a2, "site-a", 6, seed=3)
    dest = tmp_path / "pulled"
    with PoolServer(tmp_path / "store", pki.certs, tmp_path) as srv:
        r_a1 = export(a1, srv.address, pki.site("site-a"), progress=False)
        r_b1 = export(b1, srv.address, pki.site("site-b"), progress=False)

        first = pull(srv.address, pki.reader, dest, progress=False)
        assert (first.n_images, first.n_files, first.n_fetched) == (20, 20, 20)
        again = pull(srv.address, pki.reader, dest, progress=False)
        assert (again.n_fetched, again.bytes_fetched) == (0, 0)

        r_a2 = export(a2, srv.address, pki.site("site-a"), progress=False)
        # Through the CLI: only the 6 new images are fetched.
        r = run_cli("server.pool", "pull", "--pool", srv.address, "--credentials", str(pki.reader),
                    "--out", str(dest), "--no-progress")
        assert r.returncode == 0, r.stderr
        assert "pulled 6 new file(s)" in r.stdout and "now holds 26 file(s) for 26 image record(s)" in r.stdout

        # A damaged local file is re-fetched with --verify.
        victim = next(dest.glob("normal/*.png"))
        victim.write_bytes(b"\0" * victim.stat().st_size)
        assert pull(srv.address, pki.reader, dest, progress=False).n_fetched == 0  # name + size trusted
        assert pull(srv.address, pki.reader, dest, progress=False, verify=True).n_fetched == 1
        assert hashlib.sha256(victim.read_bytes()).hexdigest() == victim.stem

        r = run_cli("server.pool", "ls", "--pool", srv.address, "--credentials", str(pki.reader))
        assert r.returncode == 0, r.stderr
        assert "site-a: 2 bundle(s), 18 images" in r.stdout and "site-b: 1 bundle(s), 8 images" in r.stdout
        assert "total: 3 bundle(s), 26 images, 2 site(s)" in r.stdout
        assert [b["n_images"] for b in list_bundles(srv.address, pki.reader, site="site-b")] == [8]

        only_b = pull(srv.address, pki.reader, tmp_path / "only-b", site="site-b", progress=False)
        assert only_b.n_images == 8

        with pytest.raises(PoolClientError, match="these are site credentials; listing and pulling need a reader"):
            pull(srv.address, pki.site("site-a"), tmp_path / "x", progress=False)

    man = json.loads((dest / "manifest.json").read_text())
    assert man["n_images"] == 26 and man["n_files"] == 26
    assert {b["bundle_id"] for b in man["bundles"]} == {r_a1.bundle_id, r_b1.bundle_id, r_a2.bundle_id}
    src = {r["sha256"]: r for d in (a1, b1, a2) for r in json.loads((d / "manifest.json").read_text())["images"]}
    for e in man["images"]:
        f = dest / e["file"]
        assert f.is_file() and e["file"] == f"{e['class_name']}/{e['sha256']}.png"
        assert hashlib.sha256(f.read_bytes()).hexdigest() == e["sha256"]
        assert e["record"] == src[e["sha256"]]  # the privacy record, unchanged, with its thresholds
        assert e["method"] == e["record"]["method"] and e["label"] == e["record"]["label"]
        assert e["site_id"] in ("site-a", "site-b") and len(e["generator_sha256"]) == 64
    assert not (dest / ".partial").exists()
    assert sorted(p.name for p in dest.iterdir()) == ["DATASHEET.md", "manifest.json", "normal", "pneumonia"]


def test_pull_formats_read_back_as_data_sets(pki, tmp_path):
    """Class names travel source -> bundle -> pool -> pull; both formats read back through plan_shared.data,
    and a pulled npz feeds `plan-client synthesize --data` whose own output keeps the names."""
    import numpy as np
    import yaml
    from typer.testing import CliRunner

    from client.cli import app as client_app
    from plan_shared.config import DataConfig
    from plan_shared.data import load_dataset
    from plan_shared.manifest import read_site_manifest
    from tests.test_synthesize import TINY

    a, b = tmp_path / "a", tmp_path / "b"
    make_site_dir(a, "site-a", 40, seed=1)
    make_site_dir(b, "site-b", 20, seed=2)
    with PoolServer(tmp_path / "store", pki.certs, tmp_path) as srv:
        export(a, srv.address, pki.site("site-a"), progress=False)
        export(b, srv.address, pki.site("site-b"), progress=False)
        r = run_cli("server.pool", "pull", "--pool", srv.address, "--credentials", str(pki.reader),
                    "--out", str(tmp_path / "pooled"), "--no-progress", "--format", "npz")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "pooled"
    assert f"MedMNIST-format copy: {out / 'pool.npz'}" in r.stdout
    man = json.loads((out / "manifest.json").read_text())
    assert man["classes"] == [{"label": 0, "name": "normal", "n_images": 30},
                              {"label": 1, "name": "pneumonia", "n_images": 30}]

    with np.load(out / "pool.npz") as z:
        assert z["train_images"].shape == (60, 28, 28) and z["train_images"].dtype == np.uint8
        assert z["train_labels"].shape == (60, 1) and z["train_labels"].dtype == np.uint8
        assert z["val_images"].shape == (0, 28, 28) and z["test_labels"].shape == (0, 1)
        assert list(z["class_names"]) == ["normal", "pneumonia"]
        labels = z["train_labels"][:, 0]
        first = z["train_images"][0]
    assert labels.tolist() == [e["label"] for e in man["images"]]  # one row per manifest image, same order
    from PIL import Image
    assert np.array_equal(first, np.asarray(Image.open(out / man["images"][0]["file"])))

    for path in (out / "pool.npz", out):  # npz (medmnist source) and the folder (imagefolder source)
        source = "medmnist" if path.suffix == ".npz" else "imagefolder"
        ds = load_dataset(DataConfig(source=source, path=str(path), size=None, download=False), seed=0)
        assert ds.class_names == ["normal", "pneumonia"] and ds.size == 28 and ds.channels == 1
        got = np.concatenate([ds.train.labels, ds.val.labels, ds.test.labels])
        assert np.bincount(got).tolist() == np.bincount(labels).tolist() == [30, 30]

    # The datasheet names the counts per class and per site, the generators and the thresholds.
    sheet = (out / "DATASHEET.md").read_text()
    assert "**60 image record(s)**" in sheet and "| 0 | normal | 30 |" in sheet and "| 1 | pneumonia | 30 |" in sheet
    assert "| site-a | 1 | 40 | 20 | 20 |" in sheet and "| site-b | 1 | 20 | 10 | 10 |" in sheet
    assert man["bundles"][0]["generator_sha256"] in sheet and "| site-a | 0.5 | 0.5 | 1 |" in sheet
    assert "not for clinical decisions" in sheet.lower() and "pool.npz" in sheet

    # A new site synthesizes from the pulled npz; its images keep the pool's class names.
    cfg = dict(TINY, data={"size": 16, "download": False})
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(cfg))
    site_out = tmp_path / "site-out"
    res = CliRunner().invoke(client_app, ["synthesize", "--config", str(tmp_path / "site.yaml"), "--data",
                                          str(out / "pool.npz"), "--out", str(site_out), "--method", "plan"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    names = {r.class_name for r in read_site_manifest(site_out / "manifest.json").images}
    assert names and names <= {"normal", "pneumonia"}
    assert {p.name for p in (site_out / "images").iterdir()} == names
