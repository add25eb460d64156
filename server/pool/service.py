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
limits hold. Refusals are gRPC errors whose details are the reason
(``PERMISSION_DENIED`` for who/signature, ``INVALID_ARGUMENT`` for content).

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
import shutil
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import grpc

from plan_shared import credentials as C
from plan_shared.bundle import (
    PNG_MAGIC,
    BundleError,
    BundleLimits,
    BundleManifest,
    ThresholdPolicy,
    check_bundle,
    parse_bundle_manifest,
    unique_images,
    verify_signature,
)
from plan_shared.pool_proto import pool_pb2, pool_pb2_grpc
from server.pool.store import Store, StoreError

LOG = logging.getLogger("plan.pool")
CHUNK = 256 * 1024
BATCH_BYTES = 1024 * 1024
MAX_MESSAGE = 8 * 1024 * 1024
PAUSE_ENV = "PLAN_POOL_TEST_PAUSE"


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Caller:
    name: str
    role: str
    serial: str


class Registry:
    """registry.json, re-read whenever its (inode, size, mtime) changes. Fails closed."""

    def __init__(self, certs: Path):
        self.path = Path(certs) / C.REGISTRY
        self._lock = threading.Lock()
        self._stamp: Optional[tuple] = None
        self._identities: dict = {}

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


class PoolService(pool_pb2_grpc.PoolServicer):
    def __init__(
        self,
        store: Store,
        certs: Path,
        limits: BundleLimits = BundleLimits(),
        policy: ThresholdPolicy = ThresholdPolicy(),
    ):
        self.store = store
        self.registry = Registry(certs)
        self.limits = limits
        self.policy = policy
        self._pause = _Pause()

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
        entry = self.registry.identities().get(ident.name)
        who = f"certificate {ident.name!r} (serial {ident.serial[:16]})"
        if entry is None:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"{who} is not registered at this pool")
        if entry.get("revoked"):
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"{who} is revoked")
        if str(entry.get("serial")) != ident.serial:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"{who} has been replaced by a newer certificate")
        if ident.role != entry.get("role"):
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who} carries role {ident.role!r}, the registry says {entry.get('role')!r}",
            )
        if entry["role"] != role:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who} has role {entry['role']!r}; {action} needs role {role!r}",
            )
        return Caller(ident.name, entry["role"], ident.serial)

    # ------------------------------------------------------------ bundle header

    def _read_header(self, it: Iterable) -> tuple[bytes, bytes]:
        """Read manifest parts up to and including the signature message."""
        parts: list[bytes] = []
        size = 0
        for msg in it:
            if msg.manifest_part:
                size += len(msg.manifest_part)
                if size > self.limits.max_manifest_bytes:
                    raise Refused(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"bundle manifest exceeds {self.limits.max_manifest_bytes} bytes",
                    )
                parts.append(msg.manifest_part)
            elif msg.signature:
                return b"".join(parts), msg.signature
            else:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "file data before the manifest signature")
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "stream ended before the manifest signature")

    def _verify_header(self, caller: Caller, manifest: bytes, signature: bytes) -> BundleManifest:
        try:
            bm = parse_bundle_manifest(manifest, self.limits)
        except BundleError as err:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
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
            check_bundle(bm, self.limits, self.policy)
        except BundleError as err:
            code = grpc.StatusCode.PERMISSION_DENIED if "signature" in str(err) else grpc.StatusCode.INVALID_ARGUMENT
            raise Refused(code, str(err)) from None
        return bm

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
        manifest, signature = self._read_header(it)
        bm = self._verify_header(caller, manifest, signature)
        if self.store.has_bundle(bm.bundle_id):
            return pool_pb2.OfferReply(bundle_id=bm.bundle_id, duplicate=True, message="already stored")
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
        it = iter(it)
        manifest, signature = self._read_header(it)
        bm = self._verify_header(caller, manifest, signature)
        if self.store.has_bundle(bm.bundle_id):
            LOG.info("duplicate bundle %s from %s", bm.bundle_id[:12], caller.name)
            return pool_pb2.PushReply(bundle_id=bm.bundle_id, duplicate=True, n_images=len(bm.images),
                                      message="already stored")
        staging = self.store.new_staging()
        placed: set[str] = set()
        received = 0
        ok = False
        try:
            received = self._receive(it, bm, staging, placed)
            if not context.is_active():
                raise Refused(grpc.StatusCode.CANCELLED, "upload interrupted")
            wanted = dict(unique_images(bm))
            if bm.report_sha256 is not None:
                wanted.setdefault(bm.report_sha256, bm.report_size)
            absent = self.store.missing({s: n for s, n in wanted.items() if s not in placed})
            if absent:
                idx = next((i for i, im in enumerate(bm.images) if im.record.sha256 in absent), None)
                what = f"images[{idx}] (id {bm.images[idx].record.id!r})" if idx is not None else "report.json"
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{len(absent)} file(s) of the bundle were not sent, first: {what}")
            # Durable before visible: fsync every file this bundle adds (received now or left by an
            # interrupted attempt), then the directories; only then the one-transaction commit.
            self.store.make_durable(self.store.unindexed(set(wanted)))
            try:
                res = self.store.commit(bm, manifest, signature, caller.serial,
                                        before_commit=lambda: self._pause.at("before_commit"),
                                        in_transaction=lambda: self._pause.at("in_transaction"))
            except StoreError as err:
                raise Refused(grpc.StatusCode.ABORTED, f"{err}; retry the push") from None
            self._pause.at("after_commit")
            ok = True
        except Refused as r:
            if r.code != grpc.StatusCode.CANCELLED and r.code != grpc.StatusCode.ABORTED:
                self.store.discard_unindexed(placed)   # refused: keep nothing of it
            raise
        except OSError as err:  # e.g. disk full: nothing becomes visible; tell the client
            LOG.error("storage error during push of %s: %s", bm.bundle_id[:12], err)
            self.store.discard_unindexed(placed)
            raise Refused(grpc.StatusCode.INTERNAL, f"pool storage error: {err}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if not ok and not context.is_active():
                LOG.info("push of %s from %s interrupted after %d bytes; %d verified files kept for a retry",
                         bm.bundle_id[:12], caller.name, received, len(placed))
        LOG.info("%s bundle %s from %s: %d images, %d new files, %d bytes received",
                 "duplicate" if res.duplicate else "stored", bm.bundle_id[:12], caller.name,
                 res.n_images, res.n_new_files, received)
        return pool_pb2.PushReply(
            bundle_id=bm.bundle_id, duplicate=res.duplicate, n_images=res.n_images,
            n_new_files=res.n_new_files, bytes_received=received,
            message="already stored" if res.duplicate else "stored",
        )

    def _receive(self, it, bm: BundleManifest, staging: Path, placed: set) -> int:
        """Write incoming files to staging, verify each, place it. Returns bytes received."""
        received = 0
        cur = None  # [key, sha, size, fh, hasher, written, path, label, first bytes]
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
                    if cur is None or cur[0] != key:
                        if cur is not None:
                            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{cur[7]}: incomplete before the next file")
                        if ch.offset != 0:
                            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{label}: first chunk at offset {ch.offset}")
                        path = staging / f"{sha}.part"
                        cur = [key, sha, size, open(path, "wb"), hashlib.sha256(), 0, path, label, b""]
                    if ch.offset != cur[5]:
                        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{label}: chunk at offset {ch.offset}, expected {cur[5]}")
                    if cur[5] + len(ch.data) > size:
                        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                      f"{label}: more than the {size} bytes the signed manifest declares")
                    if len(cur[8]) < len(PNG_MAGIC):
                        cur[8] += ch.data[: len(PNG_MAGIC)]
                    cur[3].write(ch.data)
                    cur[4].update(ch.data)
                    cur[5] += len(ch.data)
                    if ch.last:
                        fh, digest, written, path = cur[3], cur[4].hexdigest(), cur[5], cur[6]
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
                        if key != "report" and cur[8][: len(PNG_MAGIC)] != PNG_MAGIC:
                            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{label}: not a PNG file")
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
                cur[3].close()
        if cur is not None and not interrupted:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{cur[7]}: stream ended inside the file")
        return received

    # ------------------------------------------------------------ reader RPCs

    def List(self, request, context):
        return self._guard(context, self._list, request, context)

    def _list(self, request, context):
        self._caller(context, "reader", "listing the pool")
        out = []
        for b in self.store.list_bundles(request.site_id or None):
            out.append(pool_pb2.BundleInfo(**b))
        return pool_pb2.ListReply(bundles=out)

    def Catalog(self, request, context):
        try:
            self._caller(context, "reader", "reading the catalog")
            rows = self.store.catalog(request.site_id or None)
        except Refused as r:
            context.abort(r.code, r.message)
        batch = []
        for r in rows:
            gr = r.pop("generator_round")
            r["record_json"] = r.pop("record")
            batch.append(pool_pb2.CatalogEntry(generator_round=-1 if gr is None else gr, **r))
            if len(batch) >= 500:
                yield pool_pb2.CatalogReply(entries=batch)
                batch = []
        if batch:
            yield pool_pb2.CatalogReply(entries=batch)

    def Fetch(self, request, context):
        try:
            self._caller(context, "reader", "pulling images")
        except Refused as r:
            context.abort(r.code, r.message)
        batch, size = [], 0
        for sha in request.sha256:
            n = self.store.indexed_size(sha)
            if n is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no image {sha[:16]}… in the pool")
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
    workers: int = 16,
) -> tuple[grpc.Server, int, Store]:
    """Create (not start) the server; collects garbage first. Returns (server, bound port, store)."""
    creds = C.load_server_credentials(certs)
    store = Store(store_dir)
    n_staging, n_obj = store.collect_garbage()
    if n_staging or n_obj:
        LOG.warning("collected garbage of interrupted uploads: %d staging entries, %d unindexed files", n_staging, n_obj)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pool"),
                         options=server_options(), maximum_concurrent_rpcs=workers * 4)
    service = PoolService(store, certs, limits, policy)
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
    workers: int = 16,
    port_file: Optional[Path] = None,
) -> None:
    """Run until SIGINT/SIGTERM. ``port_file`` receives the bound port (for address ``host:0``)."""
    server, port, store = build_server(store_dir, certs, address, limits, policy, workers)
    server.start()
    host = address.rsplit(":", 1)[0]
    LOG.info("pool service on %s:%d (store %s, certs %s)", host, port, store_dir, certs)
    if port_file is not None:
        tmp = Path(str(port_file) + ".tmp")
        tmp.write_text(f"{port}\n")
        os.replace(tmp, port_file)
    stop = threading.Event()

    def _stop(signum, _frame):
        LOG.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stop.wait()
    server.stop(grace=5).wait()
    store.close()
