"""The federation's privacy policy: what the pool accepts, from whom it is written, how it is checked.

The coordinator's ``policy:`` section (:class:`plan_shared.config.PolicyConfig`) resolves to a
:class:`~plan_shared.bundle.ThresholdPolicy`; ``coordinate`` / ``demo`` write it as a JSON
*policy file* before they start the pool (``plan-server pool serve --policy FILE``), and the
ServerApp adds the digest of the final generator (:func:`publish_generator`, atomic rename)
before the synthesis phase. The pool re-reads the file whenever it changes
(:class:`PolicyFile`) and refuses every bundle while the digest is still unknown.

Policy file (every key required, no other key)::

    {"format": "plan-pool-policy/1",
     "max_tau_id": 0.5, "max_tau_indep": 0.5, "min_delta": null, "min_delta_quantile": 0.05,
     "min_k": 5, "min_planted": 50, "all_planted_rejected": true, "methods": ["plan"],
     "image_size": 32, "channels": 1, "num_classes": 2, "max_pixels": 1024,
     "generator_sha256": "<hex64>" | null}

:func:`check_policy` is the one check: ``check_policy(policy, bm)`` on the signed manifest
(before any file is received) and ``check_policy(policy, bm, report)`` on the bundle's
``report.json`` once it has arrived. A violation raises :class:`~plan_shared.bundle.PolicyError`
(FAILED_PRECONDITION at the pool), malformed content :class:`~plan_shared.bundle.BundleError`.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from plan_shared.bundle import DEFAULT_MAX_PIXELS, BundleError, BundleManifest, PolicyError, ThresholdPolicy
from plan_shared.config import METHODS, Method
from plan_shared.files import atomic_write
from plan_shared.manifest import ManifestError, is_count, is_number, loads_strict, short_repr

if TYPE_CHECKING:
    from plan_shared.config import PlanConfig

FORMAT = "plan-pool-policy/1"


class PolicyFileError(ValueError):
    """The policy file cannot be read or is invalid; the message names the file and the key."""


class PolicyDocument(BaseModel):
    """The policy file's schema (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["plan-pool-policy/1"]
    max_tau_id: float | None = Field(..., gt=0.0, le=1.0)
    max_tau_indep: float | None = Field(..., gt=0.0, le=1.0)
    min_delta: float | None = Field(..., ge=0.0)
    min_delta_quantile: float | None = Field(..., gt=0.0, lt=1.0)
    min_k: int | None = Field(..., ge=1)
    min_planted: int | None = Field(..., ge=0)
    all_planted_rejected: bool
    methods: list[Method] | None = Field(..., min_length=1)
    image_size: int | None = Field(..., ge=1, le=65535)
    channels: Literal[1, 3] | None
    num_classes: int | None = Field(..., ge=1)
    max_pixels: int = Field(..., ge=1)
    generator_sha256: str | None = Field(..., pattern=r"^[0-9a-f]{64}$")

    def to_policy(self) -> ThresholdPolicy:
        d = self.model_dump()
        d.pop("format")
        d["methods"] = tuple(d["methods"]) if d["methods"] is not None else None
        return ThresholdPolicy(**d, require_generator=True)

    @classmethod
    def from_policy(cls, p: ThresholdPolicy) -> PolicyDocument:
        return cls(
            format=FORMAT, max_tau_id=p.max_tau_id, max_tau_indep=p.max_tau_indep, min_delta=p.min_delta,
            min_delta_quantile=p.min_delta_quantile, min_k=p.min_k, min_planted=p.min_planted,
            all_planted_rejected=p.all_planted_rejected, methods=list(p.methods) if p.methods else None,
            image_size=p.image_size, channels=p.channels, num_classes=p.num_classes, max_pixels=p.max_pixels,
            generator_sha256=p.generator_sha256,
        )


# ---------------------------------------------------------------- from the coordinator's config


def policy_from_config(cfg: PlanConfig, generator_sha256: str | None = None,
                       channels: int | None = None, size: int | None = None,
                       num_classes: int | None = None) -> ThresholdPolicy:
    """The policy of ``cfg.policy``; a null key takes the coordinator's own setting (documented in config.py).

    ``channels`` / ``size`` / ``num_classes`` (what the sites described) fill what the
    config leaves open.
    """
    pc, fc = cfg.policy, cfg.filter
    size = pc.image_size or cfg.data.size or size
    channels = pc.channels or cfg.data.channels or channels
    return ThresholdPolicy(
        max_tau_id=pc.max_tau_id if pc.max_tau_id is not None else fc.tau_id,
        max_tau_indep=pc.max_tau_indep if pc.max_tau_indep is not None else fc.tau_indep,
        min_delta=None,
        min_delta_quantile=pc.min_delta_quantile if pc.min_delta_quantile is not None else fc.delta_quantile,
        min_k=pc.min_k if pc.min_k is not None else cfg.anchors.k,
        min_planted=pc.min_planted if pc.min_planted is not None else fc.planted,
        all_planted_rejected=pc.all_planted_rejected if pc.all_planted_rejected is not None else fc.block_on_planted,
        methods=tuple(pc.methods) if pc.methods else cfg.synthesis.exportable_methods(),  # autoexport: auto = all
        image_size=size,
        channels=channels,
        num_classes=pc.num_classes or num_classes,
        max_pixels=size * size if size else DEFAULT_MAX_PIXELS,
        generator_sha256=generator_sha256,
        require_generator=True,
    )


# ---------------------------------------------------------------- the file


def write_policy_file(path: str | Path, policy: ThresholdPolicy) -> Path:
    """Write atomically (temporary file, fsync, rename): the pool never reads half a policy."""
    doc = PolicyDocument.from_policy(policy).model_dump(mode="json")
    return atomic_write(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def read_policy_file(path: str | Path) -> ThresholdPolicy:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise PolicyFileError(f"policy file {p} not found") from None
    except OSError as err:
        raise PolicyFileError(f"policy file {p}: {err}") from None
    try:
        raw = loads_strict(data, str(p))
    except ManifestError as err:
        raise PolicyFileError(str(err)) from None
    try:
        return PolicyDocument.model_validate(raw).to_policy()
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(x) for x in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            raise PolicyFileError(f"{p}: unknown key '{key}'") from None
        if e["type"] == "missing":
            raise PolicyFileError(f"{p}: missing key '{key}'") from None
        raise PolicyFileError(f"{p}: key '{key}' = {short_repr(e.get('input'))}: {e['msg']}") from None


def publish_generator(path: str | Path, generator_sha256: str, channels: int | None = None,
                      size: int | None = None, num_classes: int | None = None) -> ThresholdPolicy:
    """Record the final generator's digest (and the image shape the sites described) in the policy file.

    What the file already fixes is kept; the file is replaced atomically.
    """
    from dataclasses import replace

    cur = read_policy_file(path)
    size = cur.image_size or size
    new = replace(
        cur, generator_sha256=generator_sha256, image_size=size, channels=cur.channels or channels,
        num_classes=cur.num_classes or num_classes,
        max_pixels=min(cur.max_pixels, size * size) if size else cur.max_pixels,
    )
    write_policy_file(path, new)
    return new


class PolicyFile:
    """A policy file, re-read whenever its (inode, size, mtime) changes. Fails closed (PolicyFileError)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._policy: ThresholdPolicy | None = None

    def current(self) -> ThresholdPolicy:
        try:
            st = os.stat(self.path)
        except OSError as err:
            raise PolicyFileError(f"policy file {self.path}: {err.strerror}") from None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if stamp != self._stamp or self._policy is None:
                self._stamp = None
                self._policy = read_policy_file(self.path)
                self._stamp = stamp
            return self._policy


# ---------------------------------------------------------------- the check


def check_policy(policy: ThresholdPolicy, bm: BundleManifest, report: Any = None) -> None:
    """The federation policy on a parsed bundle manifest, or (``report`` given) on its report.json.

    ``report`` is the parsed report.json (a dict) or its raw bytes. Raises PolicyError for
    a violation, BundleError for malformed content; the message names the image index or
    the report key, and the value.
    """
    if report is not None:
        _check_report(policy, bm, report)
        return
    if policy.require_generator:
        if policy.generator_sha256 is None:
            raise PolicyError("the federation's final generator is not known to the pool yet (policy file: "
                              "generator_sha256 is null); bundles are accepted once the rounds are over")
        if bm.generator_sha256 != policy.generator_sha256:
            raise PolicyError(f"bundle manifest: key 'generator_sha256' = {bm.generator_sha256[:16]}…: not the "
                              f"federation's final generator {policy.generator_sha256[:16]}…")
    if policy.needs_report and bm.report_sha256 is None:
        raise PolicyError("bundle has no report.json; the federation's policy checks its planted duplicates, "
                          "anchors.k and delta quantile there")
    for i, im in enumerate(bm.images):
        rec = im.record
        t = rec.thresholds
        where = f"images[{i}] (id {rec.id!r})"
        if policy.max_tau_id is not None and t.tau_id > policy.max_tau_id:
            raise PolicyError(f"{where}: tau_id {t.tau_id:g} above the pool's bound {policy.max_tau_id:g}")
        if policy.max_tau_indep is not None and t.tau_indep > policy.max_tau_indep:
            raise PolicyError(f"{where}: tau_indep {t.tau_indep:g} above the pool's bound {policy.max_tau_indep:g}")
        if policy.min_delta is not None and t.delta < policy.min_delta:
            raise PolicyError(f"{where}: delta {t.delta:g} below the pool's bound {policy.min_delta:g}")
        if policy.methods is not None and rec.method not in policy.methods:
            raise PolicyError(f"{where}: method {rec.method!r} not allowed by the federation's policy "
                              f"({', '.join(policy.methods)})")
        if policy.num_classes is not None and rec.label >= policy.num_classes:
            raise BundleError(f"{where}: label {rec.label} outside the federation's {policy.num_classes} "
                              f"classes [0, {policy.num_classes - 1}]")


def _get(report: dict[str, Any], dotted: str, kind: str) -> Any:
    node: Any = report
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise BundleError(f"report.json: missing key '{dotted}' (the federation's policy needs it)")
        node = node[part]
    checks = {"count": (is_count, "a non-negative integer"), "number": (is_number, "a finite number"),
              "bool": (lambda v: isinstance(v, bool), "true or false")}
    test, what = checks[kind]
    if not test(node):
        raise BundleError(f"report.json: key '{dotted}' = {short_repr(node)}: must be {what}")
    return node


def _check_report(policy: ThresholdPolicy, bm: BundleManifest, report: Any) -> None:
    if isinstance(report, (bytes, bytearray)):
        try:
            report = loads_strict(bytes(report), "report.json")
        except ManifestError as err:
            raise BundleError(str(err)) from None
    if not isinstance(report, dict):
        raise BundleError("report.json: the top level must be an object")
    if not policy.needs_report:
        return
    if _get(report, "filter.export_blocked", "bool"):
        raise PolicyError("report.json: key 'filter.export_blocked' = True: the site's filter let a planted "
                          "near-duplicate through; nothing of this run may be pooled")
    total = _get(report, "filter.planted_total", "count")
    rejected = _get(report, "filter.planted_rejected", "count")
    if policy.min_planted is not None and total < policy.min_planted:
        raise PolicyError(f"report.json: key 'filter.planted_total' = {total}: below the federation's "
                          f"min_planted {policy.min_planted}")
    if policy.all_planted_rejected and rejected != total:
        raise PolicyError(f"report.json: key 'filter.planted_rejected' = {rejected}: the policy needs all "
                          f"{total} planted duplicates rejected")
    if policy.min_k is not None:
        k = _get(report, "anchors.k", "count")
        if k < policy.min_k:
            raise PolicyError(f"report.json: key 'anchors.k' = {k}: below the federation's min_k {policy.min_k}")
    if policy.min_delta_quantile is not None:
        q = _get(report, "filter.delta_quantile", "number")
        if q < policy.min_delta_quantile:
            raise PolicyError(f"report.json: key 'filter.delta_quantile' = {q:g}: below the federation's "
                              f"min_delta_quantile {policy.min_delta_quantile:g}")
    th = {k: float(_get(report, f"filter.{k}", "number")) for k in ("tau_id", "tau_indep", "delta")}
    for i, im in enumerate(bm.images):
        rt = im.record.thresholds.to_dict()
        for k, v in th.items():
            if abs(rt[k] - v) > 1e-9 * max(1.0, abs(v)):
                raise BundleError(f"images[{i}] (id {im.record.id!r}): key 'thresholds.{k}' = {rt[k]:g} differs "
                                  f"from report.json filter.{k} = {v:g}")


__all__ = [
    "FORMAT",
    "METHODS",
    "PolicyDocument",
    "PolicyFile",
    "PolicyFileError",
    "check_policy",
    "policy_from_config",
    "publish_generator",
    "read_policy_file",
    "write_policy_file",
]
