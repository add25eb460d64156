"""Federation credentials: CA, server certificate, enrolment of site and reader identities.

``plan-server certs init|enroll|issue|revoke|ls``. The layout of the folders is
documented once, in :mod:`plan_shared.credentials`; the enrolment files in
:mod:`plan_shared.enrolment`.

The coordinator never holds a site's or reader's private key: a site makes its keys
with ``plan-client keys init`` and sends the public enrolment file; ``certs enroll``
verifies it, signs the certificate (EC P-256 TLS key, OU = role), registers the
Ed25519 bundle-signing key and the Flower node key (EC P-384, OpenSSH) in
``registry.json`` and writes a response (certificate + CA certificate) for
``plan-client keys install``. ``certs issue`` runs both halves on one machine through
the same code, into a folder outside CERTS (demo, simulation, tests, the
coordinator's own reader). The CA and server keys are written 0600 and never
replaced without ``--force``.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import ipaddress
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from plan_shared import credentials as C
from plan_shared import enrolment as E
from plan_shared.enrolment import make_node_key  # noqa: F401  (re-exported: tests make rogue node keys with it)
from plan_shared.manifest import is_safe_name

ORG = E.ORG
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


def _name(cn: str, ou: str | None = None) -> x509.Name:
    return E.subject_name(cn, ou)


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
    sans: list | None = None,
    days: int = 730,
    public_key: CertificatePublicKeyTypes | None = None,
) -> tuple[ec.EllipticCurvePrivateKey | None, x509.Certificate]:
    """A leaf certificate; for a new key pair (returned) unless ``public_key`` is given (then None)."""
    key = None if public_key is not None else ec.generate_private_key(ec.SECP256R1())
    now = _now()
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key if public_key is not None else _new_key(key).public_key())
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


def _new_key(key: ec.EllipticCurvePrivateKey | None) -> ec.EllipticCurvePrivateKey:
    if key is None:
        raise ValueError("a leaf certificate needs a public key or a new key pair")
    return key


def make_server_cert(ca_key, ca_cert, hosts: list[str], days: int = 730):
    return _leaf(ca_key, ca_cert, _name(hosts[0], "server"), [ExtendedKeyUsageOID.SERVER_AUTH], [_san(h) for h in hosts], days)


def sign_client_csr(ca_key, ca_cert, csr: x509.CertificateSigningRequest, name: str, role: str, days: int = 730):
    """Certificate for a verified CSR's key: CN=name, OU=role, client auth, SAN DNS:name (subject is ours, not the CSR's)."""
    _, cert = _leaf(ca_key, ca_cert, _name(name, role), [ExtendedKeyUsageOID.CLIENT_AUTH], [x509.DNSName(name)], days,
                    public_key=csr.public_key())
    return cert


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
    hosts: list[str] | None = None,
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


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def enroll(
    certs: str | Path,
    enrolment: str | Path,
    role: str = "site",
    name: str | None = None,
    force: bool = False,
    days: int = 730,
) -> dict:
    """Verify an enrolment file, sign its certificate, register its public keys; returns the response.

    ``role`` (and ``name`` when given) is what the coordinator expects: an enrolment
    asking for anything else is refused. A name already enrolled is refused unless
    ``force`` (its old certificate then stops working at the pool). A signing or
    node key registered for another identity is refused: it would let one identity
    act as two.
    """
    d = Path(certs)
    if role not in C.ROLES:
        raise CertsError(f"role must be one of {', '.join(C.ROLES)}, got {role!r}")
    try:
        en = E.read_enrolment(enrolment)
    except E.EnrolmentError as err:
        raise CertsError(str(err)) from None
    if en.role != role:
        raise CertsError(f"{en.path}: role: the enrolment asks for {en.role!r}, the coordinator expects {role!r} "
                         f"(--role {en.role} if that is intended)")
    if name is not None and en.name != name:
        raise CertsError(f"{en.path}: name: the enrolment is for {en.name!r}, expected {name!r}")
    ca_key, ca_cert = _load_ca(d)
    with _registry_lock(d):
        reg = read_registry(d)
        old = reg["identities"].get(en.name)
        if old is not None and not force:
            state = "revoked" if old.get("revoked") else "active"
            raise CertsError(
                f"{en.path}: name: identity {en.name!r} is already enrolled ({old['role']}, {state}); refusing to "
                "replace it (--force enrols the new keys; the old certificate stops working)"
            )
        for other, e in reg["identities"].items():
            if other == en.name:
                continue
            if en.ed25519_public is not None and e.get("ed25519_public") == en.ed25519_public:
                raise CertsError(f"{en.path}: ed25519_public: already registered for {other!r}")
            if en.node_public_key is not None and e.get("node_public_key") == en.node_public_key:
                raise CertsError(f"{en.path}: node_public_key: already registered for {other!r}")
        cert = sign_client_csr(ca_key, ca_cert, en.csr, en.name, en.role, days=days)
        reg["identities"][en.name] = {
            "name": en.name,
            "role": en.role,
            "serial": format(cert.serial_number, "x"),
            "cert_sha256": hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
            "issued": _now().isoformat(timespec="seconds"),
            "revoked": False,
            "revoked_at": None,
            "ed25519_public": en.ed25519_public,
            "node_public_key": en.node_public_key,
            "fingerprints": en.fingerprints,
        }
        _write_registry(d, reg)
    return E.response_document(en.name, en.role, _cert_pem(cert), _cert_pem(ca_cert))


def write_response(response: dict, out: str | Path) -> Path:
    p = Path(out)
    C.write_public(p, (json.dumps(response, indent=1) + "\n").encode())
    return p


def issue(certs: str | Path, name: str, role: str, out: str | Path, force: bool = False, days: int = 730) -> Path:
    """Both halves on one machine: ``keys init`` in ``out``, ``certs enroll``, ``keys install``; returns ``out``.

    For the demo, simulation, tests and the coordinator's own reader identity. ``out``
    is the identity's own folder and must lie outside ``certs`` (the CA folder holds
    no identity's private key). When ``out`` already holds keys from an earlier
    ``keys init`` that were never installed, its enrolment file is enrolled as it is.
    """
    d, o = Path(certs), Path(out)
    if role not in C.ROLES:
        raise CertsError(f"role must be one of {', '.join(C.ROLES)}, got {role!r}")
    if not is_safe_name(name):
        raise CertsError(f"name {name!r}: use letters, digits, '.', '_' or '-' (it is a folder and the site id)")
    if _inside(o, d):
        raise CertsError(f"{o}: inside the credentials folder {d}; an identity's keys must live outside it "
                         "(the coordinator holds no site's or reader's private key)")
    _load_ca(d)  # fail before making keys
    try:
        pending = (o / E.ENROLMENT).is_file() and not (o / C.CLIENT_CERT).exists()
        if pending:
            meta = json.loads((o / C.IDENTITY).read_text())
            if (meta.get("name"), meta.get("role")) != (name, role):
                raise CertsError(f"{o}: holds the keys of {meta.get('name')!r}/{meta.get('role')!r}, not {name!r}/{role!r}")
        else:
            E.init_keys(o, name, role)
        response = write_response(enroll(d, o / E.ENROLMENT, role=role, name=name, force=force, days=days),
                                  o / f"{name}.response.json")
        E.install_certificate(o, response)
    except (E.EnrolmentError, json.JSONDecodeError, OSError) as err:
        raise CertsError(str(err)) from None
    return o


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
    help="Federation credentials: CA, server certificate, enrolment of site and reader identities.\n\n"
    "Example: plan-server certs init --dir certs && plan-server certs enroll hospital-a.enrolment.json --dir certs",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(1)


@app.command("init")
def init_cmd(
    dir: Path = typer.Option(..., "--dir", help="Credentials folder (created)."),
    host: list[str] | None = typer.Option(
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


@app.command("enroll")
def enroll_cmd(
    file: Path = typer.Argument(..., help="The enrolment file a site or reader made with `plan-client keys init`."),
    dir: Path = typer.Option(..., "--dir", help="Credentials folder made by `certs init`."),
    out: Path | None = typer.Option(None, "--out", help="Response file to send back (default: NAME.response.json next to FILE)."),
    role: str = typer.Option("site", "--role", help="The role you expect: site (pushes bundles) or reader (lists and pulls)."),
    name: str | None = typer.Option(None, "--name", help="The name you expect (refused if the file says another)."),
    force: bool = typer.Option(False, "--force", help="Replace an identity already enrolled (its old certificate stops working)."),
    days: int = typer.Option(730, "--days", min=1, help="Certificate validity in days."),
) -> None:
    """Verify an enrolment file, sign its certificate, register its public keys; write the response.

    Compare the printed fingerprints with the ones the site read out to you before sending
    the response back. Example: plan-server certs enroll hospital-a/enrolment.json --dir certs --name hospital-a
    """
    try:
        resp = enroll(dir, file, role=role, name=name, force=force, days=days)
        path = write_response(resp, out or Path(file).with_name(f"{resp['name']}.response.json"))
        fps = read_registry(dir)["identities"][resp["name"]]["fingerprints"]
    except (CertsError, C.CredentialsError, OSError) as err:
        _fail(str(err))
    typer.echo(f"enrolled {resp['role']} {resp['name']!r} (serial {resp['serial'][:16]}); response: {path}")
    for k in ("tls", "signing", "node"):
        if fps.get(k):
            typer.echo(f"  {k:8s} key sha256 {fps[k]}")
    typer.echo(f"  CA certificate sha256 {E.ca_fingerprint(resp['ca_certificate'].encode())}")


@app.command("issue")
def issue_cmd(
    dir: Path = typer.Option(..., "--dir", help="Credentials folder made by `certs init`."),
    name: str = typer.Option(..., "--name", "--site", help="Identity name (site id for a site)."),
    out: Path = typer.Option(..., "--out", help="The identity's own folder (made; must lie outside --dir)."),
    role: str = typer.Option("site", "--role", help="site (pushes bundles) or reader (lists and pulls)."),
    force: bool = typer.Option(False, "--force", help="Replace an identity already enrolled."),
    days: int = typer.Option(730, "--days", min=1, help="Certificate validity in days."),
) -> None:
    """One machine only: keys init + enroll + keys install in one step, into --out outside --dir.

    For a demo, a test bed or the coordinator's own reader. A hospital makes its keys on its
    own machine instead (`plan-client keys init`, then `certs enroll`).
    Example: plan-server certs issue --dir certs --name coordinator --role reader --out state/reader
    """
    try:
        o = issue(dir, name, role, out, force=force, days=days)
    except (CertsError, C.CredentialsError) as err:
        _fail(str(err))
    typer.echo(f"issued {role} {name!r}: {o}")
    if role == "site":
        typer.echo(f"  Flower SuperNode auth public key: {o / C.NODE_PUB} (registered in {registry_path(dir)})")


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
