"""Key custody against a real pool process: whoever holds the coordinator's CERTS folder cannot push as a site.

Attack (issue 12): ``certs issue`` used to create every site's TLS, signing and node
private keys on the coordinator and leave them in ``CERTS/sites/NAME/``; whoever held
that folder could push as any hospital. Now each site makes its keys in its own
folder (``plan-client keys init``), the coordinator enrols only public keys
(``plan-server certs enroll``), and the pool accepts only the site's own key.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from client.export import ExportError, export, push
from plan_shared.bundle import build_bundle, generate_signing_key, sign_manifest
from plan_shared.credentials import ClientCredentials, load_client_credentials
from server.certs import init_ca
from server.pool.client import list_bundles
from tests.pool_support import PoolServer, make_site_dir, run_cli

pytestmark = pytest.mark.slow
SITES = ("hospital-a", "hospital-b")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """A CA folder and two hospitals enrolled through the CLI, each with its keys in its own folder."""
    root = tmp_path_factory.mktemp("custody")
    certs = root / "coordinator" / "certs"
    init_ca(certs)
    sites = {}
    for name in SITES:
        d = root / name / "keys"
        for args in (("client.cli", "keys", "init", "--dir", str(d), "--name", name),
                     ("server.cli", "certs", "enroll", str(d / "enrolment.json"), "--dir", str(certs), "--name", name,
                      "--out", str(root / f"{name}.response.json")),
                     ("client.cli", "keys", "install", str(root / f"{name}.response.json"), "--dir", str(d))):
            r = run_cli(*args)
            assert r.returncode == 0, (args, r.stdout, r.stderr)
        sites[name] = d
    from server.certs import issue

    reader = issue(certs, "auditor", "reader", root / "auditor")
    with PoolServer(root / "store", certs, root) as srv:
        yield certs, sites, reader, srv


def _private_files(root: Path) -> list[str]:
    found = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if b"PRIVATE KEY" in data or b"OPENSSH PRIVATE" in data:
                found.append(str(p.relative_to(root)))
    return found


def test_an_enrolled_site_pushes_with_its_own_keys(fed, tmp_path):
    certs, sites, reader, srv = fed
    out = tmp_path / "a"
    make_site_dir(out, "hospital-a", 4, seed=1)
    res = export(out, srv.address, sites["hospital-a"], progress=False)
    assert not res.duplicate and res.n_images == 4
    assert res.bundle_id in {b["bundle_id"] for b in list_bundles(srv.address, reader)}


def test_the_ca_folder_holds_no_site_private_key(fed):
    certs, sites, _, _ = fed
    assert _private_files(certs) == ["ca.key", "server.key"]  # the coordinator's own two, nothing else
    site_secrets = [(d / f).read_bytes() for d in sites.values() for f in ("client.key", "signing.key", "node_key")]
    for p in certs.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert not any(s in data or s.strip().splitlines()[1] in data for s in site_secrets), p
    for d in sites.values():
        assert _private_files(d) == ["client.key", "node_key", "signing.key"]


def _coordinator_cert_for(certs: Path, name: str) -> tuple[bytes, bytes]:
    """What the CERTS holder can mint: a fresh TLS key and a CA-signed certificate for ``name``."""
    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "PLAN federation"),
                                     x509.NameAttribute(x509.NameOID.ORGANIZATIONAL_UNIT_NAME, "site"),
                                     x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def test_a_bundle_signed_with_a_coordinator_generated_key_is_refused(fed, tmp_path):
    certs, sites, reader, srv = fed
    out = tmp_path / "forged"
    make_site_dir(out, "hospital-b", 3, seed=2)
    site_creds = load_client_credentials(sites["hospital-b"])
    coordinator_key = generate_signing_key()  # all the CERTS holder can make: not the site's key
    before = {b["bundle_id"] for b in list_bundles(srv.address, reader)}

    # 1. its own signing key, over the site's real TLS channel: the pool knows the site's registered key
    signed = build_bundle(out, coordinator_key, site_id="hospital-b")
    with pytest.raises(ExportError, match=r"pool refused the bundle: bundle names signing key [0-9a-f]{16}…, "
                                          r"the registered key of site 'hospital-b' is"):
        push(signed, srv.address, site_creds, retries=0, progress=False)
    # 2. a certificate the CA holder mints for the site: not the enrolled serial
    cert_pem, key_pem = _coordinator_cert_for(certs, "hospital-b")
    minted = ClientCredentials(tmp_path, "hospital-b", "site", site_creds.ca_pem, cert_pem, key_pem)
    with pytest.raises(ExportError, match=r"pool refused the bundle: certificate 'hospital-b' \(serial [0-9a-f]+\) "
                                          r"has been replaced by a newer certificate"):
        push(signed, srv.address, minted, retries=0, progress=False)
    assert {b["bundle_id"] for b in list_bundles(srv.address, reader)} == before
    # the site's own key still works
    assert not export(out, srv.address, sites["hospital-b"], progress=False).duplicate


def test_forged_signature_over_the_sites_key_fingerprint_is_refused(fed, tmp_path):
    certs, sites, reader, srv = fed
    out = tmp_path / "forged2"
    make_site_dir(out, "hospital-a", 2, seed=3)
    from plan_shared.bundle import load_signing_key

    creds = load_client_credentials(sites["hospital-a"])
    real = build_bundle(out, load_signing_key(creds.signing_key_path))  # names the registered key
    forged = replace(real, signature=sign_manifest(real.manifest_bytes, generate_signing_key()))
    with pytest.raises(ExportError, match="pool refused the bundle: .*signature"):
        push(forged, srv.address, creds, retries=0, progress=False)
    assert real.bundle_id not in {b["bundle_id"] for b in list_bundles(srv.address, reader)}
