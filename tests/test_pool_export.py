"""``plan-client export`` (client/export.py) against a real pool process: retries, resume, concurrency."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from client.export import ExportError, export, prepare
from server.pool.client import list_bundles, pull
from server.pool.store import Store
from tests.pool_support import ROOT, CuttingProxy, PoolServer, free_port, make_site_dir, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def server(pki, tmp_path):
    with PoolServer(tmp_path / "store", pki.certs, tmp_path) as srv:
        yield srv


def test_cut_upload_is_retried_and_resumed(pki, server, tmp_path):
    out = tmp_path / "out"
    make_site_dir(out, "site-a", 120, seed=1, size=96)  # ~9 KB noise PNGs, ~1.1 MB in all (4+ messages)
    _, signed = prepare(out, pki.site("site-a"))
    total = signed.manifest.total_bytes
    # Cut the first connection once the manifest went twice (Offer + Push) and ~70 % of the images.
    proxy = CuttingProxy(server.port, cut_after=2 * len(signed.manifest_bytes) + total * 7 // 10)
    try:
        logs: list[str] = []
        res = export(out, f"127.0.0.1:{proxy.port}", pki.site("site-a"), retries=3, backoff=0.2,
                     progress=False, log=logs.append)
    finally:
        proxy.close()
    assert proxy.cuts == 1 and proxy.connections >= 2
    assert res.attempts == 2 and not res.duplicate and res.n_images == 120
    # The retry sent only what the pool had not verified before the cut.
    assert res.n_sent <= 100 and 0 < res.bytes_sent < total, (res.n_sent, res.bytes_sent, total)
    assert "verified files kept for a retry" in server.log(), server.log()
    assert any("retry 1/3" in m for m in logs), logs
    st = Store(server.store, create=False, readonly=True)
    try:
        rep = st.check()
        assert rep.ok and rep.n_bundles == 1 and rep.n_objects == 121 and rep.garbage == []
    finally:
        st.close()
    pulled = pull(server.address, pki.reader, tmp_path / "pulled", progress=False)
    assert (pulled.n_images, pulled.n_files) == (120, 120)


def test_unreachable_pool_bounded_retries(pki, tmp_path):
    out = tmp_path / "out"
    make_site_dir(out, "site-a", 2, seed=2)
    port = free_port()  # nothing listens here
    logs: list[str] = []
    with pytest.raises(ExportError, match=f"pool at 127.0.0.1:{port} unavailable|UNAVAILABLE"):
        export(out, f"127.0.0.1:{port}", pki.site("site-a"), retries=2, backoff=0.05, progress=False, log=logs.append)
    assert [m.split("; ")[-1].split(" in ")[0] for m in logs] == ["retry 1/2", "retry 2/2"]


def test_three_sites_push_concurrently(pki, server, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = []
    for i, site in enumerate(("site-a", "site-b", "site-c")):
        out = tmp_path / site
        # Each site shares 5 identical images with the others: concurrent ingests of the same content.
        make_site_dir(out, site, 150, seed=10 + i)
        if i:
            recs0 = json.loads((tmp_path / "site-a" / "manifest.json").read_text())["images"]
            m = json.loads((out / "manifest.json").read_text())
            for k in range(5):
                shutil.copy(tmp_path / "site-a" / recs0[k]["file"], out / m["images"][k]["file"])
                m["images"][k]["sha256"] = recs0[k]["sha256"]
            (out / "manifest.json").write_text(json.dumps(m))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "client.export", str(out), "--pool", server.address,
             "--credentials", str(pki.site(site)), "--no-progress"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=120) for p in procs]
    for p, (so, se) in zip(procs, results):
        assert p.returncode == 0, se
        assert "stored bundle" in so and "150 images" in so
    bundles = list_bundles(server.address, pki.reader)
    assert sorted((b["site_id"], b["n_images"]) for b in bundles) == [("site-a", 150), ("site-b", 150), ("site-c", 150)]
    r = run_cli("server.pool", "check", "--store", str(server.store), "--no-progress")
    assert r.returncode == 0 and "3 bundles" in r.stdout and "0 problems, 0 garbage" in r.stdout
    # 450 image records, 440 distinct images (5 shared by all three sites).
    st = Store(server.store, create=False, readonly=True)
    try:
        assert len(st.catalog()) == 450
        assert len({c["sha256"] for c in st.catalog()}) == 440
    finally:
        st.close()
