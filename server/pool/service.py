"""The pool gRPC service: mutual TLS, roles from the client certificate, verified ingest.

A site pushes (``Offer`` then ``Push``); a reader lists and pulls (``List``,
``Catalog``, ``Fetch``). Every call:

1. TLS has already verified the client certificate against the federation CA
   (``require_client_auth=True``); a missing certificate or one from another CA never
   gets here.
2. The certificate's CN/OU/serial must match a non-revoked entry of
   ``registry.json`` of that role (re-read whenever the file changes).

A bundle is stored only if the caller is the bundle's site, the Ed25519 signature
verifies with that site's registered key, every file hashes to its manifest
sha256, every privacy record carries its thresholds and passes them, and the
limits hold, every image is the federation's canonical PNG (plan_shared/png_check.py),
and the federation's policy (plan_shared/policy.py: thresholds, methods, labels, the
final generator's digest, report.json's planted duplicates and anchors.k) holds. With
``--policy FILE`` the policy is that file, re-read whenever it changes (like the
registry); a blob keeps the kind (image or report) it was first stored as. Refusals are
gRPC errors whose details are the reason (``PERMISSION_DENIED`` for who/signature,
``INVALID_ARGUMENT`` for malformed content, ``FAILED_PRECONDITION`` for a policy
violation).

Limits (``plan_shared.config.PoolLimitsConfig``, one ``pool serve`` option each): at most
``max_streams_per_identity`` open streams per certificate identity; an Offer/Push stream
idle for ``idle_timeout_s`` or open for ``call_timeout_s`` is aborted (DEADLINE_EXCEEDED)
and its files removed at once; per-site byte and image quotas (RESOURCE_EXHAUSTED naming
site, quota and usage); the manifest size counted while it arrives; text fields capped
at ingest and cut in replies; List paged and Catalog batched by bytes; Fetch serves each
sha256 once per call. A push cut mid-way keeps its verified files ``keep_interrupted_s``
for a retry, then they are removed (not at the next restart).

Revocation: the caller's certificate is checked again against the registry just before
the commit (a stream opened before a revocation cannot commit after it), and a site the
registry marks revoked is quarantined in the store: its bundles are hidden from List,
Catalog and Fetch, kept on disk, until ``plan-server pool restore --site``.

Test hook: ``PLAN_POOL_TEST_PAUSE=<point>:<marker file>[:<n>]`` makes a push stop at
``received`` (after n files placed), ``before_commit``, ``in_transaction`` (rows
inserted, COMMIT not yet run) or ``after_commit``: the server writes the marker
file and sleeps, so a test can SIGKILL it exactly there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import grpc

from plan_shared import credentials as C
from plan_shared.bundle import (
    BundleError,
    BundleLimits,
    BundleManifest,
    PolicyError,
    ThresholdPolicy,
    check_bundle,
    parse_bundle_manifest,
    unique_images,
    verify_signature,
)
from plan_shared.config import PoolLimitsConfig
from plan_shared.files import atomic_write
from plan_shared.png_check import PngError, check_png
from plan_shared.policy import PolicyFile, PolicyFileError, check_policy
from plan_shared.pool_proto import pool_pb2, pool_pb2_grpc
from server.pool.store import KindError, Store, StoreError, with_article

LOG = logging.getLogger("plan.pool")
CHUNK = 256 * 1024
BATCH_BYTES = 1024 * 1024
MAX_MESSAGE = 8 * 1024 * 1024
OLD_CLIENT_REPLY = 4 * 1024 * 1024 - 64 * 1024  # an unpaged List reply stays under gRPC's default receive limit
PAUSE_ENV = "PLAN_POOL_TEST_PAUSE"


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _EndedEarly(Refused):
    """The push stream ended with files missing: a refusal, unless the client was in fact cancelling."""

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class Caller:
    name: str
    role: str
    serial: str


class Registry:
    """registry.json, re-read whenever its (inode, size, mtime) changes. Fails closed.

    ``on_load(identities)`` runs after every (re)load, e.g. to quarantine revoked sites.
    """

    def __init__(self, certs: Path, on_load=None):
        self.path = Path(certs) / C.REGISTRY
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._identities: dict = {}
        self._on_load = on_load

    def identities(self) -> dict:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "pool misconfigured: registry.json missing") from None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if stamp != self._stamp:
                try:
                    reg = json.loads(self.path.read_text())
                    ids = reg["identities"]
                    if not isinstance(ids, dict):
                        raise ValueError("identities is not an object")
                except (OSError, ValueError, KeyError, TypeError) as err:
                    self._stamp = None
                    raise Refused(grpc.StatusCode.UNAVAILABLE, f"pool misconfigured: registry.json unreadable: {err}") from None
                self._identities, self._stamp = ids, stamp
                LOG.info("registry loaded: %d identities", len(ids))
                if self._on_load is not None:
                    self._on_load(ids)
            return self._identities


class _Pause:
    """The test-only pause hook (see module docstring)."""

    def __init__(self) -> None:
        spec = os.environ.get(PAUSE_ENV, "")
        parts = spec.split(":") if spec else []
        self.point = parts[0] if parts else None
        self.marker = parts[1] if len(parts) > 1 else None
        self.n = int(parts[2]) if len(parts) > 2 else 1

    def at(self, point: str, count: int = 0) -> None:
        if self.point != point or (point == "received" and count < self.n):
            return
        LOG.warning("test hook: pausing at %s", point)
        if self.marker:
            Path(self.marker).write_text(f"{os.getpid()} {point}\n")
        while True:
            time.sleep(3600)


class _Paced:
    """A request iterator read on a helper thread, so that the handler can give up on a stream
    that sends nothing for ``idle_s`` or stays open longer than ``call_s`` (a blocked
    ``next()`` of gRPC's own iterator cannot time out)."""

    _END = object()

    def __init__(self, it, idle_s: float, call_s: float):
        self._it = iter(it)
        self.idle_s, self.call_s = idle_s, call_s
        self._deadline = time.monotonic() + call_s
        self._q: queue.Queue = queue.Queue(maxsize=2)  # read-ahead bounded: at most 2 messages buffered
        self._closed = threading.Event()
        threading.Thread(target=self._pump, daemon=True, name="pool-stream").start()

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _pump(self) -> None:
        try:
            for msg in self._it:
                if not self._put(msg):
                    return
            self._put(self._END)
        except BaseException as err:  # noqa: BLE001 - handed to the handler thread (grpc.RpcError: client gone)
            self._put(err)

    def close(self) -> None:
        self._closed.set()

    def __iter__(self):
        return self

    def __next__(self):
        left = self._deadline - time.monotonic()
        try:
            item = self._q.get(timeout=max(0.0, min(self.idle_s, left)))
        except queue.Empty:
            self.close()
            if self._deadline - time.monotonic() <= 0:
                raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"stream open for more than {self.call_s:g} s (--call-timeout-s): aborted") from None
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"stream idle for more than {self.idle_s:g} s (--idle-timeout-s): aborted") from None
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


@dataclass
class _Incoming:
    """One file of a push while its chunks arrive."""

    key: int | str  # image index, or "report"
    sha: str
    size: int
    fh: BinaryIO
    hasher: hashlib._Hash
    written: int
    path: Path
    label: str
    chunks: list[bytes]  # an image's bytes so far (checked in memory when complete)


class PoolService(pool_pb2_grpc.PoolServicer):
    def __init__(
        self,
        store: Store,
        certs: Path,
        limits: BundleLimits = BundleLimits(),
        policy: ThresholdPolicy = ThresholdPolicy(),
        policy_file: Path | None = None,
        pool_limits: PoolLimitsConfig = PoolLimitsConfig(),
    ):
        self.store = store
        self.limits = limits
        self.policy = policy
        self.policy_file = PolicyFile(policy_file) if policy_file is not None else None
        self.pool_limits = pool_limits
        self.registry = Registry(certs, on_load=self._quarantine_revoked)
        self._pause = _Pause()
        self._state = threading.RLock()
        self._streams: Counter = Counter()         # identity -> open streams
        self._inflight: dict[str, list[int]] = {}  # site -> [bytes, images] of pushes past their header
        self._wanted: Counter = Counter()          # sha256 -> pushes in flight that need it (kept from sweeps)

    # ------------------------------------------------------------ limits

    @contextmanager
    def _stream(self, caller: Caller):
        limit = self.pool_limits.max_streams_per_identity
        with self._state:
            n = self._streams[caller.name]
            if n >= limit:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"identity {caller.name!r} already has {n} open streams (limit {limit})")
            self._streams[caller.name] = n + 1
        try:
            yield
        finally:
            with self._state:
                self._streams[caller.name] -= 1
                if self._streams[caller.name] <= 0:
                    del self._streams[caller.name]

    def _paced(self, it) -> _Paced:
        return _Paced(it, self.pool_limits.idle_timeout_s, self.pool_limits.call_timeout_s)

    def _check_fields(self, bm: BundleManifest) -> None:
        cap = self.pool_limits.max_field_chars

        def check(where: str, key: str, value: str) -> None:
            if len(value) > cap:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{where}: key {key!r} is {len(value)} characters long, at most {cap} (--max-field-chars)")

        check("bundle manifest", "created", bm.created)
        check("bundle manifest", "site_id", bm.site_id)
        for i, im in enumerate(bm.images):
            for key in ("id", "class_name", "method"):
                check(f"bundle manifest images[{i}]", key, str(getattr(im.record, key)))

    def _check_quota(self, bm: BundleManifest) -> None:
        """Refuse a bundle that would take its site over a quota (stored + in flight + this one)."""
        lim = self.pool_limits
        stored_b, stored_n = self.store.site_usage(bm.site_id)
        with self._state:
            fly_b, fly_n = self._inflight.get(bm.site_id, (0, 0))
        for kind, quota, stored, fly, adds in (
            ("image", lim.site_quota_images, stored_n, fly_n, len(bm.images)),
            ("byte", int(lim.site_quota_mb * 2**20), stored_b, fly_b, bm.total_bytes),
        ):
            if stored + fly + adds > quota:
                also = f" + {fly} in flight" if fly else ""
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"site {bm.site_id!r} is over its {kind} quota: {quota} allowed, {stored} stored{also}, "
                              f"this bundle adds {adds}")

    @contextmanager
    def _reserve(self, bm: BundleManifest, wanted: set):
        with self._state:
            self._check_quota(bm)
            fly = self._inflight.setdefault(bm.site_id, [0, 0])
            fly[0] += bm.total_bytes
            fly[1] += len(bm.images)
            self._wanted.update(wanted)
        try:
            yield
        finally:
            with self._state:
                fly = self._inflight[bm.site_id]
                fly[0] -= bm.total_bytes
                fly[1] -= len(bm.images)
                if fly == [0, 0]:
                    del self._inflight[bm.site_id]
                self._wanted.subtract(wanted)
                self._wanted += Counter()  # drop zero counts

    def _discard_later(self, shas: set) -> None:
        """Files of a push cut mid-way: kept ``keep_interrupted_s`` for a retry, then removed (unless indexed
        or wanted by a push in flight, which then owns them)."""
        keep = self.pool_limits.keep_interrupted_s
        if keep <= 0 or not shas:
            self.store.discard_unindexed(shas)
            return

        def sweep() -> None:
            with self._state:
                free = {s for s in shas if not self._wanted.get(s)}
            self.store.discard_unindexed(free)
            if free:
                LOG.info("removed %d files of an interrupted push after %g s", len(free), keep)

        t = threading.Timer(keep, sweep)
        t.daemon = True
        t.start()

    def _quarantine_revoked(self, identities: dict) -> None:
        for name, e in identities.items():
            if isinstance(e, dict) and e.get("role") == "site" and e.get("revoked"):
                if self.store.quarantine_revoked(name, str(e.get("revoked_at") or "unknown time")):
                    LOG.warning("site %s is revoked: its bundles are quarantined (hidden from readers, kept on disk; "
                                "`plan-server pool restore --site %s` lifts it)", name, name)

    def current_policy(self) -> ThresholdPolicy:
        """The policy file's current content (fails closed), else the command-line policy."""
        if self.policy_file is None:
            return self.policy
        try:
            return self.policy_file.current()
        except PolicyFileError as err:
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"pool misconfigured: {err}") from None

    # ------------------------------------------------------------ identity

    def _caller(self, context: grpc.ServicerContext, role: str, action: str) -> Caller:
        auth = context.auth_context()
        pems = auth.get("x509_pem_cert") or []
        if not pems:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        try:
            ident = C.cert_identity(pems[0])
        except C.CredentialsError as err:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"unreadable client certificate: {err}") from None
        return self._check_identity(ident.name, ident.serial, ident.role, role, action)

    def _check_identity(self, name: str, serial: str, cert_role: str | None, role: str, action: str) -> Caller:
        entry = self.registry.identities().get(name)
        who = f"certificate {name!r} (serial {serial[:16]})"
        if entry is None:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"{who} is not registered at this pool")
        if entry.get("revoked"):
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"{who} is revoked")
        if str(entry.get("serial")) != serial:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"{who} has been replaced by a newer certificate")
        if cert_role != entry.get("role"):
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who} carries role {cert_role!r}, the registry says {entry.get('role')!r}",
            )
        if entry["role"] != role:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who} has role {entry['role']!r}; {action} needs role {role!r}",
            )
        return Caller(name, entry["role"], serial)

    def _recheck(self, caller: Caller) -> None:
        """Just before a commit: the certificate must still be valid (revocation during the stream)."""
        self._check_identity(caller.name, caller.serial, caller.role, caller.role, "pushing a bundle")

    # ------------------------------------------------------------ bundle header

    def _read_header(self, it: Iterable) -> tuple[bytes, bytes]:
        """Read manifest parts up to and including the signature message."""
        parts: list[bytes] = []
        size = 0
        for msg in it:
            if msg.manifest_part:
                size += len(msg.manifest_part)
                if size > self.limits.max_manifest_bytes:  # counted as it arrives: never buffered or parsed
                    raise Refused(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"bundle manifest exceeds {self.limits.max_manifest_bytes} bytes (--max-manifest-kb)",
                    )
                parts.append(msg.manifest_part)
            elif msg.signature:
                return b"".join(parts), msg.signature
            else:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "file data before the manifest signature")
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "stream ended before the manifest signature")

    def _verify_header(self, caller: Caller, manifest: bytes,
                       signature: bytes) -> tuple[BundleManifest, ThresholdPolicy]:
        """Parse, authenticate and check a bundle manifest; returns it with the policy it was checked against."""
        try:
            bm = parse_bundle_manifest(manifest, self.limits)
        except BundleError as err:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        self._check_fields(bm)
        if bm.site_id != caller.name:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate identity {caller.name!r} may not push a bundle of site {bm.site_id!r}",
            )
        entry = self.registry.identities().get(bm.site_id) or {}
        pub_hex = entry.get("ed25519_public")
        if not pub_hex:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"site {bm.site_id!r} has no registered signing key")
        pub = bytes.fromhex(pub_hex)
        if hashlib.sha256(pub).hexdigest() != bm.signing_key_sha256:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"bundle names signing key {bm.signing_key_sha256[:16]}…, the registered key of site "
                f"{bm.site_id!r} is {hashlib.sha256(pub).hexdigest()[:16]}…",
            )
        try:
            verify_signature(manifest, signature, pub, bm.site_id)
        except BundleError as err:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, str(err)) from None
        policy = self.current_policy()
        try:
            check_bundle(bm, self.limits, policy)
        except PolicyError as err:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, str(err)) from None
        except BundleError as err:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        self._check_kinds(bm)
        return bm, policy

    def _check_kinds(self, bm: BundleManifest) -> None:
        """A blob is an image or a report, never both (within the bundle, or against what is stored)."""
        images = {im.record.sha256 for im in bm.images}
        if bm.report_sha256 is not None and bm.report_sha256 in images:
            idx = next(i for i, im in enumerate(bm.images) if im.record.sha256 == bm.report_sha256)
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"images[{idx}] (id {bm.images[idx].record.id!r}) has the sha256 of the bundle's report.json")
        want = dict.fromkeys(images, "image")
        if bm.report_sha256 is not None:
            want[bm.report_sha256] = "report"
        for sha, kind in self.store.kinds(set(want)).items():
            if kind != want[sha]:
                if want[sha] == "image":
                    idx = next(i for i, im in enumerate(bm.images) if im.record.sha256 == sha)
                    what = f"images[{idx}] (id {bm.images[idx].record.id!r})"
                else:
                    what = "report.json"
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: sha256 {sha[:16]}… is stored in the pool "
                              f"as {with_article(kind)}, not as {with_article(want[sha])}")

    def _check_image(self, data: bytes, label: str, policy: ThresholdPolicy) -> None:
        try:
            check_png(data, policy.image_size, policy.channels, policy.max_pixels)
        except PngError as err:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{label}: {err}") from None

    def _guard(self, context: grpc.ServicerContext, fn, *args):
        try:
            return fn(*args)
        except Refused as r:
            if r.code == grpc.StatusCode.CANCELLED:
                LOG.info("%s: %s", context.peer(), r.message)
            else:
                LOG.warning("refused %s: %s", context.peer(), r.message)
            context.abort(r.code, r.message)

    # ------------------------------------------------------------ Offer

    def Offer(self, request_iterator, context):
        return self._guard(context, self._offer, request_iterator, context)

    def _offer(self, it, context):
        caller = self._caller(context, "site", "pushing a bundle")
        with self._stream(caller):
            it = self._paced(it)
            try:
                return self._offer_bundle(caller, it)
            finally:
                it.close()

    def _offer_bundle(self, caller: Caller, it):
        manifest, signature = self._read_header(it)
        bm, _ = self._verify_header(caller, manifest, signature)
        if self.store.has_bundle(bm.bundle_id):
            return pool_pb2.OfferReply(bundle_id=bm.bundle_id, duplicate=True, message="already stored")
        with self._state:
            self._check_quota(bm)
        wanted = unique_images(bm)
        missing = self.store.missing(wanted)
        need, seen = [], set()
        for i, im in enumerate(bm.images):
            s = im.record.sha256
            if s in missing and s not in seen:
                need.append(i)
                seen.add(s)
        need_report = bm.report_sha256 is not None and bool(self.store.missing({bm.report_sha256: bm.report_size}))
        return pool_pb2.OfferReply(
            bundle_id=bm.bundle_id, duplicate=False, need=need, need_report=need_report,
            message=f"{len(need)} of {len(wanted)} distinct images needed",
        )

    # ------------------------------------------------------------ Push

    def Push(self, request_iterator, context):
        return self._guard(context, self._push, request_iterator, context)

    def _push(self, it, context):
        caller = self._caller(context, "site", "pushing a bundle")
        with self._stream(caller):
            it = self._paced(it)
            try:
                return self._push_bundle(caller, it, context)
            finally:
                it.close()

    def _push_bundle(self, caller: Caller, it, context):
        manifest, signature = self._read_header(it)
        bm, policy = self._verify_header(caller, manifest, signature)
        if self.store.has_bundle(bm.bundle_id):
            LOG.info("duplicate bundle %s from %s", bm.bundle_id[:12], caller.name)
            return pool_pb2.PushReply(bundle_id=bm.bundle_id, duplicate=True, n_images=len(bm.images),
                                      message="already stored")
        wanted = dict(unique_images(bm))
        if bm.report_sha256 is not None:
            wanted.setdefault(bm.report_sha256, bm.report_size)
        with self._reserve(bm, set(wanted)):
            return self._push_files(caller, it, context, bm, manifest, signature, wanted, policy)

    def _push_files(self, caller: Caller, it, context, bm: BundleManifest, manifest: bytes, signature: bytes,
                    wanted: dict, policy: ThresholdPolicy):
        staging = self.store.new_staging()
        placed: set[str] = set()
        received = 0
        ok = False
        ended = threading.Event()
        context.add_callback(ended.set)  # runs when the call terminates (also on the client's cancel)
        try:
            try:
                received = self._receive(it, bm, staging, placed, policy)
                if not context.is_active():
                    raise Refused(grpc.StatusCode.CANCELLED, "upload interrupted")
                self._absent_files(bm, wanted, placed)
            except _EndedEarly:
                # gRPC can end the request stream of a cancelled call before it marks the call
                # cancelled: give the cancellation a moment to show, so a cut push counts as cut.
                if ended.wait(0.2) or not context.is_active():
                    raise Refused(grpc.StatusCode.CANCELLED, "upload interrupted") from None
                raise
            new_files = self.store.unindexed(set(wanted))
            self._check_content(bm, policy, new_files - placed)
            # Durable before visible: fsync every file this bundle adds (received now or left by an
            # interrupted attempt), then the directories; only then the one-transaction commit.
            self.store.make_durable(new_files)
            try:
                def before_commit() -> None:
                    self._recheck(caller)  # under the store lock, just before BEGIN
                    self._pause.at("before_commit")

                res = self.store.commit(bm, manifest, signature, caller.serial, before_commit=before_commit,
                                        in_transaction=lambda: self._pause.at("in_transaction"))
            except KindError as err:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
            except StoreError as err:
                raise Refused(grpc.StatusCode.ABORTED, f"{err}; retry the push") from None
            self._pause.at("after_commit")
            ok = True
        except Refused as r:
            if r.code == grpc.StatusCode.CANCELLED:
                self._discard_later(placed)            # cut mid-way: kept a while for a retry
            elif r.code != grpc.StatusCode.ABORTED:
                self.store.discard_unindexed(placed)   # refused or idle: keep nothing of it
            raise
        except OSError as err:  # e.g. disk full: nothing becomes visible; tell the client
            LOG.error("storage error during push of %s: %s", bm.bundle_id[:12], err)
            self.store.discard_unindexed(placed)
            raise Refused(grpc.StatusCode.INTERNAL, f"pool storage error: {err}") from None
        except Exception as err:  # a bug must not leave the bundle's files behind either
            LOG.exception("push of %s failed", bm.bundle_id[:12])
            self.store.discard_unindexed(placed)
            raise Refused(grpc.StatusCode.INTERNAL, f"pool error: {type(err).__name__}: {err}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if not ok and not context.is_active():
                LOG.info("push of %s from %s interrupted after %d bytes; %d verified files kept for a retry (%g s)",
                         bm.bundle_id[:12], caller.name, received, len(placed), self.pool_limits.keep_interrupted_s)
        LOG.info("%s bundle %s from %s: %d images, %d new files, %d bytes received",
                 "duplicate" if res.duplicate else "stored", bm.bundle_id[:12], caller.name,
                 res.n_images, res.n_new_files, received)
        return pool_pb2.PushReply(
            bundle_id=bm.bundle_id, duplicate=res.duplicate, n_images=res.n_images,
            n_new_files=res.n_new_files, bytes_received=received,
            message="already stored" if res.duplicate else "stored",
        )

    def _check_content(self, bm: BundleManifest, policy: ThresholdPolicy, leftovers: set) -> None:
        """Before commit: images left by an interrupted push (not checked by this one) and the policy on report.json."""
        seen: set[str] = set()
        for i, im in enumerate(bm.images):
            s = im.record.sha256
            if s in leftovers and s not in seen:
                seen.add(s)
                self._check_image(self.store.object_path(s).read_bytes(), f"images[{i}] (id {im.record.id!r})", policy)
        if policy.needs_report and bm.report_sha256 is not None:
            try:
                data = self.store.object_path(bm.report_sha256).read_bytes()
                check_policy(policy, bm, data)
            except PolicyError as err:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, str(err)) from None
            except BundleError as err:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None

    def _absent_files(self, bm: BundleManifest, wanted: dict, placed: set) -> None:
        absent = self.store.missing({s: n for s, n in wanted.items() if s not in placed})
        if absent:
            idx = next((i for i, im in enumerate(bm.images) if im.record.sha256 in absent), None)
            what = f"images[{idx}] (id {bm.images[idx].record.id!r})" if idx is not None else "report.json"
            raise _EndedEarly(f"{len(absent)} file(s) of the bundle were not sent, first: {what}")

    def _receive(self, it, bm: BundleManifest, staging: Path, placed: set, policy: ThresholdPolicy) -> int:
        """Write incoming files to staging, verify each (images: canonical PNG), place it. Returns bytes received."""
        received = 0
        cur: _Incoming | None = None  # the file being received
        n_placed = 0
        interrupted = False
        try:
            for msg in it:
                if msg.manifest_part or msg.signature:
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "manifest data after the signature")
                for ch in msg.chunks:
                    received += len(ch.data)
                    if ch.report:
                        if bm.report_sha256 is None:
                            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "report.json sent but not in the manifest")
                        key, sha, size, label = "report", bm.report_sha256, bm.report_size, "report.json"
                    else:
                        if ch.index >= len(bm.images):
                            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"image index {ch.index} out of range")
                        im = bm.images[ch.index]
                        key, sha, size = ch.index, im.record.sha256, im.size
                        label = f"images[{ch.index}] (id {im.record.id!r})"
                    if cur is None or cur.key != key:
                        if cur is not None:
                            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{cur.label}: incomplete before the next file")
                        if ch.offset != 0:
                            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{label}: first chunk at offset {ch.offset}")
                        path = staging / f"{sha}.part"
                        cur = _Incoming(key, sha, size, open(path, "wb"), hashlib.sha256(), 0, path, label, [])
                    if ch.offset != cur.written:
                        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{label}: chunk at offset {ch.offset}, expected {cur.written}")
                    if cur.written + len(ch.data) > size:
                        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                      f"{label}: more than the {size} bytes the signed manifest declares")
                    cur.fh.write(ch.data)
                    cur.hasher.update(ch.data)
                    if key != "report":
                        cur.chunks.append(ch.data)  # at most max_image_bytes: checked in memory, not re-read
                    cur.written += len(ch.data)
                    if ch.last:
                        fh, digest, written, path = cur.fh, cur.hasher.hexdigest(), cur.written, cur.path
                        if written != size:
                            fh.close()
                            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                          f"{label}: {written} bytes received, the signed manifest says {size}")
                        if digest != sha:
                            fh.close()
                            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                          f"{label}: sha256 mismatch (received {digest[:16]}…, signed {sha[:16]}…): "
                                          "the file was altered after signing")
                        fh.close()
                        if key != "report":
                            self._check_image(b"".join(cur.chunks), label, policy)
                        self.store.place(path, sha)
                        placed.add(sha)
                        n_placed += 1
                        cur = None
                        self._pause.at("received", n_placed)
        except grpc.RpcError:
            # The client went away mid-stream (the caller sees the context inactive): keep what was placed.
            interrupted = True
        finally:
            if cur is not None:
                cur.fh.close()
        if cur is not None and not interrupted:
            raise _EndedEarly(f"{cur.label}: stream ended inside the file")
        return received

    # ------------------------------------------------------------ reader RPCs

    def List(self, request, context):
        return self._guard(context, self._list, request, context)

    def _cut(self, value: str) -> str:
        """A text field as replied: rows stored before the field limit existed are cut, never sent whole."""
        cap = self.pool_limits.max_field_chars
        return value if len(value) <= cap else value[: cap - 1] + "…"

    def _list(self, request, context):
        self._caller(context, "reader", "listing the pool")
        page_bytes = self.pool_limits.page_kb * 1024 if request.paged else OLD_CLIENT_REPLY
        after = None
        if request.page_token:
            try:
                after = tuple(json.loads(request.page_token))
            except ValueError:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"page_token {request.page_token[:64]!r} is not one "
                              "this pool gave out") from None
        out, size, token = [], 0, ""
        last_key: tuple[str, str, str] = ("", "", "")  # the key of the last bundle in this page (out is not empty)
        for b in self.store.list_bundles(request.site_id or None):
            key = (b["site_id"], b["received"], b["bundle_id"])
            if after is not None and list(key) <= list(after):
                continue
            for k in ("created", "received"):
                b[k] = self._cut(b[k])
            info = pool_pb2.BundleInfo(**b)
            n = info.ByteSize() + 8
            if out and size + n > page_bytes:
                if request.paged:
                    token = json.dumps(list(last_key))
                break
            out.append(info)
            size += n
            last_key = key
        return pool_pb2.ListReply(bundles=out, next_page_token=token)

    def Catalog(self, request, context):
        try:
            caller = self._caller(context, "reader", "reading the catalog")
            with self._stream(caller):
                rows = self.store.catalog(request.site_id or None)
                page_bytes = self.pool_limits.page_kb * 1024
                batch, size = [], 0
                for r in rows:
                    gr = r.pop("generator_round")
                    r["record_json"] = r.pop("record")
                    r["created"] = self._cut(r["created"])
                    entry = pool_pb2.CatalogEntry(generator_round=-1 if gr is None else gr, **r)
                    n = entry.ByteSize() + 8
                    if batch and (size + n > page_bytes or len(batch) >= 500):
                        yield pool_pb2.CatalogReply(entries=batch)
                        batch, size = [], 0
                    batch.append(entry)
                    size += n
                if batch:
                    yield pool_pb2.CatalogReply(entries=batch)
        except Refused as r:
            context.abort(r.code, r.message)

    def Fetch(self, request, context):
        try:
            caller = self._caller(context, "reader", "pulling images")
            with self._stream(caller):
                yield from self._fetch(request, context)
        except Refused as r:
            context.abort(r.code, r.message)

    def _fetch(self, request, context):
        hidden = bool(self.store.hidden_sites())
        batch, size = [], 0
        for sha in dict.fromkeys(request.sha256):  # each distinct file once, in the order asked
            n = self.store.indexed_size(sha, hidden)
            if n is None:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"no image {sha[:16]}… in the pool")
            with open(self.store.object_path(sha), "rb") as fh:
                offset = 0
                while True:
                    data = fh.read(CHUNK)
                    last = offset + len(data) >= n
                    batch.append(pool_pb2.FetchChunk(sha256=sha, offset=offset, data=data, last=last))
                    size += len(data)
                    offset += len(data)
                    if size >= BATCH_BYTES:
                        yield pool_pb2.FetchReply(chunks=batch)
                        batch, size = [], 0
                    if last or not data:
                        break
        if batch:
            yield pool_pb2.FetchReply(chunks=batch)


# ---------------------------------------------------------------- progress (self-contained block)

PROGRESS_LOG = "progress.jsonl"   # in the store folder; site progress reports, not pool content
PROGRESS_BURST = 40               # reports a site may send at once (stage transitions come in bursts)
PROGRESS_RATE = 2.0               # reports per second refilled
_PROGRESS_EVENTS = ("start", "progress", "end")


class ProgressService(pool_pb2_grpc.PoolProgressServicer):
    """``Progress``: a site's live stage/ETA report, appended to ``progress.jsonl`` for the coordinator.

    Same mutual-TLS identity check as a push (role site); the site id in the log is the
    certificate's. Each site has a token bucket (``PROGRESS_BURST``, ``PROGRESS_RATE``/s):
    over it the report is not recorded (``recorded=false``), never an error the site must
    handle. Fields are length-checked; the log line is written by one ``write`` under a lock.
    """

    def __init__(self, pool: PoolService, log_path: Path):
        self.pool = pool
        self.log_path = Path(log_path)
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    def _allow(self, site: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(site, (float(PROGRESS_BURST), now))
            tokens = min(float(PROGRESS_BURST), tokens + (now - last) * PROGRESS_RATE)
            ok = tokens >= 1.0
            self._buckets[site] = (tokens - 1.0 if ok else tokens, now)
            return ok

    def Progress(self, request, context):
        return self.pool._guard(context, self._progress, request, context)

    def _progress(self, req, context):
        caller = self.pool._caller(context, "site", "reporting progress")
        for name in ("stage", "task", "unit", "prev"):
            v = getattr(req, name)
            if len(v) > 80 or not v.isprintable():
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"progress {name} must be printable, at most 80 characters")
        if not req.stage:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "progress report without a stage")
        if req.event not in _PROGRESS_EVENTS:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"progress event must be start, progress or end, got {req.event!r}")
        if not self._allow(caller.name):
            return pool_pb2.ProgressReply(recorded=False, message=f"rate limit: at most {PROGRESS_RATE:g} reports/s")
        ev = {"site": caller.name, "stage": req.stage, "event": req.event, "t": round(time.time(), 3),
              "elapsed_s": round(req.elapsed_s, 2)}
        if req.index and req.n_stages:
            ev.update(index=req.index, n_stages=req.n_stages)
        if req.event == "progress":
            ev.update(task=req.task or None, done=req.done, total=req.total or None, unit=req.unit)
            if req.eta_s >= 0:
                ev["eta_s"] = round(req.eta_s, 1)
        if req.event == "start" and req.prev:
            ev.update(prev=req.prev, prev_s=round(req.prev_s, 2))
        if req.failed:
            ev["failed"] = True
        line = (json.dumps(ev, separators=(",", ":")) + "\n").encode()
        with self._lock:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        return pool_pb2.ProgressReply(recorded=True, message="recorded")


# ---------------------------------------------------------------- server


def server_options() -> list:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def build_server(
    store_dir: Path,
    certs: Path,
    address: str,
    limits: BundleLimits = BundleLimits(),
    policy: ThresholdPolicy = ThresholdPolicy(),
    pool_limits: PoolLimitsConfig = PoolLimitsConfig(),
    policy_file: Path | None = None,
) -> tuple[grpc.Server, int, Store]:
    """Create (not start) the server; locks the store and collects garbage first. Returns (server, port, store).

    ``pool_limits.workers`` threads serve calls; an identity holds at most
    ``max_streams_per_identity`` (< workers) of them, so the others stay free for other callers.
    """
    creds = C.load_server_credentials(certs)
    workers = pool_limits.workers
    store = Store(store_dir, lock=True)
    n_staging, n_obj = store.collect_garbage()
    if n_staging or n_obj:
        LOG.warning("collected garbage of interrupted uploads: %d staging entries, %d unindexed files", n_staging, n_obj)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pool"),
                         options=server_options(), maximum_concurrent_rpcs=workers * 4)
    service = PoolService(store, certs, limits, policy, policy_file=policy_file, pool_limits=pool_limits)
    if service.policy_file is not None:
        service.policy_file.current()  # refuse to start with a missing or invalid policy file
    pool_pb2_grpc.add_PoolServicer_to_server(service, server)
    pool_pb2_grpc.add_PoolProgressServicer_to_server(ProgressService(service, Path(store_dir) / PROGRESS_LOG), server)
    tls = grpc.ssl_server_credentials([(creds.key_pem, creds.cert_pem)], root_certificates=creds.ca_pem,
                                      require_client_auth=True)
    port = server.add_secure_port(address, tls)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    return server, port, store


def serve(
    store_dir: Path,
    certs: Path,
    address: str,
    limits: BundleLimits = BundleLimits(),
    policy: ThresholdPolicy = ThresholdPolicy(),
    pool_limits: PoolLimitsConfig = PoolLimitsConfig(),
    port_file: Path | None = None,
    policy_file: Path | None = None,
) -> None:
    """Run until SIGINT/SIGTERM. ``port_file`` receives the bound port (for address ``host:0``)."""
    server, port, store = build_server(store_dir, certs, address, limits, policy, pool_limits, policy_file)
    server.start()
    host = address.rsplit(":", 1)[0]
    LOG.info("pool service on %s:%d (store %s, certs %s)", host, port, store_dir, certs)
    if port_file is not None:
        atomic_write(port_file, f"{port}\n")
    stop = threading.Event()

    def _stop(signum, _frame):
        LOG.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stop.wait()
    server.stop(grace=5).wait()
    store.close()
