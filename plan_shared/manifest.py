"""Per-image privacy records and the site ``manifest.json`` that holds them.

The site pipeline (B6 privacy filter) writes one record per accepted image into
``OUTDIR/manifest.json``; the export signs them into a bundle and the pool service
re-checks every record before it stores anything. This module is the single
definition of that format.

Site ``manifest.json``::

    {"site_id": "hospital-a",
     "generator_sha256": "<hex64>",          # plan_shared.gan.generator_digest of the G_ema used (weights only)
     "config_sha256": "<hex64>",             # PlanConfig.digest() of the run
     "created": "2025-01-31T12:00:00+00:00", # ISO 8601
     "generator_round": 3,                   # optional: federated round of G (int or null)
     "images": [ <record>, ... ]}

One record (every key required, no other key allowed)::

    {"id": "p0003_t07", "file": "images/<class_name>/<id>.png", "sha256": "<hex64>",
     "label": 1, "class_name": "pneumonia", "method": "plan" | "linear" | "random",
     "path_id": 3 | null, "position": 7 | null,
     "max_id_prob": 0.12, "indep_id_prob": 0.08, "dcr": 4.2,
     "thresholds": {"tau_id": 0.5, "tau_indep": 0.5, "delta": 3.1}}

A record *passes* when ``max_id_prob < tau_id`` and ``indep_id_prob < tau_indep``
and ``dcr > delta``. Every validation error names the record (index and id) and
the key::

    records = read_site_manifest(outdir / "manifest.json")   # raises ManifestError
    rejected = [r for r in records.images if not r.passes()]
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from plan_shared.config import METHODS, Method  # noqa: F401  (re-exported; the one Method literal lives in the schema)
from plan_shared.files import atomic_write

THRESHOLD_KEYS = ("tau_id", "tau_indep", "delta")
RECORD_KEYS = (
    "id",
    "file",
    "sha256",
    "label",
    "class_name",
    "method",
    "path_id",
    "position",
    "max_id_prob",
    "indep_id_prob",
    "dcr",
    "thresholds",
)
SITE_KEYS_REQUIRED = ("site_id", "generator_sha256", "config_sha256", "created", "images")
SITE_KEYS_OPTIONAL = ("generator_round",)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# ids, class names and site ids become path components: keep them boring.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ManifestError(ValueError):
    """A manifest or record is malformed; the message names the record and the key."""


def is_hex64(value: Any) -> bool:
    return isinstance(value, str) and bool(_HEX64.match(value))


def is_safe_name(value: Any) -> bool:
    return isinstance(value, str) and bool(_SAFE_NAME.match(value)) and value not in (".", "..")


def safe_class_names(names: list[str]) -> list[str]:
    """Class names as they go into records, folders and the pool: each made a safe name
    (accents dropped, other characters -> ``_``; e.g. ``"normal, benign"`` -> ``"normal_benign"``),
    its number where nothing is left, unique (a clash gets ``_<label>``)."""
    out: list[str] = []
    for k, name in enumerate(names):
        ascii_ = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
        s = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_.strip()).strip("._-")[:64]
        if not is_safe_name(s):
            s = str(k)
        if s in out:
            s = f"{s}_{k}"
        out.append(s)
    return out


@dataclass(frozen=True)
class Thresholds:
    """The filter thresholds in force when the image was accepted."""

    tau_id: float
    tau_indep: float
    delta: float

    def to_dict(self) -> dict[str, float]:
        return {"tau_id": self.tau_id, "tau_indep": self.tau_indep, "delta": self.delta}


@dataclass(frozen=True)
class ImageRecord:
    """Privacy record of one synthetic image (see the module docstring)."""

    id: str
    file: str
    sha256: str
    label: int
    class_name: str
    method: str
    path_id: int | None
    position: int | None
    max_id_prob: float
    indep_id_prob: float
    dcr: float
    thresholds: Thresholds

    def passes(self) -> bool:
        """True when the record satisfies its own filter thresholds."""
        t = self.thresholds
        return self.max_id_prob < t.tau_id and self.indep_id_prob < t.tau_indep and self.dcr > t.delta

    def failures(self) -> list[str]:
        """Human-readable list of the failed threshold conditions (empty when it passes)."""
        t = self.thresholds
        out = []
        if not self.max_id_prob < t.tau_id:
            out.append(f"max_id_prob {self.max_id_prob:g} >= tau_id {t.tau_id:g}")
        if not self.indep_id_prob < t.tau_indep:
            out.append(f"indep_id_prob {self.indep_id_prob:g} >= tau_indep {t.tau_indep:g}")
        if not self.dcr > t.delta:
            out.append(f"dcr {self.dcr:g} <= delta {t.delta:g}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "file": self.file,
            "sha256": self.sha256,
            "label": self.label,
            "class_name": self.class_name,
            "method": self.method,
            "path_id": self.path_id,
            "position": self.position,
            "max_id_prob": self.max_id_prob,
            "indep_id_prob": self.indep_id_prob,
            "dcr": self.dcr,
            "thresholds": self.thresholds.to_dict(),
        }

    @staticmethod
    def expected_file(class_name: str, image_id: str) -> str:
        return f"images/{class_name}/{image_id}.png"

    @classmethod
    def from_dict(cls, raw: Any, where: str = "record") -> ImageRecord:
        """Validate one record; ``where`` prefixes every error (e.g. ``images[3] (id 'x')``)."""
        if not isinstance(raw, dict):
            raise ManifestError(f"{where}: must be an object, got {type(raw).__name__}")
        rid = raw.get("id")
        if isinstance(rid, str):
            where = f"{where} (id {rid!r})"
        unknown = sorted(set(raw) - set(RECORD_KEYS))
        if unknown:
            raise ManifestError(f"{where}: unknown key '{unknown[0]}'")
        missing = [k for k in RECORD_KEYS if k not in raw]
        if missing:
            raise ManifestError(f"{where}: missing key '{missing[0]}'")

        def bad(key: str, why: str) -> ManifestError:
            return ManifestError(f"{where}: key '{key}' = {short_repr(raw.get(key))}: {why}")

        if not is_safe_name(raw["id"]):
            raise bad("id", "must be a non-empty name of letters, digits, '.', '_' or '-'")
        if not is_safe_name(raw["class_name"]):
            raise bad("class_name", "must be a non-empty name of letters, digits, '.', '_' or '-'")
        expected = cls.expected_file(raw["class_name"], raw["id"])
        if raw["file"] != expected:
            raise bad("file", f"must be {expected!r}")
        if not is_hex64(raw["sha256"]):
            raise bad("sha256", "must be 64 lower-case hex digits")
        if not is_count(raw["label"]):
            raise bad("label", f"must be an integer in [0, {MAX_INT}]")
        if not isinstance(raw["method"], str) or raw["method"] not in METHODS:
            raise bad("method", f"must be one of {', '.join(METHODS)}")
        for key in ("path_id", "position"):
            if raw[key] is not None and not is_count(raw[key]):
                raise bad(key, f"must be an integer in [0, {MAX_INT}] or null")
        for key in ("max_id_prob", "indep_id_prob"):
            v = raw[key]
            if not (_is_number(v) and 0.0 <= v <= 1.0):
                raise bad(key, "must be a probability, a finite number in [0, 1]")
        v = raw["dcr"]
        if not (_is_number(v) and v >= 0):
            raise bad("dcr", "must be a distance, a finite number >= 0")
        th = raw["thresholds"]
        if not isinstance(th, dict):
            raise bad("thresholds", "must be an object with tau_id, tau_indep, delta")
        unknown = sorted(set(th) - set(THRESHOLD_KEYS))
        if unknown:
            raise ManifestError(f"{where}: unknown key 'thresholds.{unknown[0]}'")
        for key in THRESHOLD_KEYS:
            if key not in th:
                raise ManifestError(f"{where}: missing key 'thresholds.{key}'")
            v = th[key]
            if key == "delta":
                if not (_is_number(v) and v >= 0):
                    raise ManifestError(f"{where}: key 'thresholds.delta' = {short_repr(v)}: must be a distance, "
                                        "a finite number >= 0")
            elif not (_is_number(v) and 0.0 < v <= 1.0):
                raise ManifestError(f"{where}: key 'thresholds.{key}' = {short_repr(v)}: must be a probability "
                                    "bound, a finite number in (0, 1]")
        return cls(
            id=raw["id"],
            file=raw["file"],
            sha256=raw["sha256"],
            label=int(raw["label"]),
            class_name=raw["class_name"],
            method=raw["method"],
            path_id=raw["path_id"],
            position=raw["position"],
            max_id_prob=float(raw["max_id_prob"]),
            indep_id_prob=float(raw["indep_id_prob"]),
            dcr=float(raw["dcr"]),
            thresholds=Thresholds(float(th["tau_id"]), float(th["tau_indep"]), float(th["delta"])),
        )


@dataclass
class SiteManifest:
    """The ``manifest.json`` of a site output dir."""

    site_id: str
    generator_sha256: str
    config_sha256: str
    created: str
    images: list[ImageRecord] = field(default_factory=list)
    generator_round: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "site_id": self.site_id,
            "generator_sha256": self.generator_sha256,
            "config_sha256": self.config_sha256,
            "created": self.created,
        }
        if self.generator_round is not None:
            out["generator_round"] = self.generator_round
        out["images"] = [r.to_dict() for r in self.images]
        return out

    @classmethod
    def from_dict(cls, raw: Any, source: str = "manifest.json") -> SiteManifest:
        if not isinstance(raw, dict):
            raise ManifestError(f"{source}: the top level must be an object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(SITE_KEYS_REQUIRED) - set(SITE_KEYS_OPTIONAL))
        if unknown:
            raise ManifestError(f"{source}: unknown key '{unknown[0]}'")
        for key in SITE_KEYS_REQUIRED:
            if key not in raw:
                raise ManifestError(f"{source}: missing key '{key}'")
        if not is_safe_name(raw["site_id"]):
            raise ManifestError(f"{source}: key 'site_id' = {short_repr(raw['site_id'])}: must be a plain name")
        for key in ("generator_sha256", "config_sha256"):
            if not is_hex64(raw[key]):
                raise ManifestError(f"{source}: key '{key}' = {short_repr(raw[key])}: must be 64 lower-case hex digits")
        if not isinstance(raw["created"], str) or not _is_iso_time(raw["created"]):
            raise ManifestError(f"{source}: key 'created' = {short_repr(raw['created'])}: must be an ISO 8601 time")
        gr = raw.get("generator_round")
        if gr is not None and not is_count(gr):
            raise ManifestError(f"{source}: key 'generator_round' = {gr!r}: must be a non-negative integer or null")
        if not isinstance(raw["images"], list):
            raise ManifestError(f"{source}: key 'images' must be a list")
        records: list[ImageRecord] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(raw["images"]):
            rec = ImageRecord.from_dict(item, f"{source}: images[{i}]")
            if rec.id in seen:
                raise ManifestError(
                    f"{source}: images[{i}] (id {rec.id!r}): key 'id' duplicates images[{seen[rec.id]}]"
                )
            seen[rec.id] = i
            records.append(rec)
        return cls(
            site_id=raw["site_id"],
            generator_sha256=raw["generator_sha256"],
            config_sha256=raw["config_sha256"],
            created=raw["created"],
            images=records,
            generator_round=gr,
        )


def read_site_manifest(path: str | Path) -> SiteManifest:
    """Read and validate a site ``manifest.json``; raises :class:`ManifestError`."""
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"{p}: not found")
    raw = loads_strict(p.read_bytes(), str(p))
    return SiteManifest.from_dict(raw, str(p))


def write_site_manifest(path: str | Path, manifest: SiteManifest) -> None:
    """Write atomically (temporary file, fsync, rename)."""
    atomic_write(path, json.dumps(manifest.to_dict(), indent=1) + "\n")


#: Largest integer a manifest may hold (2^53 - 1: exact in every JSON reader, fits SQLite INTEGER).
MAX_INT = 2**53 - 1
#: No manifest nests deeper than this (a record's thresholds are at level 4).
MAX_DEPTH = 32


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_count(v: Any) -> bool:
    """A non-negative integer no larger than :data:`MAX_INT` (JSON gives exact ``int``, never a subclass)."""
    return type(v) is int and 0 <= v <= MAX_INT


def _is_number(v: Any) -> bool:
    t = type(v)
    if t is float:
        return math.isfinite(v)
    # 10**400 is a JSON integer: refused here, not with an OverflowError later. bool is not int here.
    return t is int and -MAX_INT <= v <= MAX_INT


def is_number(v: Any) -> bool:
    """A finite JSON number (an integer at most :data:`MAX_INT` in magnitude)."""
    return _is_number(v)


def short_repr(v: Any, limit: int = 60) -> str:
    """repr of a bad value, cut (an error message must not echo megabytes)."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "…"


def loads_strict(text: str | bytes, source: str) -> Any:
    """``json.loads`` that never raises RecursionError or ValueError: a :class:`ManifestError` naming ``source``.

    NaN/Infinity parse (as non-finite floats) and nested containers parse as they are, so
    that the closed schema check that follows names the key holding them (every value of a
    manifest is type-checked, and unknown keys are refused). Nesting beyond the parser's
    recursion limit (~1000 levels) cannot be parsed at all and is refused here.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ManifestError(f"{source}: JSON nested too deeply for the parser (more than {MAX_DEPTH} levels "
                            "is never valid here)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{source}: not valid JSON: {err}") from None
    except ValueError as err:  # e.g. an integer literal longer than Python's int_max_str_digits
        raise ManifestError(f"{source}: not valid JSON: {err}") from None


def _is_iso_time(s: str) -> bool:
    try:
        datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True
