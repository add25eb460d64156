"""Enrolment (plan_shared/enrolment.py + server/certs.enroll): keys made at the site, public files only travel."""

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from plan_shared.bundle import generate_signing_key, public_key_raw
from plan_shared.credentials import load_client_credentials
from plan_shared.enrolment import (
    EnrolmentError,
    init_keys,
    install_certificate,
    make_csr,
    make_node_key,
    make_tls_key,
    openssh_sha256,
    read_enrolment,
    spki_sha256,
)
from server.certs import CertsError, enroll, init_ca, issue, read_registry, write_response


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def private_files(root: Path) -> list[str]:
    """Every file under ``root`` holding a private key (PEM PKCS#8/EC or OpenSSH)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and b"PRIVATE KEY" in p.read_bytes())


@pytest.fixture
def ca(tmp_path) -> Path:
    d = tmp_path / "certs"
    init_ca(d)
    return d


def edit(path: Path, fn) -> Path:
    doc = json.loads(path.read_text())
    fn(doc)
    out = path.with_name("edited.json")
    out.write_text(json.dumps(doc))
    return out


def test_init_keys_makes_private_files_0600_and_a_public_enrolment(tmp_path):
    d = tmp_path / "site"
    path = init_keys(d, "hospital-a", "site")
    assert path == d / "enrolment.json"
    assert mode(d) == 0o700
    for f in ("client.key", "signing.key", "node_key"):
        assert mode(d / f) == 0o600, f
    assert private_files(d) == ["client.key", "node_key", "signing.key"]
    doc = json.loads(path.read_text())
    assert b"PRIVATE" not in path.read_bytes()
    csr = x509.load_pem_x509_csr(doc["csr"].encode())
    assert csr.is_signature_valid
    key = serialization.load_pem_private_key((d / "client.key").read_bytes(), password=None)
    assert doc["fingerprints"]["tls"] == spki_sha256(key.public_key()) == spki_sha256(csr.public_key())
    assert doc["node_public_key"] == (d / "node_key.pub").read_text().strip()
    assert doc["fingerprints"]["node"] == openssh_sha256(doc["node_public_key"])
    en = read_enrolment(path)
    assert (en.name, en.role) == ("hospital-a", "site")


def test_init_keys_never_overwrites(tmp_path):
    d = tmp_path / "site"
    init_keys(d, "hospital-a")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(EnrolmentError, match="already holds .*client.key.*refusing to replace keys"):
        init_keys(d, "hospital-a")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    with pytest.raises(EnrolmentError, match="role must be one of"):
        init_keys(tmp_path / "x", "a", "admin")
    with pytest.raises(EnrolmentError, match="name '../a'"):
        init_keys(tmp_path / "x", "../a")
    assert not (tmp_path / "x").exists()


def test_reader_enrolment_has_no_signing_or_node_key(tmp_path):
    path = init_keys(tmp_path / "r", "alice", "reader")
    doc = json.loads(path.read_text())
    assert doc["ed25519_public"] is None and doc["node_public_key"] is None and doc["proofs"] == {"signing": None, "node": None}
    assert private_files(tmp_path / "r") == ["client.key"]
    assert read_enrolment(path).role == "reader"
    # a reader file given a signing key is refused, naming the field
    with pytest.raises(EnrolmentError, match=r"ed25519_public: a reader has no signing or node key"):
        read_enrolment(edit(path, lambda d: d.update(ed25519_public="00" * 32)))


def _flip_csr_signature(pem: str) -> str:
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    b64 = base64.encodebytes(bytes(der)).decode().replace("\n", "")
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return "-----BEGIN CERTIFICATE REQUEST-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE REQUEST-----\n"


def test_tampered_enrolment_is_refused_naming_the_field(tmp_path):
    path = init_keys(tmp_path / "site", "hospital-a")
    other_tls = make_tls_key()
    other_csr = make_csr(other_tls, "hospital-a", "site").public_bytes(serialization.Encoding.PEM).decode()
    other_sign = public_key_raw(generate_signing_key().public_key())
    _, other_node = make_node_key()

    def swap_tls(d):  # another key's CSR with a matching fingerprint: only the proofs can tell
        d.update(csr=other_csr)
        d["fingerprints"]["tls"] = spki_sha256(other_tls.public_key())

    def swap_signing(d):
        d.update(ed25519_public=other_sign.hex())
        d["fingerprints"]["signing"] = hashlib.sha256(other_sign).hexdigest()

    def swap_node(d):
        d.update(node_public_key=other_node.decode())
        d["fingerprints"]["node"] = openssh_sha256(other_node.decode())

    cases = [
        (lambda d: d.update(csr=_flip_csr_signature(d["csr"])), r"csr: its signature does not verify"),
        (lambda d: d.update(csr="not a csr"), r"csr: not a PEM certificate request"),
        (lambda d: d.update(name="hospital-b"), r"name: 'hospital-b', but the csr is for CN='hospital-a'"),
        (lambda d: d.update(role="reader"), r"role: 'reader', but the csr says OU='site'"),
        (lambda d: d.update(csr=other_csr), r"fingerprints.tls: does not match the csr's key"),
        (swap_tls, r"proofs: neither the signing nor the node key's proof verifies: one of name, role, csr"),
        (lambda d: d.update(ed25519_public=other_sign.hex()), r"fingerprints.signing: does not match ed25519_public"),
        (swap_signing, r"proofs: neither the signing nor the node key's proof verifies"),
        (swap_node, r"proofs: neither the signing nor the node key's proof verifies"),
        (lambda d: d["proofs"].update(signing=d["proofs"]["node"][:128]), r"proofs.signing: does not verify with ed25519_public"),
        (lambda d: d.update(node_public_key="ssh-ed25519 AAAA"), r"node_public_key: expected an OpenSSH 'ecdsa-sha2-nistp384"),
        (lambda d: d.update(ed25519_public="zz"), r"ed25519_public: not hex"),
        (lambda d: d["proofs"].update(node="00"), r"proofs.node: does not verify with node_public_key"),
        (lambda d: d["fingerprints"].update(tls="0" * 64), r"fingerprints.tls: does not match the csr's key"),
        (lambda d: d.pop("csr"), r"missing field csr"),
        (lambda d: d.update(extra=1), r"unknown field extra"),
        (lambda d: d.update(version=2), r"version: expected 1, got 2"),
        (lambda d: d.update(format="x"), r"format: expected 'plan-enrolment'"),
        (lambda d: d.update(name="../etc"), r"name: '../etc' is not a valid identity name"),
    ]
    for fn, msg in cases:
        bad = edit(path, fn)
        with pytest.raises(EnrolmentError, match=msg) as exc:
            read_enrolment(bad)
        assert str(exc.value).startswith(f"{bad}: "), exc.value
    for raw, msg in ((b"{", "not valid JSON"), (b"[1]", "expected a JSON object"),
                     (b'{"format": NaN}', "not valid JSON .*NaN is not allowed"), (b" " * 70000, "bytes, not an enrolment file")):
        (tmp_path / "raw.json").write_bytes(raw)
        with pytest.raises(EnrolmentError, match=msg):
            read_enrolment(tmp_path / "raw.json")
    with pytest.raises(EnrolmentError, match="an enrolment file not found"):
        read_enrolment(tmp_path / "missing.json")


def test_enroll_registers_public_keys_and_keeps_no_private_key(tmp_path, ca):
    site = tmp_path / "site"
    path = init_keys(site, "hospital-a")
    doc = json.loads(path.read_text())
    resp = enroll(ca, path, role="site", name="hospital-a")
    assert private_files(ca) == ["ca.key", "server.key"]  # the coordinator's own, nothing of the site's
    e = read_registry(ca)["identities"]["hospital-a"]
    assert (e["ed25519_public"], e["node_public_key"]) == (doc["ed25519_public"], doc["node_public_key"])
    assert e["fingerprints"] == doc["fingerprints"] and e["serial"] == resp["serial"]
    assert b"PRIVATE" not in json.dumps(resp).encode()
    cert = x509.load_pem_x509_certificate(resp["certificate"].encode())
    assert spki_sha256(cert.public_key()) == doc["fingerprints"]["tls"]
    creds = install_certificate(site, write_response(resp, tmp_path / "resp.json"))
    assert (creds.name, creds.role) == ("hospital-a", "site")
    assert load_client_credentials(site).cert_pem == resp["certificate"].encode()
    assert (site / "ca.crt").read_bytes() == (ca / "ca.crt").read_bytes()


def test_enroll_refusals(tmp_path, ca):
    site = init_keys(tmp_path / "a", "hospital-a")
    reader = init_keys(tmp_path / "r", "alice", "reader")
    reg_before = (ca / "registry.json").read_bytes()
    with pytest.raises(CertsError, match=r"role: the enrolment asks for 'site', the coordinator expects 'reader'"):
        enroll(ca, site, role="reader")
    with pytest.raises(CertsError, match=r"role: the enrolment asks for 'reader', the coordinator expects 'site'"):
        enroll(ca, reader)  # a reader cannot become a site by default
    with pytest.raises(CertsError, match=r"name: the enrolment is for 'hospital-a', expected 'hospital-b'"):
        enroll(ca, site, name="hospital-b")
    bad = edit(site, lambda d: d.update(name="hospital-b"))
    with pytest.raises(CertsError, match=rf"{bad}: name: 'hospital-b', but the csr"):
        enroll(ca, bad)
    assert (ca / "registry.json").read_bytes() == reg_before
    enroll(ca, site)
    enroll(ca, reader, role="reader")
    serial = read_registry(ca)["identities"]["hospital-a"]["serial"]
    with pytest.raises(CertsError, match=r"name: identity 'hospital-a' is already enrolled \(site, active\)"):
        enroll(ca, init_keys(tmp_path / "a2", "hospital-a"))
    assert read_registry(ca)["identities"]["hospital-a"]["serial"] == serial
    assert enroll(ca, tmp_path / "a2" / "enrolment.json", force=True)["serial"] != serial
    # the same signing/node key cannot be enrolled under a second name
    copy = tmp_path / "copy"
    copy.mkdir()
    with pytest.raises(CertsError, match=r"ed25519_public: already registered for 'hospital-a'"):
        # hospital-a's keys, re-signed under hospital-b's name, are refused even with valid proofs
        enroll(ca, _reenrol_as(tmp_path / "a2", "hospital-b", copy))
    with pytest.raises(CertsError, match="no CA here"):
        enroll(tmp_path / "nowhere", site)


def _reenrol_as(src: Path, name: str, out: Path) -> Path:
    """An enrolment for ``name`` made with ``src``'s signing and node keys (a site trying to be two)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from plan_shared import enrolment as E

    sk = serialization.load_pem_private_key((src / "signing.key").read_bytes(), password=None)
    nk = serialization.load_ssh_private_key((src / "node_key").read_bytes(), password=None)
    tls = make_tls_key()
    raw = public_key_raw(sk.public_key())
    node_line = (src / "node_key.pub").read_text().strip()
    doc = {"format": E.ENROLMENT_FORMAT, "version": 1, "name": name, "role": "site",
           "csr": make_csr(tls, name, "site").public_bytes(serialization.Encoding.PEM).decode(),
           "ed25519_public": raw.hex(), "node_public_key": node_line,
           "fingerprints": {"tls": spki_sha256(tls.public_key()), "signing": hashlib.sha256(raw).hexdigest(),
                            "node": openssh_sha256(node_line)}}
    msg = E._signed_part(doc)
    doc["proofs"] = {"signing": sk.sign(msg).hex(), "node": nk.sign(msg, ec.ECDSA(hashes.SHA384())).hex()}
    p = out / "enrolment.json"
    p.write_text(json.dumps(doc))
    read_enrolment(p)  # well-formed: only the registry check can refuse it
    return p


def test_install_checks_the_response_is_for_these_keys(tmp_path, ca):
    first, second = tmp_path / "a1", tmp_path / "a2"
    enroll(ca, init_keys(first, "hospital-a"))
    resp_first = write_response(enroll(ca, init_keys(second, "hospital-a"), force=True), tmp_path / "r2.json")
    with pytest.raises(EnrolmentError, match=r"certificate: it is not for the key in .*a1/client.key"):
        install_certificate(first, resp_first)
    other = tmp_path / "other-ca"
    init_ca(other)
    foreign = json.loads(resp_first.read_text())
    foreign["ca_certificate"] = (other / "ca.crt").read_text()
    (tmp_path / "foreign.json").write_text(json.dumps(foreign))
    with pytest.raises(EnrolmentError, match="certificate: not signed by the CA in ca_certificate"):
        install_certificate(second, tmp_path / "foreign.json")
    init_keys(tmp_path / "b", "hospital-b")
    with pytest.raises(EnrolmentError, match=r"name: 'hospital-a', but .* holds the keys of 'hospital-b'"):
        install_certificate(tmp_path / "b", resp_first)
    with pytest.raises(EnrolmentError, match=r"ca_certificate: sha256 [0-9a-f]{64}, expected ab"):
        install_certificate(second, resp_first, expect_ca_sha256="ab")
    with pytest.raises(EnrolmentError, match="no keys here"):
        install_certificate(tmp_path / "empty", resp_first)
    assert not (first / "client.crt").exists() and not (second / "client.crt").exists()
    install_certificate(second, resp_first)
    assert load_client_credentials(second).name == "hospital-a"


def test_one_machine_issue_runs_both_halves_outside_the_ca_folder(tmp_path, ca):
    out = issue(ca, "site-x", "site", tmp_path / "keys" / "site-x")
    assert (out / "enrolment.json").is_file() and (out / "client.crt").is_file()
    assert private_files(ca) == ["ca.key", "server.key"]
    assert read_enrolment(out / "enrolment.json").ed25519_public == read_registry(ca)["identities"]["site-x"]["ed25519_public"]
