"""The pool service in a real process over real mutual TLS: what it stores and what it refuses.

Each refusal case checks the exact reason the client gets, and that nothing of the
refused bundle is visible or left on disk.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from client.export import ExportError, export, prepare, push
from plan_shared.bundle import BundleError, SignedBundle, build_bundle, generate_signing_key, parse_bundle_manifest, with_bundle_id
from plan_shared.credentials import diagnose_tls, load_client_credentials
from plan_shared.pool_proto import pool_pb2, pool_pb2_grpc
from server.certs import revoke
from server.pool.client import list_bundles
from server.pool.store import Store
from tests.pool_support import PoolServer, make_site_dir, rewrite_manifest, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(pki, tmp_path_factory):
    work = tmp_path_factory.mktemp("server")
    with PoolServer(work / "store", pki.certs, work, extra=("--max-image-kb", "32")) as srv:
        yield srv
        log = srv.log()
    print(log)


def refusal(signed: SignedBundle, creds_dir: Path, pool: str) -> str:
    with pytest.raises(ExportError) as ei:
        push(signed, pool, load_client_credentials(creds_dir), retries=0, progress=False)
    return str(ei.value)


def stored_ids(pki, server) -> set[str]:
    return {b["bundle_id"] for b in list_bundles(server.address, pki.reader)}


def assert_nothing_left(server, bundle_id, pki):
    assert bundle_id not in stored_ids(pki, server)
    st = Store(server.store, create=False, readonly=True)
    try:
        rep = st.check()
    finally:
        st.close()
    assert rep.ok, rep.problems
    assert rep.garbage == [], rep.garbage


def test_push_then_duplicate(pki, server, tmp_path):
    out = tmp_path / "a"
    make_site_dir(out, "site-a", 20, seed=1)
    res = export(out, server.address, pki.site("site-a"), progress=False)
    assert not res.duplicate and res.n_images == 20 and res.n_sent == 21  # 20 images + report.json
    again = export(out, server.address, pki.site("site-a"), progress=False)
    assert again.duplicate and again.bundle_id == res.bundle_id and again.n_sent == 0
    # A push that skips the Offer is also recognised as a duplicate by the server.
    creds, signed = prepare(out, pki.site("site-a"))
    with grpc.secure_channel(server.address, grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)) as ch:
        reply = pool_pb2_grpc.PoolStub(ch).Push(iter([pool_pb2.PushRequest(manifest_part=signed.manifest_bytes),
                                                      pool_pb2.PushRequest(signature=signed.signature)]))
    assert reply.duplicate
    bundles = [b for b in list_bundles(server.address, pki.reader) if b["bundle_id"] == res.bundle_id]
    assert len(bundles) == 1 and bundles[0]["n_images"] == 20
    # The CLI says so too.
    r = run_cli("client.export", str(out), "--pool", server.address, "--credentials", str(pki.site("site-a")),
                "--no-progress")
    assert r.returncode == 0 and f"bundle {res.bundle_id} already in the pool (duplicate, 20 images)" in r.stdout


def test_identical_images_stored_once(pki, server, tmp_path):
    first, second = tmp_path / "b1", tmp_path / "b2"
    make_site_dir(first, "site-b", 10, seed=2)
    records = json.loads((first / "manifest.json").read_text())["images"]
    shared = {i: (first / records[i]["file"]).read_bytes() for i in range(4)}
    make_site_dir(second, "site-b", 10, seed=3, reuse=shared)
    r1 = export(first, server.address, pki.site("site-b"), progress=False)
    r2 = export(second, server.address, pki.site("site-b"), progress=False)
    assert r1.bundle_id != r2.bundle_id and not r2.duplicate
    # The 4 shared images and the identical report.json are not sent again.
    assert r2.n_sent == 10 - 4
    st = Store(server.store, create=False, readonly=True)
    try:
        shas = [r["sha256"] for r in st.catalog("site-b") if r["bundle_id"] in (r1.bundle_id, r2.bundle_id)]
        on_disk = {p.name for p in (server.store / "objects").rglob("*") if p.is_file()}
    finally:
        st.close()
    assert len(shas) == 20 and len(set(shas)) == 16 and set(shas) <= on_disk


def test_tampered_image(pki, server, tmp_path):
    out = tmp_path / "t"
    make_site_dir(out, "site-a", 8, seed=10)
    creds, signed = prepare(out, pki.site("site-a"))
    victim = signed.image_path(5)
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF
    victim.write_bytes(bytes(data))
    msg = refusal(signed, pki.site("site-a"), server.address)
    rid = signed.manifest.images[5].record.id
    assert msg.startswith(f"pool refused the bundle: images[5] (id '{rid}'): sha256 mismatch (received ")
    assert msg.endswith("…): the file was altered after signing")
    assert_nothing_left(server, signed.bundle_id, pki)


def test_forged_signature(pki, server, tmp_path):
    out = tmp_path / "f"
    make_site_dir(out, "site-a", 4, seed=11)
    _, signed = prepare(out, pki.site("site-a"))
    forged = replace(signed, signature=generate_signing_key().sign(signed.manifest_bytes))
    msg = refusal(forged, pki.site("site-a"), server.address)
    assert msg == "pool refused the bundle: signature does not verify with the registered key of site 'site-a'"
    # A bundle signed with a key that is not the registered one is refused before the signature check.
    own = build_bundle(out, generate_signing_key(), site_id="site-a")
    msg = refusal(own, pki.site("site-a"), server.address)
    assert msg.startswith("pool refused the bundle: bundle names signing key ")
    assert ", the registered key of site 'site-a' is " in msg
    assert_nothing_left(server, signed.bundle_id, pki)


def test_site_a_pushes_site_b_bundle(pki, server, tmp_path):
    out = tmp_path / "ab"
    make_site_dir(out, "site-b", 4, seed=12)
    _, signed = prepare(out, pki.site("site-b"))  # a genuine site-b bundle, signed by site-b
    msg = refusal(signed, pki.site("site-a"), server.address)
    assert msg == "pool refused the bundle: certificate identity 'site-a' may not push a bundle of site 'site-b'"
    assert_nothing_left(server, signed.bundle_id, pki)


def test_reader_pushes_and_site_reads(pki, server, tmp_path):
    out = tmp_path / "r"
    make_site_dir(out, "site-a", 3, seed=13)
    _, signed = prepare(out, pki.site("site-a"))
    serial = load_client_credentials(pki.reader)
    from plan_shared.credentials import cert_identity

    s = cert_identity(serial.cert_pem).serial[:16]
    msg = refusal(signed, pki.reader, server.address)
    assert msg == f"pool refused the bundle: certificate 'alice' (serial {s}) has role 'reader'; pushing a bundle needs role 'site'"
    assert_nothing_left(server, signed.bundle_id, pki)
    # The client refuses before connecting, too.
    r = run_cli("client.export", str(out), "--pool", server.address, "--credentials", str(pki.reader), "--no-progress")
    assert r.returncode == 1 and "these are reader credentials; only a site can export" in r.stderr
    # A site may not list or pull.
    creds = load_client_credentials(pki.site("site-a"))
    with grpc.secure_channel(server.address, grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            pool_pb2_grpc.PoolStub(ch).List(pool_pb2.ListRequest(), timeout=10)
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ei.value.details().endswith("has role 'site'; listing the pool needs role 'reader'")


def test_no_client_certificate(pki, server):
    ca = (pki.certs / "ca.crt").read_bytes()
    with grpc.secure_channel(server.address, grpc.ssl_channel_credentials(root_certificates=ca)) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            pool_pb2_grpc.PoolStub(ch).List(pool_pb2.ListRequest(), timeout=10)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    msg = diagnose_tls(server.address, ca)
    assert msg == (f"the pool at {server.address} refused a connection without a client certificate in the TLS "
                   "handshake: it accepts only certificates issued by its own CA (`plan-server certs issue`)")


def test_certificate_from_another_ca(pki, server, tmp_path):
    out = tmp_path / "o"
    make_site_dir(out, "site-a", 3, seed=14)
    # The foreign site's folder as issued: it does not even trust the pool's server certificate.
    r = run_cli("client.export", str(out), "--pool", server.address, "--credentials", str(pki.foreign_site_a),
                "--no-progress", "--retries", "0")
    assert r.returncode == 1
    assert (f"error: the pool at {server.address} presented a certificate that this client's ca.crt does not "
            "accept (unable to get local issuer certificate)") in r.stderr
    # The foreign certificate with the pool's CA as trust root: the pool refuses the client certificate.
    mixed = tmp_path / "mixed"
    shutil.copytree(pki.foreign_site_a, mixed)
    shutil.copy(pki.certs / "ca.crt", mixed / "ca.crt")
    r = run_cli("client.export", str(out), "--pool", server.address, "--credentials", str(mixed),
                "--no-progress", "--retries", "0")
    assert r.returncode == 1
    assert (f"error: the pool at {server.address} refused the client certificate {mixed / 'client.crt'} in the TLS "
            "handshake: it accepts only certificates issued by its own CA (`plan-server certs issue`)") in r.stderr
    assert "stored bundle" not in r.stdout


def test_revoked_certificate(pki, server, tmp_path):
    first, second = tmp_path / "v1", tmp_path / "v2"
    make_site_dir(first, "site-r", 3, seed=15)
    make_site_dir(second, "site-r", 3, seed=16)
    assert not export(first, server.address, pki.site("site-r"), progress=False).duplicate
    revoke(pki.certs, "site-r")  # the running server re-reads the registry on the next call
    _, signed = prepare(second, pki.site("site-r"))
    from plan_shared.credentials import cert_identity

    serial = cert_identity((pki.site("site-r") / "client.crt").read_bytes()).serial[:16]
    r = run_cli("client.export", str(second), "--pool", server.address, "--credentials", str(pki.site("site-r")),
                "--no-progress")
    assert r.returncode == 1
    assert f"error: pool refused the bundle: certificate 'site-r' (serial {serial}) is revoked" in r.stderr
    assert_nothing_left(server, signed.bundle_id, pki)


def _resign(out: Path, creds_dir: Path, edit) -> SignedBundle:
    """A bundle whose signed manifest was edited by the site itself (bypassing the client's checks)."""
    creds, signed = prepare(out, creds_dir)
    raw = json.loads(signed.manifest_bytes)
    edit(raw)
    data = with_bundle_id(raw)
    from plan_shared.bundle import load_signing_key

    sig = load_signing_key(creds.signing_key_path).sign(data)
    try:
        parsed = parse_bundle_manifest(data)
    except BundleError:  # schema-invalid on purpose: the client needs only file paths and sizes
        parsed = signed.manifest
    return SignedBundle(out, data, sig, parsed)


def test_record_failing_its_own_thresholds(pki, server, tmp_path):
    out = tmp_path / "th"
    make_site_dir(out, "site-c", 6, seed=17)
    # The client refuses to sign it ...
    rewrite_manifest(out, lambda m: m["images"][3].update(dcr=0.5))
    r = run_cli("client.export", str(out), "--pool", server.address, "--credentials", str(pki.site("site-c")),
                "--no-progress")
    assert r.returncode == 1 and "fails its own thresholds: dcr 0.5 <= delta 1" in r.stderr
    # ... and the pool refuses it when a site signs it anyway.
    rewrite_manifest(out, lambda m: m["images"][3].update(dcr=2.5))
    signed = _resign(out, pki.site("site-c"), lambda raw: raw["images"][3].update(dcr=0.5))
    rid = signed.manifest.images[3].record.id
    msg = refusal(signed, pki.site("site-c"), server.address)
    assert msg == f"pool refused the bundle: images[3] (id '{rid}') fails its own privacy thresholds: dcr 0.5 <= delta 1"
    assert_nothing_left(server, signed.bundle_id, pki)


def test_record_without_thresholds_and_limits(pki, server, tmp_path):
    out = tmp_path / "nt"
    make_site_dir(out, "site-c", 3, seed=18)
    signed = _resign(out, pki.site("site-c"), lambda raw: raw["images"][1].pop("thresholds"))
    rid = json.loads(signed.manifest_bytes)["images"][1]["id"]
    msg = refusal(signed, pki.site("site-c"), server.address)
    assert msg == f"pool refused the bundle: bundle manifest: images[1] (id '{rid}'): missing key 'thresholds'"
    # The server runs with --max-image-kb 32: a 200x200 noise PNG is larger.
    big = tmp_path / "big"
    make_site_dir(big, "site-c", 2, seed=19, size=200)
    _, signed = prepare(big, pki.site("site-c"))
    size = signed.manifest.images[0].size
    msg = refusal(signed, pki.site("site-c"), server.address)
    rid = signed.manifest.images[0].record.id
    assert msg == f"pool refused the bundle: images[0] (id '{rid}') is {size} bytes, limit 32768"
    assert_nothing_left(server, signed.bundle_id, pki)


def test_replaced_certificate(pki, server, tmp_path):
    from server.certs import issue

    old = tmp_path / "old-creds"
    issue(pki.certs, "site-x", "site", old)
    issue(pki.certs, "site-x", "site", pki.site("site-x"), force=True)  # re-keyed and re-enrolled: the old ones stop working
    out = tmp_path / "x"
    make_site_dir(out, "site-x", 3, seed=20)
    r = run_cli("client.export", str(out), "--pool", server.address, "--credentials", str(old), "--no-progress")
    from plan_shared.credentials import cert_identity

    serial = cert_identity((old / "client.crt").read_bytes()).serial[:16]
    assert r.returncode == 1
    assert (f"error: pool refused the bundle: certificate 'site-x' (serial {serial}) has been replaced by a newer "
            "certificate") in r.stderr
    assert not export(out, server.address, pki.site("site-x"), progress=False).duplicate
