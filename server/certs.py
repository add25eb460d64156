"""Federation credentials: CA, server certificate, site and reader identities.

``plan-server certs init|issue|revoke|ls``. The layout of the folder it writes is
documented once, in :mod:`plan_shared.credentials`. Private keys are written with
mode 0600 and never replaced without ``--force``.

TLS keys are EC P-256; bundle signing keys Ed25519; the Flower SuperNode auth key
EC P-384 in OpenSSH format (what ``flower-supernode --auth-supernode-private-key``
and ``flwr supernode register`` read).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from plan_shared import credentials as C
from plan_shared.bundle import generate_signing_key, public_key_raw, public_key_to_pem, signing_key_to_pem
from plan_shared.manifest import is_safe_name

ORG = "PLAN federation"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")


class CertsError(ValueError):
    """A credentials operation was refused; the message says why."""


# ---------------------------------------------------------------- key and certificate primitives


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str, ou: Optional[str] = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG)]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def make_ca(common_name: str = "PLAN federation CA", days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    eku: list,
    sans: Optional[list] = None,
    days: int = 730,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_server_cert(ca_key, ca_cert, hosts: list[str], days: int = 730):
    return _leaf(ca_key, ca_cert, _name(hosts[0], "server"), [ExtendedKeyUsageOID.SERVER_AUTH], [_san(h) for h in hosts], days)


def make_client_cert(ca_key, ca_cert, name: str, role: str, days: int = 730):
    return _leaf(ca_key, ca_cert, _name(name, role), [ExtendedKeyUsageOID.CLIENT_AUTH], [x509.DNSName(name)], days)


def make_node_key() -> tuple[bytes, bytes]:
    """Flower SuperNode auth key pair: EC P-384, (OpenSSH private PEM, OpenSSH public line)."""
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return priv, pub


# ---------------------------------------------------------------- registry


def registry_path(certs: str | Path) -> Path:
    return Path(certs) / C.REGISTRY


def read_registry(certs: str | Path) -> dict:
    p = registry_path(certs)
    if not p.is_file():
        raise CertsError(f"{p}: missing (run `plan-server certs init --dir {Path(certs)}` first)")
    try:
        reg = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise CertsError(f"{p}: not valid JSON: {err}") from None
    if not isinstance(reg, dict) or not isinstance(reg.get("identities"), dict):
        raise CertsError(f"{p}: no 'identities' object")
    return reg


def _write_registry(certs: Path, reg: dict) -> None:
    C.write_public(registry_path(certs), (json.dumps(reg, indent=1, sort_keys=True) + "\n").encode())


@contextmanager
def _registry_lock(certs: Path) -> Iterator[None]:
    """Serialise concurrent `certs` commands on one folder."""
    with open(certs / ".registry.lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _load_ca(certs: Path):
    kp, cp = certs / C.CA_KEY, certs / C.CA_CERT
    if not kp.is_file() or not cp.is_file():
        raise CertsError(f"{certs}: no CA here (run `plan-server certs init --dir {certs}` first)")
    key = serialization.load_pem_private_key(kp.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(cp.read_bytes())
    return key, cert


# ---------------------------------------------------------------- operations


def init_ca(
    certs: str | Path,
    hosts: Optional[list[str]] = None,
    force: bool = False,
    renew_server: bool = False,
    days: int = 3650,
) -> list[str]:
    """Create CA, server certificate and an empty registry. Returns the files written.

    ``renew_server`` keeps the CA and the registry and only re-issues the server
    certificate (e.g. for new host names). ``force`` replaces the CA: every credential
    issued before stops working, and the registry starts empty.
    """
    d = Path(certs)
    d.mkdir(parents=True, exist_ok=True)
    hosts = list(hosts or DEFAULT_HOSTS)
    written = []
    if renew_server:
        ca_key, ca_cert = _load_ca(d)
    else:
        if (d / C.CA_KEY).exists() and not force:
            raise CertsError(
                f"{d / C.CA_KEY}: a CA already exists; refusing to replace it "
                "(--renew-server re-issues only the server certificate; --force replaces the CA "
                "and invalidates every issued credential)"
            )
        ca_key, ca_cert = make_ca(days=days)
        C.write_secret(d / C.CA_KEY, _key_pem(ca_key), overwrite=force)
        C.write_public(d / C.CA_CERT, _cert_pem(ca_cert))
        written += [C.CA_KEY, C.CA_CERT]
        if force:
            for sub in C.ROLE_DIRS.values():
                shutil.rmtree(d / sub, ignore_errors=True)
        _write_registry(d, {"version": 1, "ca_serial": format(ca_cert.serial_number, "x"), "identities": {}})
        written.append(C.REGISTRY)
    skey, scert = make_server_cert(ca_key, ca_cert, hosts, days=min(days, 730))
    C.write_secret(d / C.SERVER_KEY, _key_pem(skey), overwrite=force or renew_server)
    C.write_public(d / C.SERVER_CERT, _cert_pem(scert))
    written += [C.SERVER_KEY, C.SERVER_CERT]
    return written


def issue(certs: str | Path, name: str, role: str, force: bool = False, days: int = 730) -> Path:
    """Issue a site or reader identity; returns its folder (``sites/NAME`` or ``readers/NAME``)."""
    d = Path(certs)
    if role not in C.ROLES:
        raise CertsError(f"role must be one of {', '.join(C.ROLES)}, got {role!r}")
    if not is_safe_name(name):
        raise CertsError(f"name {name!r}: use letters, digits, '.', '_' or '-' (it is a folder and the site id)")
    ca_key, ca_cert = _load_ca(d)
    with _registry_lock(d):
        reg = read_registry(d)
        old = reg["identities"].get(name)
        if old is not None and not force:
            state = "revoked" if old.get("revoked") else "active"
            raise CertsError(
                f"identity {name!r} already exists ({old['role']}, {state}); refusing to replace it "
                "(--force issues new keys and a new certificate; the old certificate stops working)"
            )
        if old is not None and old["role"] != role:
            # Different role: the other role's folder must not stay behind with valid-looking keys.
            shutil.rmtree(C.identity_dir(d, name, old["role"]), ignore_errors=True)
        out = C.identity_dir(d, name, role)
        out.mkdir(parents=True, exist_ok=True)
        os.chmod(out, 0o700)
        key, cert = make_client_cert(ca_key, ca_cert, name, role, days=days)
        cert_pem = _cert_pem(cert)
        C.write_secret(out / C.CLIENT_KEY, _key_pem(key), overwrite=force)
        C.write_public(out / C.CLIENT_CERT, cert_pem)
        C.write_public(out / C.CA_CERT, _cert_pem(ca_cert))
        entry = {
            "name": name,
            "role": role,
            "serial": format(cert.serial_number, "x"),
            "cert_sha256": hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
            "issued": _now().isoformat(timespec="seconds"),
            "revoked": False,
            "revoked_at": None,
            "ed25519_public": None,
            "node_public_key": None,
            "node_public_key_path": None,
        }
        if role == "site":
            sk = generate_signing_key()
            C.write_secret(out / C.SIGNING_KEY, signing_key_to_pem(sk), overwrite=force)
            C.write_public(out / C.SIGNING_PUB, public_key_to_pem(sk.public_key()))
            entry["ed25519_public"] = public_key_raw(sk.public_key()).hex()
            node_priv, node_pub = make_node_key()
            C.write_secret(out / C.NODE_KEY, node_priv, overwrite=force)
            C.write_public(out / C.NODE_PUB, node_pub + b"\n")
            entry["node_public_key"] = node_pub.decode()
            entry["node_public_key_path"] = str((out / C.NODE_PUB).relative_to(d))
        C.write_public(out / C.IDENTITY, (json.dumps({"name": name, "role": role}) + "\n").encode())
        reg["identities"][name] = entry
        _write_registry(d, reg)
    return out


def revoke(certs: str | Path, name: str) -> bool:
    """Mark an identity revoked. Returns False when it already was."""
    d = Path(certs)
    with _registry_lock(d):
        reg = read_registry(d)
        entry = reg["identities"].get(name)
        if entry is None:
            raise CertsError(f"no identity {name!r} in {registry_path(d)}")
        if entry.get("revoked"):
            return False
        entry["revoked"] = True
        entry["revoked_at"] = _now().isoformat(timespec="seconds")
        _write_registry(d, reg)
    return True


# ---------------------------------------------------------------- CLI

app = typer.Typer(
    help="Federation credentials: CA, server certificate, site and reader identities.\n\n"
    "Example: plan-server certs init --dir certs && plan-server certs issue --dir certs --name hospital-a --role site",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(1)


@app.command("init")
def init_cmd(
    dir: Path = typer.Option(..., "--dir", help="Credentials folder (created)."),
    host: Optional[List[str]] = typer.Option(
        None, "--host", help="Server name or IP for the certificate's SANs; repeat. Default: localhost, 127.0.0.1."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing CA (invalidates every issued credential)."),
    renew_server: bool = typer.Option(False, "--renew-server", help="Keep the CA; re-issue only the server certificate."),
    days: int = typer.Option(3650, "--days", min=1, help="CA validity in days (server: at most 730)."),
) -> None:
    """Create the federation CA, the server certificate and an empty registry.

    Example: plan-server certs init --dir certs --host pool.example.org --host 10.0.0.5
    """
    try:
        written = init_ca(dir, host or None, force=force, renew_server=renew_server, days=days)
    except (CertsError, C.CredentialsError) as err:
        _fail(str(err))
    typer.echo(f"wrote {', '.join(written)} in {dir} (server names: {', '.join(host or DEFAULT_HOSTS)})")


@app.command("issue")
def issue_cmd(
    dir: Path = typer.Option(..., "--dir", help="Credentials folder made by `certs init`."),
    name: str = typer.Option(..., "--name", "--site", help="Identity name (site id for a site)."),
    role: str = typer.Option("site", "--role", help="site (pushes bundles) or reader (lists and pulls)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing identity's keys and certificate."),
    days: int = typer.Option(730, "--days", min=1, help="Certificate validity in days."),
) -> None:
    """Issue a site or reader identity; give the printed folder to the hospital/researcher.

    Example: plan-server certs issue --dir certs --name hospital-a --role site
    """
    try:
        out = issue(dir, name, role, force=force, days=days)
    except (CertsError, C.CredentialsError) as err:
        _fail(str(err))
    typer.echo(f"issued {role} {name!r}: {out}")
    if role == "site":
        typer.echo(f"  Flower SuperNode auth public key: {out / C.NODE_PUB} (register with `flwr supernode register`)")


@app.command("revoke")
def revoke_cmd(
    dir: Path = typer.Option(..., "--dir", help="Credentials folder."),
    name: str = typer.Option(..., "--name", "--site", help="Identity to revoke."),
) -> None:
    """Revoke an identity: the pool refuses its certificate from the next call on.

    Example: plan-server certs revoke --dir certs --name hospital-a
    """
    try:
        changed = revoke(dir, name)
    except (CertsError, C.CredentialsError) as err:
        _fail(str(err))
    typer.echo(f"revoked {name!r}" if changed else f"{name!r} was already revoked")


@app.command("ls")
def ls_cmd(dir: Path = typer.Option(..., "--dir", help="Credentials folder.")) -> None:
    """List the registered identities.

    Example: plan-server certs ls --dir certs
    """
    try:
        reg = read_registry(dir)
    except CertsError as err:
        _fail(str(err))
    for name, e in sorted(reg["identities"].items()):
        state = f"revoked {e.get('revoked_at')}" if e.get("revoked") else "active"
        typer.echo(f"{name:24s} {e['role']:7s} serial {e['serial'][:16]}  {state}")
