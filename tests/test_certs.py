"""Federation credentials (server/certs.py) and their layout (plan_shared/credentials.py)."""

import ipaddress
import json
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from plan_shared.bundle import load_signing_key, public_key_raw
from plan_shared.credentials import (
    CredentialsError,
    cert_identity,
    load_client_credentials,
    load_server_credentials,
    write_secret,
)
from server.certs import CertsError, init_ca, issue, read_registry, revoke
from server.cli import app

runner = CliRunner()


def mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_init_issue_layout(tmp_path):
    d = tmp_path / "certs"
    init_ca(d, ["pool.example.org", "10.1.2.3"])
    for f in ("ca.key", "server.key"):
        assert mode(d / f) == 0o600
    srv = x509.load_pem_x509_certificate((d / "server.crt").read_bytes())
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["pool.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    srv.verify_directly_issued_by(ca)

    out = issue(d, "hospital-a", "site")
    assert out == d / "sites" / "hospital-a"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["identity.json", "ca.crt", "client.crt", "client.key", "signing.key", "signing.pub", "node_key", "node_key.pub"]
    )
    for f in ("client.key", "signing.key", "node_key"):
        assert mode(out / f) == 0o600, f
    assert mode(out) == 0o700
    cert = x509.load_pem_x509_certificate((out / "client.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    ident = cert_identity((out / "client.crt").read_bytes())
    assert (ident.name, ident.role) == ("hospital-a", "site")

    # Flower SuperNode auth key: EC P-384, OpenSSH private PEM + OpenSSH public line.
    node = serialization.load_ssh_private_key((out / "node_key").read_bytes(), password=None)
    assert isinstance(node, ec.EllipticCurvePrivateKey) and node.curve.name == "secp384r1"
    assert (out / "node_key").read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    pub_line = (out / "node_key.pub").read_text().strip()
    assert pub_line.startswith("ecdsa-sha2-nistp384 ")
    assert serialization.load_ssh_public_key(pub_line.encode()).public_numbers() == node.public_key().public_numbers()

    reg = read_registry(d)["identities"]["hospital-a"]
    sk = load_signing_key(out / "signing.key")
    assert isinstance(sk, Ed25519PrivateKey)
    assert reg["ed25519_public"] == public_key_raw(sk.public_key()).hex()
    assert reg["node_public_key"] == pub_line
    assert reg["node_public_key_path"] == "sites/hospital-a/node_key.pub"
    assert reg["serial"] == ident.serial and reg["role"] == "site" and reg["revoked"] is False

    creds = load_client_credentials(out)
    assert (creds.name, creds.role) == ("hospital-a", "site")
    assert load_server_credentials(d).cert_pem == (d / "server.crt").read_bytes()


def test_reader_has_no_signing_or_node_key(tmp_path):
    d = tmp_path / "certs"
    init_ca(d)
    out = issue(d, "alice", "reader")
    assert out == d / "readers" / "alice"
    assert not (out / "signing.key").exists() and not (out / "node_key").exists()
    reg = read_registry(d)["identities"]["alice"]
    assert reg["role"] == "reader" and reg["ed25519_public"] is None


def test_never_overwrite_silently(tmp_path):
    d = tmp_path / "certs"
    init_ca(d)
    with pytest.raises(CertsError, match="a CA already exists; refusing to replace it"):
        init_ca(d)
    issue(d, "site-a", "site")
    key_before = (d / "sites/site-a/client.key").read_bytes()
    with pytest.raises(CertsError, match="identity 'site-a' already exists .* refusing to replace it"):
        issue(d, "site-a", "site")
    assert (d / "sites/site-a/client.key").read_bytes() == key_before
    serial_before = read_registry(d)["identities"]["site-a"]["serial"]
    issue(d, "site-a", "site", force=True)
    assert (d / "sites/site-a/client.key").read_bytes() != key_before
    assert mode(d / "sites/site-a/client.key") == 0o600
    assert read_registry(d)["identities"]["site-a"]["serial"] != serial_before
    with pytest.raises(CredentialsError, match="refusing to overwrite a private key"):
        write_secret(d / "sites/site-a/client.key", b"x")
    # --renew-server keeps the CA and the registry.
    ca_before = (d / "ca.crt").read_bytes()
    init_ca(d, ["other.example"], renew_server=True)
    assert (d / "ca.crt").read_bytes() == ca_before and "site-a" in read_registry(d)["identities"]


def test_revoke(tmp_path):
    d = tmp_path / "certs"
    init_ca(d)
    issue(d, "site-a", "site")
    assert revoke(d, "site-a") is True
    e = read_registry(d)["identities"]["site-a"]
    assert e["revoked"] is True and e["revoked_at"]
    assert revoke(d, "site-a") is False
    with pytest.raises(CertsError, match="no identity 'nobody'"):
        revoke(d, "nobody")


def test_bad_names_and_roles(tmp_path):
    d = tmp_path / "certs"
    init_ca(d)
    with pytest.raises(CertsError, match="role must be one of"):
        issue(d, "x", "admin")
    with pytest.raises(CertsError, match="name '../x'"):
        issue(d, "../x", "site")
    with pytest.raises(CertsError, match="no CA here"):
        issue(tmp_path / "empty", "x", "site")


def test_cli(tmp_path):
    d = str(tmp_path / "certs")
    r = runner.invoke(app, ["certs", "init", "--dir", d, "--host", "localhost", "--host", "127.0.0.1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["certs", "issue", "--dir", d, "--name", "site-a", "--role", "site"])
    assert r.exit_code == 0 and "issued site 'site-a'" in r.output
    r = runner.invoke(app, ["certs", "issue", "--dir", d, "--site", "alice", "--role", "reader"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["certs", "issue", "--dir", d, "--name", "site-a"])
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(app, ["certs", "revoke", "--dir", d, "--name", "site-a"])
    assert r.exit_code == 0 and "revoked 'site-a'" in r.output
    r = runner.invoke(app, ["certs", "ls", "--dir", d])
    assert "alice" in r.output and "revoked" in r.output
    for cmd in (["certs", "init"], ["certs", "issue"], ["certs", "revoke"], ["pool", "serve"], ["pool", "pull"],
                ["pool", "ls"], ["pool", "check"]):
        r = runner.invoke(app, [*cmd, "--help"])
        assert r.exit_code == 0 and "Example: plan-server" in r.output, cmd
    assert json.loads((tmp_path / "certs" / "registry.json").read_text())["version"] == 1
