"""The content-addressed store (server/pool/store.py): atomic ingest, garbage, check, crash safety."""

from __future__ import annotations

import os
import threading
import time

import pytest

from client.export import ExportError, export, prepare, push
from plan_shared.bundle import build_bundle, generate_signing_key
from plan_shared.credentials import load_client_credentials
from server.pool.client import list_bundles, pull
from server.pool.service import PAUSE_ENV
from server.pool.store import Store, StoreError
from tests.pool_support import PoolServer, make_site_dir, run_cli


def _ingest(store: Store, signed) -> None:
    """What the service does for a verified bundle: stage, fsync, place, commit."""
    staging = store.new_staging()
    for im in {im.record.sha256: im for im in signed.manifest.images}.values():
        f = staging / "x"
        f.write_bytes((signed.outdir / im.record.file).read_bytes())
        store.place(f, im.record.sha256)
    if signed.manifest.report_sha256:
        (staging / "r").write_bytes(signed.report_path.read_bytes())
        store.place(staging / "r", signed.manifest.report_sha256)
    store.sync_dirs(set())
    staging.rmdir()


def test_commit_duplicate_list_catalog(tmp_path):
    out = tmp_path / "out"
    make_site_dir(out, "site-a", 6, seed=1)
    signed = build_bundle(out, generate_signing_key())
    store = Store(tmp_path / "store")
    with pytest.raises(StoreError, match="is not in the store"):
        store.commit(signed.manifest, signed.manifest_bytes, signed.signature, "01")
    assert not store.has_bundle(signed.bundle_id)
    _ingest(store, signed)
    res = store.commit(signed.manifest, signed.manifest_bytes, signed.signature, "01")
    assert (res.duplicate, res.n_images, res.n_new_files) == (False, 6, 6)
    assert store.commit(signed.manifest, signed.manifest_bytes, signed.signature, "01").duplicate
    [b] = store.list_bundles()
    assert b["n_images"] == 6 and b["per_class"] == {"normal": 3, "pneumonia": 3}
    cat = store.catalog()
    assert [c["sha256"] for c in cat] == [im.record.sha256 for im in signed.manifest.images]
    assert store.missing({c["sha256"]: c["size"] for c in cat}) == set()
    rep = store.check()
    assert rep.ok and rep.garbage == [] and (rep.n_bundles, rep.n_objects) == (1, 7)
    store.close()
    # WAL mode, and the index survives reopening.
    again = Store(tmp_path / "store")
    assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert again.has_bundle(signed.bundle_id)
    again.close()


def test_garbage_is_collected_and_leftovers_are_reusable(tmp_path):
    out = tmp_path / "out"
    make_site_dir(out, "site-a", 4, seed=2)
    signed = build_bundle(out, generate_signing_key())
    store = Store(tmp_path / "store")
    _ingest(store, signed)  # files placed, never committed: an interrupted upload
    (store.new_staging() / "half.part").write_bytes(b"abc")
    wanted = {im.record.sha256: im.size for im in signed.manifest.images}
    assert store.missing(wanted) == set()  # a retry need not resend verified leftovers
    rep = store.check()
    assert rep.ok and len(rep.garbage) == 5 + 1  # 4 images + report, 1 staging dir
    # A leftover whose content is wrong is not trusted.
    first = signed.manifest.images[0].record.sha256
    store.object_path(first).write_bytes(b"\x89PNG\r\n\x1a\nbroken" + b"\0" * (signed.manifest.images[0].size - 14))
    assert store.missing(wanted) == {first}
    assert store.collect_garbage() == (1, 5)
    rep = store.check()
    assert rep.ok and rep.garbage == [] and rep.n_objects == 0
    assert store.missing(wanted) == set(wanted)
    store.close()


def test_check_finds_problems(tmp_path):
    out = tmp_path / "out"
    make_site_dir(out, "site-a", 4, seed=3)
    signed = build_bundle(out, generate_signing_key())
    store = Store(tmp_path / "store")
    _ingest(store, signed)
    store.commit(signed.manifest, signed.manifest_bytes, signed.signature, "01")
    a, b = (im.record.sha256 for im in signed.manifest.images[:2])
    p = store.object_path(a)
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    store.object_path(b).unlink()
    store.close()
    rep = Store(tmp_path / "store", create=False, readonly=True).check()
    assert not rep.ok
    assert any(f"object {a}: content hashes to" in x for x in rep.problems)
    assert any(f"object {b}: file missing" in x for x in rep.problems)
    r = run_cli("server.pool", "check", "--store", str(tmp_path / "store"), "--no-progress")
    assert r.returncode == 1 and "PROBLEM: object" in r.stdout and "2 problems" in r.stdout
    r = run_cli("server.pool", "check", "--store", str(tmp_path / "nowhere"), "--no-progress")
    assert r.returncode == 2 and "no pool store here" in r.stderr


# ---------------------------------------------------------------- SIGKILL mid-ingest


@pytest.mark.slow
@pytest.mark.parametrize("point", ["received", "before_commit", "in_transaction", "after_commit"])
def test_sigkill_mid_ingest_then_restart(point, pki, tmp_path):
    out = tmp_path / "out"
    make_site_dir(out, "site-a", 40, seed=4)
    creds, signed = prepare(out, pki.site("site-a"))
    store_dir, marker = tmp_path / "store", tmp_path / "paused"
    srv = PoolServer(store_dir, pki.certs, tmp_path, env={PAUSE_ENV: f"{point}:{marker}:15"}).start()
    errors: list = []

    def client() -> None:
        try:
            push(signed, srv.address, creds, retries=0, progress=False)
        except ExportError as err:
            errors.append(err)

    t = threading.Thread(target=client)
    t.start()
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.02)
    srv.kill()  # SIGKILL while the server is paused at `point`
    t.join(30)
    assert len(errors) == 1 and "UNAVAILABLE" in str(errors[0])

    committed = point == "after_commit"
    # Before any restart: the index shows the whole bundle or nothing, and every indexed file is intact.
    st = Store(store_dir, create=False, readonly=True)
    try:
        rep = st.check()
        assert rep.ok, rep.problems
        assert st.has_bundle(signed.bundle_id) is committed
        assert rep.n_objects == (41 if committed else 0)
        if point == "received":
            assert rep.garbage  # placed but unindexed files of the interrupted upload
    finally:
        st.close()

    # Restart: garbage collected, store consistent, `pool check` clean.
    with PoolServer(store_dir, pki.certs, tmp_path) as again:
        r = run_cli("server.pool", "check", "--store", str(store_dir), "--no-progress")
        assert r.returncode == 0, r.stdout + r.stderr
        n_bundles = 1 if committed else 0
        assert f"{n_bundles} bundles, {41 if committed else 0} files, 0 problems, 0 garbage entries" in r.stdout
        listed = list_bundles(again.address, pki.reader)
        assert [b["n_images"] for b in listed] == ([40] if committed else [])
        res = export(out, again.address, pki.site("site-a"), progress=False)
        assert res.duplicate is committed and res.bundle_id == signed.bundle_id
        pulled = pull(again.address, pki.reader, tmp_path / "pulled", progress=False)
        assert (pulled.n_images, pulled.n_files) == (40, 40)
    r = run_cli("server.pool", "check", "--store", str(store_dir), "--no-progress")
    assert r.returncode == 0 and "1 bundles, 41 files, 0 problems, 0 garbage entries" in r.stdout
    assert not list((store_dir / "staging").iterdir())
    assert os.path.exists(store_dir / "index.sqlite")
    assert load_client_credentials(pki.reader).role == "reader"


def test_place_never_replaces_an_indexed_file(tmp_path):
    out = tmp_path / "out"
    make_site_dir(out, "site-a", 2, seed=5)
    signed = build_bundle(out, generate_signing_key())
    store = Store(tmp_path / "store")
    _ingest(store, signed)
    store.commit(signed.manifest, signed.manifest_bytes, signed.signature, "01")
    sha = signed.manifest.images[0].record.sha256
    inode = store.object_path(sha).stat().st_ino
    staged = store.new_staging() / "again"
    staged.write_bytes((out / signed.manifest.images[0].record.file).read_bytes())
    store.place(staged, sha)
    assert store.object_path(sha).stat().st_ino == inode and not staged.exists()
    store.close()
