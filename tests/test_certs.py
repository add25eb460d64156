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

    out = issue(d, "hospital-a", "site", tmp_path / "hospital-a")
    assert out == tmp_path / "hospital-a"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["identity.json", "ca.crt", "client.crt", "client.key", "client.csr", "signing.key", "signing.pub", "node_key",
         "node_key.pub", "enrolment.json", "hospital-a.response.json"]
    )
    for f in ("client.key", "signing.key", "node_key"):
        assert mode(out / f) == 0o600, f
    assert mode(out) == 0o700
    # the CA folder holds the coordinator's own keys and public material only
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == [
        "ca.crt", "ca.key", "registry.json", "server.crt", "server.key"]
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
    assert "node_public_key_path" not in reg
    assert reg["serial"] == ident.serial and reg["role"] == "site" and reg["revoked"] is False

    creds = load_client_credentials(out)
    assert (creds.name, creds.role) == ("hospital-a", "site")
    assert load_server_credentials(d).cert_pem == (d / "server.crt").read_bytes()


def test_reader_has_no_signing_or_node_key(tmp_path):
    d = tmp_path / "certs"
    init_ca(d)
    out = issue(d, "alice", "reader", tmp_path / "alice")
    assert not (out / "signing.key").exists() and not (out / "node_key").exists()
    reg = read_registry(d)["identities"]["alice"]
    assert reg["role"] == "reader" and reg["ed25519_public"] is None and reg["node_public_key"] is None
    assert load_client_credentials(out).role == "reader"


def test_issue_refuses_a_folder_inside_the_ca_folder(tmp_path):
    d = tmp_path / "certs"
    init_ca(d)
    for inside in (d / "sites" / "a", d, d / ".." / "certs" / "x"):
        with pytest.raises(CertsError, match="inside the credentials folder .* must live outside it"):
            issue(d, "a", "site", inside)
    assert "a" not in read_registry(d)["identities"]
    assert not (d / "sites").exists() and not (d / "x").exists()


def test_never_overwrite_silently(tmp_path):
    d = tmp_path / "certs"
    init_ca(d)
    with pytest.raises(CertsError, match="a CA already exists; refusing to replace it"):
        init_ca(d)
    first = issue(d, "site-a", "site", tmp_path / "a1")
    key_before = (first / "client.key").read_bytes()
    with pytest.raises(CertsError, match="identity 'site-a' is already enrolled .* refusing to replace it"):
        issue(d, "site-a", "site", tmp_path / "a2")
    # an existing keys folder is never re-keyed
    with pytest.raises(CertsError, match="already holds .*refusing to replace keys"):
        issue(d, "site-a", "site", first, force=True)
    assert (first / "client.key").read_bytes() == key_before
    serial_before = read_registry(d)["identities"]["site-a"]["serial"]
    # --force enrols new keys (the half-done a2 folder from above is enrolled as it is)
    second = issue(d, "site-a", "site", tmp_path / "a2", force=True)
    assert (second / "client.key").read_bytes() != key_before
    assert mode(second / "client.key") == 0o600
    assert read_registry(d)["identities"]["site-a"]["serial"] != serial_before
    with pytest.raises(CredentialsError, match="refusing to overwrite a private key"):
        write_secret(second / "client.key", b"x")
    # --renew-server keeps the CA and the registry.
    ca_before = (d / "ca.crt").read_bytes()
    init_ca(d, ["other.example"], renew_server=True)
    assert (d / "ca.crt").read_bytes() == ca_before and "site-a" in read_registry(d)["identities"]


def test_revoke(tmp_path):
    d = tmp_path / "certs"
    init_ca(d)
    issue(d, "site-a", "site", tmp_path / "site-a")
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
        issue(d, "x", "admin", tmp_path / "x")
    with pytest.raises(CertsError, match="name '../x'"):
        issue(d, "../x", "site", tmp_path / "x")
    with pytest.raises(CertsError, match="no CA here"):
        issue(tmp_path / "empty", "x", "site", tmp_path / "x")
    assert not (tmp_path / "x").exists()  # refused before any key was made


def test_cli(tmp_path):
    from client.cli import app as client_app

    d = str(tmp_path / "certs")
    r = runner.invoke(app, ["certs", "init", "--dir", d, "--host", "localhost", "--host", "127.0.0.1"])
    assert r.exit_code == 0, r.output
    # the two halves: keys made at the site, certificate signed at the coordinator
    site = tmp_path / "site-a"
    r = runner.invoke(client_app, ["keys", "init", "--dir", str(site), "--name", "site-a"])
    assert r.exit_code == 0 and f"send {site / 'enrolment.json'} to the coordinator" in r.output, r.output
    r = runner.invoke(app, ["certs", "enroll", str(site / "enrolment.json"), "--dir", d, "--name", "site-a",
                            "--out", str(tmp_path / "resp.json")])
    assert r.exit_code == 0 and "enrolled site 'site-a'" in r.output, r.output
    tls_fp = read_registry(d)["identities"]["site-a"]["fingerprints"]["tls"]
    assert f"tls      key sha256 {tls_fp}" in r.output
    ca_fp = r.output.split("CA certificate sha256 ")[1].split()[0]
    r = runner.invoke(client_app, ["keys", "install", str(tmp_path / "resp.json"), "--dir", str(site),
                                   "--ca-sha256", "0" * 64])
    assert r.exit_code == 1 and "ca_certificate: sha256" in r.output and not (site / "client.crt").exists()
    r = runner.invoke(client_app, ["keys", "install", str(tmp_path / "resp.json"), "--dir", str(site), "--ca-sha256", ca_fp])
    assert r.exit_code == 0 and "installed the certificate of site 'site-a'" in r.output, r.output
    assert load_client_credentials(site).name == "site-a"
    r = runner.invoke(app, ["certs", "enroll", str(site / "enrolment.json"), "--dir", d])
    assert r.exit_code == 1 and "already enrolled" in r.output
    r = runner.invoke(app, ["certs", "issue", "--dir", d, "--site", "alice", "--role", "reader", "--out",
                            str(tmp_path / "alice")])
    assert r.exit_code == 0 and "issued reader 'alice'" in r.output, r.output
    r = runner.invoke(app, ["certs", "issue", "--dir", d, "--name", "bob", "--out", str(tmp_path / "certs" / "bob")])
    assert r.exit_code == 1 and "must live outside it" in r.output
    r = runner.invoke(app, ["certs", "revoke", "--dir", d, "--name", "site-a"])
    assert r.exit_code == 0 and "revoked 'site-a'" in r.output
    r = runner.invoke(app, ["certs", "ls", "--dir", d])
    assert "alice" in r.output and "revoked" in r.output
    for cmd in (["certs", "init"], ["certs", "enroll"], ["certs", "issue"], ["certs", "revoke"], ["pool", "serve"],
                ["pool", "pull"], ["pool", "ls"], ["pool", "check"]):
        r = runner.invoke(app, [*cmd, "--help"])
        assert r.exit_code == 0 and "Example: plan-server" in r.output, cmd
    for cmd in (["keys", "init"], ["keys", "install"]):
        r = runner.invoke(client_app, [*cmd, "--help"])
        assert r.exit_code == 0 and "Example: plan-client keys" in r.output, cmd
    assert json.loads((tmp_path / "certs" / "registry.json").read_text())["version"] == 1
