"""Revocation holds (issue 12, deliverable 7): a stream opened before revocation cannot commit
after it, and a revoked site's bundles are hidden from readers, kept on disk and restorable.

Against a real ``python -m server.pool serve`` process over real mutual TLS.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from client.export import export, prepare
from plan_shared.credentials import cert_identity
from server.certs import revoke
from server.pool.client import list_bundles, pull
from tests.pool_support import PoolServer, make_site_dir, run_cli
from tests.security.attacks import channel, file_messages, header, held, leftovers, report_message, stub

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(pki, tmp_path_factory):
    work = tmp_path_factory.mktemp("server")
    with PoolServer(work / "store", pki.certs, work) as srv:
        yield srv
        log = srv.log()
    print(log)


def _placed(server) -> list[str]:
    return [g for g in leftovers(server.store) if g.startswith("unindexed file")]


def test_push_opened_before_revocation_does_not_commit(pki, server, tmp_path):
    out = tmp_path / "r"
    make_site_dir(out, "site-r", 4, seed=1)
    _, signed = prepare(out, pki.site("site-r"))
    serial = cert_identity((pki.site("site-r") / "client.crt").read_bytes()).serial[:16]
    release = threading.Event()
    with channel(server.address, pki.site("site-r")) as ch:
        call = stub(ch).Push.future(held(header(signed) + file_messages(signed) + [report_message(signed)], release),
                                    timeout=30)
        deadline = time.monotonic() + 10
        while len(_placed(server)) < 5 and time.monotonic() < deadline:  # 4 images + report placed
            time.sleep(0.1)
        assert len(_placed(server)) == 5
        assert revoke(pki.certs, "site-r")
        release.set()  # the stream ends: the server would commit now
        with pytest.raises(grpc.RpcError) as ei:
            call.result()
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ei.value.details() == f"certificate 'site-r' (serial {serial}) is revoked"
    assert signed.bundle_id not in {b["bundle_id"] for b in list_bundles(server.address, pki.reader)}
    assert leftovers(server.store) == []


def _pulled_sites(server, pki, out) -> set[str]:
    pull(server.address, pki.reader, out, progress=False)
    import json

    return {e["site_id"] for e in json.loads((out / "manifest.json").read_text())["images"]}


def test_revoked_sites_bundles_hidden_kept_and_restorable(pki, server, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_site_dir(a, "site-a", 4, seed=2)
    make_site_dir(b, "site-b", 4, seed=3)
    ra = export(a, server.address, pki.site("site-a"), retries=0, progress=False)
    rb = export(b, server.address, pki.site("site-b"), retries=0, progress=False)
    assert {"site-a", "site-b"} <= _pulled_sites(server, pki, tmp_path / "pull0")

    assert revoke(pki.certs, "site-b")
    listed = {x["bundle_id"] for x in list_bundles(server.address, pki.reader)}
    assert ra.bundle_id in listed and rb.bundle_id not in listed
    assert "site-b" not in _pulled_sites(server, pki, tmp_path / "pull1")
    _, signed_b = prepare(b, pki.site("site-b"))  # local: the site still holds its keys
    for im in signed_b.manifest.images:  # kept on disk
        sha = im.record.sha256
        assert (server.store / "objects" / sha[:2] / sha).is_file()

    r = run_cli("server.pool", "quarantine", "--store", str(server.store))
    assert r.returncode == 0, r.stderr
    assert "site-b: quarantined (site revoked" in r.stdout
    r = run_cli("server.pool", "restore", "--store", str(server.store), "--site", "site-b")
    assert r.returncode == 0, r.stderr
    assert "site-b: restored (1 bundle(s), 4 images visible again)" in r.stdout
    assert rb.bundle_id in {x["bundle_id"] for x in list_bundles(server.address, pki.reader)}
    assert "site-b" in _pulled_sites(server, pki, tmp_path / "pull2")

    r = run_cli("server.pool", "quarantine", "--store", str(server.store), "--site", "site-a", "--reason", "audit")
    assert r.returncode == 0, r.stderr
    assert "site-a: quarantined (audit)" in r.stdout
    assert ra.bundle_id not in {x["bundle_id"] for x in list_bundles(server.address, pki.reader)}
    r = run_cli("server.pool", "restore", "--store", str(server.store), "--site", "nobody")
    assert r.returncode == 1 and "error: site 'nobody' is not quarantined in" in r.stderr
