"""Reader side (server/pool/client.py): ``pool ls`` and incremental ``pool pull`` against a real pool."""

from __future__ import annotations

import hashlib
import json

import pytest

from client.export import export
from server.pool.client import PoolClientError, list_bundles, pull
from tests.pool_support import Pki, PoolServer, make_site_dir, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


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
        assert f"pulled 6 new file(s)" in r.stdout and "now holds 26 file(s) for 26 image record(s)" in r.stdout

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
