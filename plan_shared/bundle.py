"""Signed bundles: the only form in which synthetic images leave a site.

A *bundle* is a site output dir (``images/<class>/<id>.png``, ``manifest.json``,
``report.json``) described by a *bundle manifest* and signed with the site's
Ed25519 key. The bundle manifest is canonical JSON (sorted keys, no spaces,
ASCII)::

    {"format": "plan-bundle/1",
     "bundle_id": "<hex64>",          # sha256 of the canonical manifest without this key
     "site_id": "hospital-a",
     "generator_sha256": "<hex64>", "config_sha256": "<hex64>", "generator_round": 3 | null,
     "created": "<ISO time of the site manifest>",
     "signing_key_sha256": "<hex64>", # sha256 of the raw 32-byte public key that signs
     "report": {"sha256": "<hex64>", "size": 1234} | null,
     "images": [<privacy record of manifest.py> + {"size": <bytes>}, ...]}

The signature is Ed25519 over the exact manifest bytes. Everything in the
manifest derives from the output dir, so the same dir always yields the same bytes,
the same ``bundle_id`` and (Ed25519 being deterministic) the same signature: a
re-sent bundle is recognised as a duplicate.

Site side::

    key = load_signing_key(creds / "signing.key")
    signed = build_bundle(outdir, key)          # hashes every file, refuses a bad manifest
    signed.manifest_bytes, signed.signature     # what goes on the wire

Pool side::

    bm = parse_bundle_manifest(data, limits)    # BundleError names the problem
    verify_signature(data, signature, registered_public_raw, bm.site_id)
    check_bundle(bm, limits, policy)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from plan_shared.files import sha256_bytes, sha256_file
from plan_shared.manifest import (
    MAX_INT,
    ImageRecord,
    ManifestError,
    SiteManifest,
    is_count,
    is_hex64,
    is_safe_name,
    loads_strict,
    read_site_manifest,
    short_repr,
)

FORMAT = "plan-bundle/1"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_BUNDLE_KEYS = {
    "format",
    "bundle_id",
    "site_id",
    "generator_sha256",
    "config_sha256",
    "generator_round",
    "created",
    "signing_key_sha256",
    "report",
    "images",
}


class BundleError(ValueError):
    """A bundle is malformed, unsigned, forged or outside the limits; the message says why."""


@dataclass(frozen=True)
class BundleLimits:
    """What the pool accepts in one bundle (``plan-server pool serve`` options)."""

    max_images: int = 100_000
    max_image_bytes: int = 8 * 1024 * 1024
    max_bundle_bytes: int = 4 * 1024 * 1024 * 1024
    max_manifest_bytes: int = 128 * 1024 * 1024
    max_report_bytes: int = 16 * 1024 * 1024


class PolicyError(BundleError):
    """The bundle is well-formed but the federation's policy refuses it (gRPC FAILED_PRECONDITION)."""


#: Largest image the pool decodes when the policy fixes no image size (checked from IHDR before decompression).
DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class ThresholdPolicy:
    """The federation's policy the pool enforces on every bundle (None = no bound).

    Made from the coordinator's ``policy:`` section (:func:`plan_shared.policy.policy_from_config`),
    read from the ``pool serve --policy`` file, or from the ``--max-tau-id`` etc. options.
    Checked by :func:`plan_shared.policy.check_policy` (manifest, then report.json).
    """

    max_tau_id: float | None = None
    max_tau_indep: float | None = None
    min_delta: float | None = None
    min_delta_quantile: float | None = None      # report.json filter.delta_quantile
    min_k: int | None = None                     # report.json anchors.k
    min_planted: int | None = None               # report.json filter.planted_total
    all_planted_rejected: bool = False              # filter.planted_rejected == planted_total
    methods: tuple[str, ...] | None = None
    image_size: int | None = None                # exact PNG width = height
    channels: int | None = None                  # 1 (grey) or 3 (RGB)
    num_classes: int | None = None               # labels in [0, num_classes)
    max_pixels: int = DEFAULT_MAX_PIXELS
    generator_sha256: str | None = None          # weights digest of the federation's final G_ema
    require_generator: bool = False                 # True: a bundle needs generator_sha256 (null = not yet known)

    @property
    def needs_report(self) -> bool:
        return (self.min_delta_quantile is not None or self.min_k is not None or self.min_planted is not None
                or self.all_planted_rejected)


@dataclass(frozen=True)
class BundleImage:
    record: ImageRecord
    size: int


@dataclass
class BundleManifest:
    """Parsed, schema-checked bundle manifest (signature not yet verified)."""

    bundle_id: str
    site_id: str
    generator_sha256: str
    config_sha256: str
    generator_round: int | None
    created: str
    signing_key_sha256: str
    report_sha256: str | None
    report_size: int
    images: list[BundleImage] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(i.size for i in self.images) + self.report_size


@dataclass
class SignedBundle:
    """A bundle ready to send: manifest bytes, signature and where its files are."""

    outdir: Path
    manifest_bytes: bytes
    signature: bytes
    manifest: BundleManifest

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id

    def image_path(self, index: int) -> Path:
        return self.outdir / self.manifest.images[index].record.file

    @property
    def report_path(self) -> Path:
        return self.outdir / "report.json"


# ---------------------------------------------------------------- helpers


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signing_key_to_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_to_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_fingerprint(public_raw: bytes) -> str:
    """sha256 hex of the raw 32-byte Ed25519 public key."""
    return sha256_bytes(public_raw)


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    p = Path(path)
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except FileNotFoundError:
        raise BundleError(f"signing key not found: {p}") from None
    except ValueError as err:
        raise BundleError(f"{p}: not a PEM private key: {err}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{p}: not an Ed25519 key")
    return key


def load_public_key_pem(data: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError("not an Ed25519 public key")
    return key


# ---------------------------------------------------------------- building (site side)


def bundle_body(site: SiteManifest, signing_key_sha256: str, sizes: list[int], report: tuple[str, int] | None) -> dict[str, Any]:
    images = []
    for rec, size in zip(site.images, sizes):
        d = rec.to_dict()
        d["size"] = size
        images.append(d)
    return {
        "format": FORMAT,
        "site_id": site.site_id,
        "generator_sha256": site.generator_sha256,
        "config_sha256": site.config_sha256,
        "generator_round": site.generator_round,
        "created": site.created,
        "signing_key_sha256": signing_key_sha256,
        "report": None if report is None else {"sha256": report[0], "size": report[1]},
        "images": images,
    }


def with_bundle_id(body: dict[str, Any]) -> bytes:
    """Canonical manifest bytes with ``bundle_id`` = sha256 of the canonical body without it."""
    body = dict(body)
    body.pop("bundle_id", None)
    bid = sha256_bytes(canonical_json(body))
    body["bundle_id"] = bid
    return canonical_json(body)


def build_bundle(
    outdir: str | Path,
    signing_key: Ed25519PrivateKey,
    site_id: str | None = None,
    site_manifest: SiteManifest | None = None,
) -> SignedBundle:
    """Hash every image of ``outdir``, check it against ``manifest.json`` and sign.

    ``site_id``, when given, must equal the manifest's site id (the credentials' name).
    Refuses (BundleError) a missing file, a sha256 that differs from the manifest, a
    record that fails its own thresholds, or an empty bundle.
    """
    out = Path(outdir)
    try:
        site = site_manifest or read_site_manifest(out / "manifest.json")
    except ManifestError as err:
        raise BundleError(str(err)) from None
    if site_id is not None and site.site_id != site_id:
        raise BundleError(
            f"manifest.json site_id {site.site_id!r} is not this site's identity {site_id!r} "
            "(the credentials' name); fix site_id in the site configuration"
        )
    if not site.images:
        raise BundleError(f"{out / 'manifest.json'}: no images to export")
    sizes = []
    for i, rec in enumerate(site.images):
        if not rec.passes():
            raise BundleError(
                f"images[{i}] (id {rec.id!r}) fails its own thresholds: {'; '.join(rec.failures())}"
            )
        path = out / rec.file
        if not path.is_file():
            raise BundleError(f"images[{i}] (id {rec.id!r}): file {rec.file} not found in {out}")
        digest, size = sha256_file(path)
        if digest != rec.sha256:
            raise BundleError(
                f"images[{i}] (id {rec.id!r}): {rec.file} has sha256 {digest[:12]}…, manifest says {rec.sha256[:12]}…"
            )
        sizes.append(size)
    report_path = out / "report.json"
    report = sha256_file(report_path) if report_path.is_file() else None
    pub_raw = public_key_raw(signing_key.public_key())
    body = bundle_body(site, key_fingerprint(pub_raw), sizes, report)
    manifest_bytes = with_bundle_id(body)
    signature = signing_key.sign(manifest_bytes)
    return SignedBundle(out, manifest_bytes, signature, parse_bundle_manifest(manifest_bytes))


def sign_manifest(manifest_bytes: bytes, signing_key: Ed25519PrivateKey) -> bytes:
    return signing_key.sign(manifest_bytes)


# ---------------------------------------------------------------- checking (pool side)


def parse_bundle_manifest(data: bytes, limits: BundleLimits | None = None) -> BundleManifest:
    """Parse and schema-check manifest bytes; also checks that ``bundle_id`` matches the content."""
    limits = limits or BundleLimits()
    if len(data) > limits.max_manifest_bytes:
        raise BundleError(f"bundle manifest is {len(data)} bytes, limit {limits.max_manifest_bytes}")
    try:
        raw = loads_strict(data, "bundle manifest")
    except ManifestError as err:
        raise BundleError(str(err).replace("bundle manifest: not valid JSON", "bundle manifest is not valid JSON")) from None
    if not isinstance(raw, dict):
        raise BundleError("bundle manifest: the top level must be an object")
    if raw.get("format") != FORMAT:
        raise BundleError(f"bundle manifest: key 'format' = {short_repr(raw.get('format'))}: expected {FORMAT!r}")
    unknown = sorted(set(raw) - _BUNDLE_KEYS)
    if unknown:
        raise BundleError(f"bundle manifest: unknown key '{unknown[0]}'")
    missing = sorted(_BUNDLE_KEYS - set(raw))
    if missing:
        raise BundleError(f"bundle manifest: missing key '{missing[0]}'")
    if not is_safe_name(raw["site_id"]):
        raise BundleError(f"bundle manifest: key 'site_id' = {short_repr(raw['site_id'])}: must be a plain name")
    for key in ("bundle_id", "generator_sha256", "config_sha256", "signing_key_sha256"):
        if not is_hex64(raw[key]):
            raise BundleError(f"bundle manifest: key '{key}' must be 64 lower-case hex digits")
    gr = raw["generator_round"]
    if gr is not None and not is_count(gr):
        raise BundleError(f"bundle manifest: key 'generator_round' = {short_repr(gr)}: must be an integer in "
                          f"[0, {MAX_INT}] or null")
    if not isinstance(raw["created"], str):
        raise BundleError("bundle manifest: key 'created' must be a string")
    report = raw["report"]
    report_sha, report_size = None, 0
    if report is not None:
        if (
            not isinstance(report, dict)
            or set(report) != {"sha256", "size"}
            or not is_hex64(report["sha256"])
            or not _is_size(report["size"])
        ):
            raise BundleError(f"bundle manifest: key 'report' = {short_repr(report)}: must be null or "
                              f"{{sha256: 64 hex digits, size: integer in [0, {MAX_INT}]}}")
        report_sha, report_size = report["sha256"], report["size"]
    if not isinstance(raw["images"], list):
        raise BundleError("bundle manifest: key 'images' must be a list")
    images = []
    seen: set[str] = set()
    for i, item in enumerate(raw["images"]):
        if not isinstance(item, dict):
            raise BundleError(f"bundle manifest: images[{i}]: must be an object")
        item = dict(item)
        size = item.pop("size", None)
        if not _is_size(size):
            raise BundleError(f"bundle manifest: images[{i}]: key 'size' = {short_repr(size)}: must be an integer in "
                              f"[0, {MAX_INT}]")
        try:
            rec = ImageRecord.from_dict(item, f"images[{i}]")
        except ManifestError as err:
            raise BundleError(f"bundle manifest: {err}") from None
        if rec.id in seen:
            raise BundleError(f"bundle manifest: images[{i}] (id {rec.id!r}): duplicate id")
        seen.add(rec.id)
        images.append(BundleImage(rec, size))
    # Last: every value is now known to be canonical-JSON-safe (finite numbers, bounded integers).
    body = {k: v for k, v in raw.items() if k != "bundle_id"}
    try:
        expected_id = sha256_bytes(canonical_json(body))
    except (ValueError, TypeError) as err:
        raise BundleError(f"bundle manifest: not canonical JSON: {err}") from None
    if raw["bundle_id"] != expected_id:
        raise BundleError("bundle manifest: 'bundle_id' does not match its content")
    return BundleManifest(
        bundle_id=raw["bundle_id"],
        site_id=raw["site_id"],
        generator_sha256=raw["generator_sha256"],
        config_sha256=raw["config_sha256"],
        generator_round=gr,
        created=raw["created"],
        signing_key_sha256=raw["signing_key_sha256"],
        report_sha256=report_sha,
        report_size=report_size,
        images=images,
    )


def verify_signature(manifest_bytes: bytes, signature: bytes, public_raw: bytes, site_id: str) -> None:
    """Raise BundleError unless ``signature`` is the Ed25519 signature of the bytes by that key."""
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, manifest_bytes)
    except (InvalidSignature, ValueError):
        raise BundleError(f"signature does not verify with the registered key of site {site_id!r}") from None


def check_bundle(bm: BundleManifest, limits: BundleLimits, policy: ThresholdPolicy | None = None) -> None:
    """Limits and privacy checks of a parsed manifest; raises BundleError with the first reason."""
    if not bm.images:
        raise BundleError("bundle has no images")
    if len(bm.images) > limits.max_images:
        raise BundleError(f"bundle has {len(bm.images)} images, limit {limits.max_images}")
    if bm.report_size > limits.max_report_bytes:
        raise BundleError(f"report.json is {bm.report_size} bytes, limit {limits.max_report_bytes}")
    for i, im in enumerate(bm.images):
        if im.size > limits.max_image_bytes:
            raise BundleError(
                f"images[{i}] (id {im.record.id!r}) is {im.size} bytes, limit {limits.max_image_bytes}"
            )
    total = bm.total_bytes
    if total > limits.max_bundle_bytes:
        raise BundleError(f"bundle is {total} bytes, limit {limits.max_bundle_bytes}")
    for i, im in enumerate(bm.images):
        rec = im.record
        if not rec.passes():
            raise BundleError(
                f"images[{i}] (id {rec.id!r}) fails its own privacy thresholds: {'; '.join(rec.failures())}"
            )
    if policy is not None:
        from plan_shared.policy import check_policy

        check_policy(policy, bm)


def unique_images(bm: BundleManifest) -> dict[str, int]:
    """sha256 → declared size over the bundle's images (identical images counted once)."""
    out: dict[str, int] = {}
    for im in bm.images:
        out.setdefault(im.record.sha256, im.size)
    return out


def iter_file_chunks(path: str | Path, chunk_size: int) -> Iterable[bytes]:
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk_size)
            if not b:
                return
            yield b


def _is_size(v: Any) -> bool:
    return is_count(v)


__all__ = [
    "FORMAT",
    "PNG_MAGIC",
    "BundleError",
    "BundleLimits",
    "ThresholdPolicy",
    "PolicyError",
    "DEFAULT_MAX_PIXELS",
    "BundleImage",
    "BundleManifest",
    "SignedBundle",
    "build_bundle",
    "parse_bundle_manifest",
    "verify_signature",
    "check_bundle",
    "canonical_json",
    "sha256_file",
    "sha256_bytes",
    "generate_signing_key",
    "signing_key_to_pem",
    "public_key_to_pem",
    "public_key_raw",
    "key_fingerprint",
    "load_signing_key",
    "load_public_key_pem",
    "unique_images",
    "iter_file_chunks",
]
