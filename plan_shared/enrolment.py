"""Keys are born where they are used: a site's or reader's half of enrolment.

``plan-client keys init`` (:func:`init_keys`) makes every private key of an identity
in its own folder, on the machine that uses it, and writes a public *enrolment file*
for the coordinator; ``plan-server certs enroll`` (server/certs.py) checks it with
:func:`read_enrolment`, signs the certificate and answers with a *response file*;
``plan-client keys install`` (:func:`install_certificate`) puts the certificate and
the federation CA certificate next to the keys. The folder then has exactly the
layout :func:`plan_shared.credentials.load_client_credentials` reads (documented in
:mod:`plan_shared.credentials`). Nothing private ever leaves the folder.

Enrolment file (``enrolment.json``, public)::

    {"format": "plan-enrolment", "version": 1, "name": NAME, "role": "site"|"reader",
     "csr": "-----BEGIN CERTIFICATE REQUEST-----...",   # EC P-256, CN=NAME, OU=role
     "ed25519_public": "<hex of the raw 32-byte bundle-signing key>" | null,
     "node_public_key": "ecdsa-sha2-nistp384 AAAA..." | null,   # Flower SuperNode key
     "fingerprints": {"tls": sha256(CSR public key, DER SubjectPublicKeyInfo),
                      "signing": sha256(raw Ed25519 key) | null,
                      "node": sha256(OpenSSH key blob) | null},
     "proofs": {"signing": "<hex Ed25519 signature>" | null,
                "node": "<hex ECDSA-P384-SHA384 signature, DER>" | null}}

The CSR proves possession of the TLS key; ``proofs`` are signatures by the signing
key and by the node key over the canonical JSON of every other field (sorted keys,
no spaces), so a changed name, role, key or fingerprint is refused. Readers have no
signing or node key (those fields are null). The fingerprints are what a site
reads out to the coordinator over a second channel; ``certs enroll`` prints them.

Response file (``NAME.response.json``, public)::

    {"format": "plan-enrolment-response", "version": 1, "name": NAME, "role": ROLE,
     "serial": "<hex>", "certificate": "<PEM>", "ca_certificate": "<PEM>"}
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from plan_shared import credentials as C
from plan_shared.files import sha256_bytes
from plan_shared.manifest import is_safe_name

ENROLMENT_FORMAT = "plan-enrolment"
RESPONSE_FORMAT = "plan-enrolment-response"
VERSION = 1
ENROLMENT = "enrolment.json"
CSR = "client.csr"
ORG = "PLAN federation"
MAX_FILE_BYTES = 64 * 1024  # an enrolment or response file is ~2 KB; anything far larger is not one
_ENROLMENT_KEYS = ("format", "version", "name", "role", "csr", "ed25519_public", "node_public_key", "fingerprints", "proofs")
_RESPONSE_KEYS = ("format", "version", "name", "role", "serial", "certificate", "ca_certificate")


class EnrolmentError(ValueError):
    """An enrolment step was refused; the message names the file and the field at fault."""


# ---------------------------------------------------------------- key primitives


def make_tls_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_node_key() -> tuple[bytes, bytes]:
    """Flower SuperNode auth key pair: EC P-384, (OpenSSH private PEM, OpenSSH public line)."""
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return priv, pub


def subject_name(name: str, role: str | None = None) -> x509.Name:
    """O=PLAN federation[, OU=role], CN=name: the subject of every federation certificate."""
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG)]
    if role:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, name))
    return x509.Name(attrs)


def make_csr(key: ec.EllipticCurvePrivateKey, name: str, role: str) -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject_name(name, role))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )


def spki_sha256(public_key: PublicKeyTypes) -> str:
    """sha256 hex of a public key's DER SubjectPublicKeyInfo."""
    return sha256_bytes(public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def openssh_sha256(line: str) -> str:
    """sha256 hex of the key blob of an OpenSSH public key line (what ``ssh-keygen -l`` hashes)."""
    import base64

    return sha256_bytes(base64.b64decode(line.split()[1]))


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _signed_part(doc: dict[str, Any]) -> bytes:
    return _canonical({k: v for k, v in doc.items() if k != "proofs"})


# ---------------------------------------------------------------- site side: keys init


def folder_files(role: str) -> tuple[str, ...]:
    """Files ``init_keys`` writes for ``role`` (private ones are 0600)."""
    base = (C.IDENTITY, C.CLIENT_KEY, CSR, ENROLMENT)
    return base + ((C.SIGNING_KEY, C.SIGNING_PUB, C.NODE_KEY, C.NODE_PUB) if role == "site" else ())


def init_keys(directory: str | Path, name: str, role: str = "site") -> Path:
    """Make an identity's keys in ``directory`` (created, 0700) and its enrolment file; returns that file.

    Never replaces anything: when any of the files it would write is there already,
    nothing is written (re-keying is a new folder and a new ``certs enroll --force``).
    """
    from plan_shared.bundle import generate_signing_key, public_key_raw, public_key_to_pem, signing_key_to_pem

    if role not in C.ROLES:
        raise EnrolmentError(f"role must be one of {', '.join(C.ROLES)}, got {role!r}")
    if not is_safe_name(name):
        raise EnrolmentError(f"name {name!r}: use letters, digits, '.', '_' or '-' (it is the site id)")
    d = Path(directory)
    present = [f for f in folder_files(role) + (C.CLIENT_CERT,) if (d / f).exists()]
    if present:
        raise EnrolmentError(f"{d}: already holds {', '.join(present)}; refusing to replace keys "
                             "(use a new folder to re-key, then `plan-server certs enroll --force`)")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    tls = make_tls_key()
    csr = make_csr(tls, name, role)
    csr_pem = csr.public_bytes(serialization.Encoding.PEM)
    doc: dict[str, Any] = {
        "format": ENROLMENT_FORMAT, "version": VERSION, "name": name, "role": role,
        "csr": csr_pem.decode("ascii"), "ed25519_public": None, "node_public_key": None,
        "fingerprints": {"tls": spki_sha256(tls.public_key()), "signing": None, "node": None},
    }
    C.write_secret(d / C.CLIENT_KEY, tls.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    C.write_public(d / CSR, csr_pem)
    signers: list[tuple[str, Callable[[bytes], bytes]]] = []
    if role == "site":
        sk = generate_signing_key()
        raw = public_key_raw(sk.public_key())
        node_priv, node_pub = make_node_key()
        node_key = serialization.load_ssh_private_key(node_priv, password=None)
        if not isinstance(node_key, ec.EllipticCurvePrivateKey):
            raise EnrolmentError(f"the Flower node key made for {name} is not an EC key")
        C.write_secret(d / C.SIGNING_KEY, signing_key_to_pem(sk))
        C.write_public(d / C.SIGNING_PUB, public_key_to_pem(sk.public_key()))
        C.write_secret(d / C.NODE_KEY, node_priv)
        C.write_public(d / C.NODE_PUB, node_pub + b"\n")
        doc["ed25519_public"] = raw.hex()
        doc["node_public_key"] = node_pub.decode("ascii")
        doc["fingerprints"].update(signing=sha256_bytes(raw), node=openssh_sha256(node_pub.decode("ascii")))
        signers = [("signing", lambda m: sk.sign(m)), ("node", lambda m: node_key.sign(m, ec.ECDSA(hashes.SHA384())))]
    msg = _signed_part(doc)
    doc["proofs"] = {"signing": None, "node": None}
    for field, sign in signers:
        doc["proofs"][field] = sign(msg).hex()
    C.write_public(d / C.IDENTITY, (json.dumps({"name": name, "role": role}) + "\n").encode())
    C.write_public(d / ENROLMENT, (json.dumps(doc, indent=1) + "\n").encode())
    return d / ENROLMENT


# ---------------------------------------------------------------- coordinator side: reading an enrolment


@dataclass(frozen=True)
class Enrolment:
    """A verified enrolment file."""

    path: Path
    name: str
    role: str
    csr: x509.CertificateSigningRequest
    ed25519_public: str | None  # hex
    node_public_key: str | None  # OpenSSH line
    fingerprints: dict[str, Any]


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise EnrolmentError(f"{path}: {what} not found") from None
    if size > MAX_FILE_BYTES:
        raise EnrolmentError(f"{path}: {size} bytes, not {what} (at most {MAX_FILE_BYTES})")
    try:
        doc = json.loads(path.read_bytes(), parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        raise EnrolmentError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise EnrolmentError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _check_keys(path: Path, doc: dict[str, Any], keys: tuple[str, ...], fmt: str) -> None:
    if doc.get("format") != fmt:
        raise EnrolmentError(f"{path}: format: expected {fmt!r}, got {doc.get('format')!r}")
    if doc.get("version") != VERSION or isinstance(doc.get("version"), bool):
        raise EnrolmentError(f"{path}: version: expected {VERSION}, got {doc.get('version')!r}")
    missing = [k for k in keys if k not in doc]
    if missing:
        raise EnrolmentError(f"{path}: missing field {', '.join(missing)}")
    extra = sorted(set(doc) - set(keys))
    if extra:
        raise EnrolmentError(f"{path}: unknown field {', '.join(extra)}")


def _hex(path: Path, field: str, value: Any, nbytes: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise EnrolmentError(f"{path}: {field}: expected a hex string, got {type(value).__name__}")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise EnrolmentError(f"{path}: {field}: not hex") from None
    if nbytes is not None and len(raw) != nbytes:
        raise EnrolmentError(f"{path}: {field}: expected {nbytes} bytes, got {len(raw)}")
    return raw


def _verifies(check: Callable[[], object]) -> bool:
    try:
        check()
    except InvalidSignature:
        return False
    return True


def _cn_ou(name: x509.Name) -> tuple[str | None, str | None]:
    cn = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = name.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return (str(cn[0].value) if cn else None), (str(ou[0].value) if ou else None)


def read_enrolment(path: str | Path) -> Enrolment:
    """Parse and verify an enrolment file; every refusal names the file and the field."""
    p = Path(path)
    doc = _read_json(p, "an enrolment file")
    _check_keys(p, doc, _ENROLMENT_KEYS, ENROLMENT_FORMAT)
    name, role = doc["name"], doc["role"]
    if not is_safe_name(name):
        raise EnrolmentError(f"{p}: name: {name!r} is not a valid identity name (letters, digits, '.', '_', '-')")
    if role not in C.ROLES:
        raise EnrolmentError(f"{p}: role: must be one of {', '.join(C.ROLES)}, got {role!r}")
    if not isinstance(doc["csr"], str):
        raise EnrolmentError(f"{p}: csr: expected a PEM string")
    try:
        csr = x509.load_pem_x509_csr(doc["csr"].encode("ascii"))
    except (ValueError, UnicodeEncodeError) as err:
        raise EnrolmentError(f"{p}: csr: not a PEM certificate request ({err})") from None
    if not csr.is_signature_valid:
        raise EnrolmentError(f"{p}: csr: its signature does not verify (changed after `plan-client keys init`)")
    pub = csr.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
        raise EnrolmentError(f"{p}: csr: the key must be EC P-256")
    cn, ou = _cn_ou(csr.subject)
    if cn != name:
        raise EnrolmentError(f"{p}: name: {name!r}, but the csr is for CN={cn!r}")
    if ou != role:
        raise EnrolmentError(f"{p}: role: {role!r}, but the csr says OU={ou!r}")
    fps = doc["fingerprints"]
    if not isinstance(fps, dict) or set(fps) != {"tls", "signing", "node"}:
        raise EnrolmentError(f"{p}: fingerprints: expected an object with tls, signing, node")
    if fps["tls"] != spki_sha256(pub):
        raise EnrolmentError(f"{p}: fingerprints.tls: does not match the csr's key")
    proofs = doc["proofs"]
    if not isinstance(proofs, dict) or set(proofs) != {"signing", "node"}:
        raise EnrolmentError(f"{p}: proofs: expected an object with signing, node")
    msg = _signed_part(doc)
    sign_pub, node_line = doc["ed25519_public"], doc["node_public_key"]
    if role == "reader":
        for field, v in (("ed25519_public", sign_pub), ("node_public_key", node_line), ("fingerprints.signing", fps["signing"]),
                         ("fingerprints.node", fps["node"]), ("proofs.signing", proofs["signing"]), ("proofs.node", proofs["node"])):
            if v is not None:
                raise EnrolmentError(f"{p}: {field}: a reader has no signing or node key (must be null)")
    else:
        raw = _hex(p, "ed25519_public", sign_pub, 32)
        try:
            spub = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            raise EnrolmentError(f"{p}: ed25519_public: not an Ed25519 public key") from None
        if fps["signing"] != sha256_bytes(raw):
            raise EnrolmentError(f"{p}: fingerprints.signing: does not match ed25519_public")
        if not isinstance(node_line, str) or not node_line.startswith("ecdsa-sha2-nistp384 "):
            raise EnrolmentError(f"{p}: node_public_key: expected an OpenSSH 'ecdsa-sha2-nistp384 ...' line")
        try:
            npub = serialization.load_ssh_public_key(node_line.encode("ascii"))
        except (ValueError, UnicodeEncodeError) as err:
            raise EnrolmentError(f"{p}: node_public_key: not an OpenSSH public key ({err})") from None
        if not isinstance(npub, ec.EllipticCurvePublicKey) or npub.curve.name != "secp384r1":
            raise EnrolmentError(f"{p}: node_public_key: the key must be EC P-384")
        if fps["node"] != openssh_sha256(node_line):
            raise EnrolmentError(f"{p}: fingerprints.node: does not match node_public_key")
        sig_ok = _verifies(lambda: spub.verify(_hex(p, "proofs.signing", proofs["signing"]), msg))
        node_ok = _verifies(lambda: npub.verify(_hex(p, "proofs.node", proofs["node"]), msg, ec.ECDSA(hashes.SHA384())))
        # Both proofs cover every other field: one failing alone points at its own proof; both failing, at a
        # changed field (a key swapped together with its fingerprint lands here).
        if not sig_ok and node_ok:
            raise EnrolmentError(f"{p}: proofs.signing: does not verify with ed25519_public "
                                 "(changed after `plan-client keys init`)")
        if sig_ok and not node_ok:
            raise EnrolmentError(f"{p}: proofs.node: does not verify with node_public_key "
                                 "(changed after `plan-client keys init`)")
        if not (sig_ok or node_ok):
            raise EnrolmentError(f"{p}: proofs: neither the signing nor the node key's proof verifies: one of name, role, "
                                 "csr, ed25519_public, node_public_key, fingerprints was changed after `plan-client keys init`")
    return Enrolment(p, name, role, csr, sign_pub, node_line, dict(fps))


# ---------------------------------------------------------------- response (coordinator writes, site installs)


def response_document(name: str, role: str, cert_pem: bytes, ca_pem: bytes) -> dict[str, Any]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return {"format": RESPONSE_FORMAT, "version": VERSION, "name": name, "role": role,
            "serial": format(cert.serial_number, "x"), "certificate": cert_pem.decode("ascii"),
            "ca_certificate": ca_pem.decode("ascii")}


def ca_fingerprint(ca_pem: bytes) -> str:
    """sha256 hex of the CA certificate (DER): what a site compares with the coordinator's."""
    return sha256_bytes(x509.load_pem_x509_certificate(ca_pem).public_bytes(serialization.Encoding.DER))


def install_certificate(directory: str | Path, response: str | Path, expect_ca_sha256: str | None = None) -> C.ClientCredentials:
    """Put the signed certificate and the CA certificate of ``response`` into the keys folder.

    Checks that the response is for this folder's identity and its own TLS key, and
    that the certificate is signed by the CA in it (and, with ``expect_ca_sha256``,
    that the CA is the one the coordinator announced). Returns the credentials.
    """
    d, rp = Path(directory), Path(response)
    idp = d / C.IDENTITY
    if not idp.is_file() or not (d / C.CLIENT_KEY).is_file():
        raise EnrolmentError(f"{d}: no keys here ({C.IDENTITY}, {C.CLIENT_KEY}); run `plan-client keys init --dir {d}` first")
    try:
        ident = json.loads(idp.read_text())
    except json.JSONDecodeError as err:
        raise EnrolmentError(f"{idp}: not valid JSON: {err}") from None
    doc = _read_json(rp, "an enrolment response")
    _check_keys(rp, doc, _RESPONSE_KEYS, RESPONSE_FORMAT)
    for field in ("name", "role"):
        if doc[field] != ident.get(field):
            raise EnrolmentError(f"{rp}: {field}: {doc[field]!r}, but {d} holds the keys of {ident.get(field)!r}")
    try:
        cert = x509.load_pem_x509_certificate(str(doc["certificate"]).encode("ascii"))
    except (ValueError, UnicodeEncodeError) as err:
        raise EnrolmentError(f"{rp}: certificate: not a PEM certificate ({err})") from None
    try:
        ca_pem = str(doc["ca_certificate"]).encode("ascii")
        ca = x509.load_pem_x509_certificate(ca_pem)
    except (ValueError, UnicodeEncodeError) as err:
        raise EnrolmentError(f"{rp}: ca_certificate: not a PEM certificate ({err})") from None
    if expect_ca_sha256 is not None and ca_fingerprint(ca_pem) != expect_ca_sha256.lower().replace(":", ""):
        raise EnrolmentError(f"{rp}: ca_certificate: sha256 {ca_fingerprint(ca_pem)}, expected {expect_ca_sha256}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise EnrolmentError(f"{rp}: certificate: not signed by the CA in ca_certificate") from None
    key = serialization.load_pem_private_key((d / C.CLIENT_KEY).read_bytes(), password=None)
    if spki_sha256(cert.public_key()) != spki_sha256(key.public_key()):
        raise EnrolmentError(f"{rp}: certificate: it is not for the key in {d / C.CLIENT_KEY} "
                             "(a response to another enrolment of this name?)")
    cn, ou = _cn_ou(cert.subject)
    if (cn, ou) != (ident.get("name"), ident.get("role")):
        raise EnrolmentError(f"{rp}: certificate: subject CN={cn!r}, OU={ou!r}, expected {ident.get('name')!r}/{ident.get('role')!r}")
    if format(cert.serial_number, "x") != doc["serial"]:
        raise EnrolmentError(f"{rp}: serial: {doc['serial']!r}, the certificate's is {format(cert.serial_number, 'x')!r}")
    C.write_public(d / C.CA_CERT, ca_pem)
    C.write_public(d / C.CLIENT_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return C.load_client_credentials(d)


__all__ = [
    "EnrolmentError", "Enrolment", "init_keys", "read_enrolment", "install_certificate", "response_document",
    "make_node_key", "make_tls_key", "make_csr", "subject_name", "spki_sha256", "openssh_sha256", "ca_fingerprint",
    "ENROLMENT", "CSR", "folder_files",
]
