"""Credential layout of the federation, and readers for it (bytes only, no grpc).

Two kinds of folder. The coordinator's CA folder, made by ``plan-server certs``
(server/certs.py), holds only the coordinator's own keys and the public keys of
everyone enrolled. An identity's folder is made where the identity runs, by
``plan-client keys init`` + ``keys install`` (plan_shared/enrolment.py); its private
keys never leave it. This docstring is the reference for both layouts::

    CERTS/                  the coordinator's, made by `certs init` / `certs enroll`
      ca.crt            federation CA certificate (self-signed, EC P-256)
      ca.key            CA private key                                   0600
      server.crt        pool/SuperLink server certificate (SANs from --host)
      server.key        its private key                                  0600
      registry.json     enrolled identities and their public keys, see below

    KEYS/                   one site's (a hospital's), made by `plan-client keys init --role site`
      identity.json   {"name": NAME, "role": "site"}
      client.key      TLS private key, EC P-256                          0600
      client.csr      its certificate request (CN=NAME, OU=site)
      signing.key     Ed25519 bundle-signing key (PKCS#8 PEM)            0600
      signing.pub     its public half (PEM)
      node_key        Flower SuperNode auth key, EC P-384, OpenSSH PEM   0600
      node_key.pub    its public half, OpenSSH format
      enrolment.json  the public enrolment file sent to the coordinator
      ca.crt          after `keys install`: the federation CA certificate
      client.crt      after `keys install`: TLS client certificate CN=NAME, OU=site

    KEYS/                   one reader's (a researcher's, or the coordinator's own):
      identity.json, client.key, client.csr, enrolment.json, ca.crt, client.crt (OU=reader)

On one machine (demo, simulation) the identity folders live side by side under a
folder of their own as ``sites/NAME`` and ``readers/NAME`` -- never inside CERTS.

``registry.json``::

    {"version": 1,
     "identities": {NAME: {"name", "role": "site"|"reader", "serial": "<hex>",
                           "cert_sha256", "issued", "revoked": bool, "revoked_at",
                           "ed25519_public": "<hex of raw 32 bytes>" | null,
                           "node_public_key": "ecdsa-sha2-nistp384 AAAA..." | null,
                           "fingerprints": {"tls", "signing", "node"}}}}

The role is carried twice: in the certificate's organisational unit (OU) and in
the registry; the pool service requires both to agree, the certificate serial to
be the registered one and the entry not to be revoked, on every call. The
coordinator registers each active site's ``node_public_key`` with the SuperLink.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from plan_shared.files import atomic_write

ROLES = ("site", "reader")
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
REGISTRY = "registry.json"
IDENTITY = "identity.json"
CLIENT_CERT = "client.crt"
CLIENT_KEY = "client.key"
SIGNING_KEY = "signing.key"
SIGNING_PUB = "signing.pub"
NODE_KEY = "node_key"
NODE_PUB = "node_key.pub"
ROLE_DIRS = {"site": "sites", "reader": "readers"}


class CredentialsError(ValueError):
    """Credentials are missing, unreadable or inconsistent; the message names the file."""


def identity_dir(certs: str | Path, name: str, role: str) -> Path:
    return Path(certs) / ROLE_DIRS[role] / name


def find_identity_dir(
    certs: str | Path,
    role: str,
    name: str | None = None,
    explicit: str | Path | None = None,
    marker: str = CLIENT_CERT,
) -> Path | None:
    """The one rule for finding an identity's credentials folder; None when there is none.

    1. ``explicit`` (e.g. ``site.pool_keys_dir``, ``coordinator.reader_dir``), when given: taken as it is (``~`` expanded);
    2. ``certs`` itself, when it holds ``marker``: an identity's own keys folder
       (``plan-client keys init --dir certs``, what a deployed site names in site.keys_dir);
    3. ``certs/<sites|readers>/<name>`` (:func:`identity_dir`), when it is a folder: the layout of a
       simulation, where one folder holds every virtual identity;
    4. without ``name``: the first (sorted) folder under ``certs/<sites|readers>/``.
    """
    if role not in ROLE_DIRS:
        raise CredentialsError(f"role {role!r}: expected one of {', '.join(ROLE_DIRS)}")
    if explicit:
        return Path(explicit).expanduser()
    base = Path(certs).expanduser()
    if (base / marker).is_file():
        return base
    if name is not None:
        cand = identity_dir(base, name, role)
        return cand if cand.is_dir() else None
    group = base / ROLE_DIRS[role]
    found = sorted(p for p in group.iterdir() if p.is_dir()) if group.is_dir() else []
    return found[0] if found else None


@dataclass(frozen=True)
class CertIdentity:
    name: str
    role: str | None
    serial: str  # lower-case hex


def cert_identity(pem: bytes) -> CertIdentity:
    """Name (CN), role (OU) and serial (hex) of a PEM certificate."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as err:
        raise CredentialsError(f"not a PEM certificate: {err}") from None
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    name = str(cn[0].value) if cn else ""
    role = str(ou[0].value) if ou else None
    return CertIdentity(name=name, role=role, serial=format(cert.serial_number, "x"))


@dataclass(frozen=True)
class ClientCredentials:
    """What a site or reader needs to open a mutual-TLS channel to the pool."""

    directory: Path
    name: str
    role: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @property
    def signing_key_path(self) -> Path:
        return self.directory / SIGNING_KEY


def load_client_credentials(directory: str | Path) -> ClientCredentials:
    """Read an identity's folder after ``plan-client keys install`` (see the module docstring)."""
    d = Path(directory)
    if not d.is_dir():
        raise CredentialsError(f"credentials folder not found: {d}")
    files = {}
    for fname in (CA_CERT, CLIENT_CERT, CLIENT_KEY):
        p = d / fname
        if not p.is_file():
            raise CredentialsError(f"{p}: missing (a credentials folder holds {CA_CERT}, {CLIENT_CERT}, {CLIENT_KEY})")
        files[fname] = p.read_bytes()
    ident = cert_identity(files[CLIENT_CERT])
    name, role = ident.name, ident.role
    idp = d / IDENTITY
    if idp.is_file():
        try:
            meta = json.loads(idp.read_text())
        except json.JSONDecodeError as err:
            raise CredentialsError(f"{idp}: not valid JSON: {err}") from None
        if meta.get("name") != name or meta.get("role") != role:
            raise CredentialsError(f"{idp}: says {meta.get('name')}/{meta.get('role')}, certificate says {name}/{role}")
    if role not in ROLES:
        raise CredentialsError(f"{d / CLIENT_CERT}: certificate has no role (OU site|reader)")
    return ClientCredentials(d, name, role, files[CA_CERT], files[CLIENT_CERT], files[CLIENT_KEY])


@dataclass(frozen=True)
class ServerCredentials:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def load_server_credentials(certs: str | Path) -> ServerCredentials:
    d = Path(certs)
    out = []
    for fname in (CA_CERT, SERVER_CERT, SERVER_KEY):
        p = d / fname
        if not p.is_file():
            raise CredentialsError(f"{p}: missing (run `plan-server certs init --dir {d}` first)")
        out.append(p.read_bytes())
    return ServerCredentials(*out)


def write_secret(path: str | Path, data: bytes, overwrite: bool = False) -> None:
    """Write a private key with mode 0600; refuses to replace an existing file unless ``overwrite``.

    With ``overwrite`` the new content goes to a temporary file first and replaces
    the old one atomically (never a half-written key).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists() and not overwrite:
        raise CredentialsError(f"{p}: exists; refusing to overwrite a private key (use --force to replace it)")
    if overwrite:
        atomic_write(p, data, mode=0o600)  # private from the first byte (the temporary file is 0600)
        return
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # O_EXCL: never over an existing key
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_public(path: str | Path, data: bytes) -> None:
    """Write a public file (certificate, public key) atomically, mode 0644."""
    atomic_write(path, data, mode=0o644)


def is_private_mode(path: str | Path) -> bool:
    """True when group and others have no access to the file."""
    return stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise CredentialsError(f"address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def diagnose_tls(
    address: str,
    ca_pem: bytes,
    cert_path: Path | None = None,
    key_path: Path | None = None,
    server_name: str | None = None,
    timeout: float = 5.0,
) -> str | None:
    """Explain a failed connection when the TLS layer is the cause; None otherwise.

    gRPC reports a refused client certificate only as "Socket closed" (TLS 1.3 checks
    the client certificate after the client considers the handshake done). This
    probe repeats the handshake with the standard library: the server closing the
    connection at once, twice in a row, means it refused the client certificate; a
    verification error means the server's certificate does not match ``ca.crt`` (or
    the name). None when TLS works or the failure looks transient (server
    unreachable, connection reset: a restarting server), so the caller retries.
    """
    first = _probe_tls(address, ca_pem, cert_path, key_path, server_name, timeout)
    if first is None or first[0] == "verify":
        return None if first is None else first[1]
    time.sleep(0.3)
    second = _probe_tls(address, ca_pem, cert_path, key_path, server_name, timeout)
    return first[1] if second is not None and second[0] == first[0] else None


def _probe_tls(address: str, ca_pem: bytes, cert_path: Path | None, key_path: Path | None, server_name: str | None,
               timeout: float) -> tuple[str, str] | None:
    import socket
    import ssl

    try:
        host, port = split_address(address)
    except CredentialsError:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
        if cert_path is not None and key_path is not None:
            ctx.load_cert_chain(str(cert_path), str(key_path))
    except (ssl.SSLError, OSError, ValueError) as err:
        return "verify", f"cannot load the credentials for TLS: {err}"
    ctx.set_alpn_protocols(["h2"])
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    try:
        try:
            tls = ctx.wrap_socket(raw, server_hostname=server_name or host)
        except ssl.SSLCertVerificationError as err:
            return "verify", (
                f"the pool at {address} presented a certificate that this client's ca.crt does not accept "
                f"({err.verify_message}); wrong ca.crt, or the server's name differs (--server-name)")
        except ssl.SSLError as err:
            if isinstance(err, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
                return None  # connection dropped mid-handshake: transient
            return "alert", f"TLS handshake with the pool at {address} failed: {err}"
        except OSError:
            return None  # reset or timeout: transient
        try:
            # HTTP/2 preface + empty SETTINGS: an accepting server answers with its SETTINGS.
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
            data = tls.recv(16)
        except (ssl.SSLError, OSError) as err:
            data, detail = b"", f" ({err})"
        else:
            detail = ""
        if data:
            return None
        which = f"the client certificate {cert_path}" if cert_path else "a connection without a client certificate"
        return "closed", (f"the pool at {address} refused {which} in the TLS handshake{detail}: it accepts only "
                          "certificates issued by its own CA (`plan-server certs issue`)")
    finally:
        raw.close()
