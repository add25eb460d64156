"""Reader side of the pool: list bundles and pull the pooled data set.

``pull`` writes ``OUT/<class>/<sha256>.png`` and ``OUT/manifest.json``; files already
present (right name and size) are not fetched again, so a second pull into the same
folder fetches only what is new, and an interrupted pull resumes. Each file is
written to a temporary name, checked against its sha256 and renamed.

``OUT/manifest.json``::

    {"format": "plan-pool-pull/1", "pool": "host:port", "pulled": "<ISO time>",
     "n_images": N, "n_files": F,
     "bundles": [{"bundle_id", "site_id", "created", "generator_sha256", "config_sha256",
                  "generator_round", "n_images"}],
     "images": [{"file": "<class>/<sha256>.png", "sha256", "class_name", "label", "method",
                 "site_id", "bundle_id", "generator_sha256", "config_sha256",
                 "generator_round", "record": {<privacy record, plan_shared.manifest format>}}]}

One entry per (bundle, image): identical content pushed twice appears twice in
``images`` with its two provenances, and once on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, TypeVar

# Quiet gRPC core's own INFO lines (e.g. a handshake failure, which we explain ourselves);
# set before grpc is first imported; an explicit GRPC_VERBOSITY wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402
from tqdm import tqdm

from plan_shared.credentials import CLIENT_CERT, CLIENT_KEY, ClientCredentials, diagnose_tls, load_client_credentials
from plan_shared.pool_proto import pool_pb2, pool_pb2_grpc

T = TypeVar("T")
MAX_MESSAGE = 8 * 1024 * 1024
FETCH_BATCH = 1000
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}


class PoolClientError(RuntimeError):
    """The pool refused a call or could not be reached; the message is for the user."""


def open_channel(pool: str, creds: ClientCredentials, server_name: Optional[str] = None) -> grpc.Channel:
    tls = grpc.ssl_channel_credentials(root_certificates=creds.ca_pem, private_key=creds.key_pem,
                                       certificate_chain=creds.cert_pem)
    options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(pool, tls, options=options)


def is_tls_failure(err: grpc.RpcError) -> bool:
    d = (err.details() or "").lower()
    return err.code() == grpc.StatusCode.UNAVAILABLE and any(
        k in d for k in ("handshake", "ssl", "tls", "certificate", "tsi_")
    )


def describe_error(err: grpc.RpcError, pool: str) -> str:
    code, details = err.code(), err.details() or ""
    if is_tls_failure(err):
        return (f"TLS handshake with the pool at {pool} failed: the pool accepts only client certificates "
                f"issued by its CA, and this client trusts only its ca.crt ({details})")
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"pool at {pool} unavailable: {details}"
    return f"pool refused: {details} [{code.name}]"


def call_with_retries(fn: Callable[[], T], pool: str, retries: int, backoff: float,
                      log: Callable[[str], None] = lambda m: None,
                      creds: Optional[ClientCredentials] = None, server_name: Optional[str] = None) -> T:
    """Run ``fn``; on a transient failure wait backoff·2^k (max 30 s) and retry, at most ``retries`` times.

    With ``creds``, an UNAVAILABLE error is first checked for a TLS refusal (not retried).
    """
    attempt = 0
    while True:
        try:
            return fn()
        except grpc.RpcError as err:
            if creds is not None and err.code() == grpc.StatusCode.UNAVAILABLE:
                diag = diagnose_tls(pool, creds.ca_pem, creds.directory / CLIENT_CERT,
                                    creds.directory / CLIENT_KEY, server_name)
                if diag:
                    raise PoolClientError(diag) from None
            if err.code() not in RETRYABLE or is_tls_failure(err) or attempt >= retries:
                raise PoolClientError(describe_error(err, pool)) from None
            wait = min(backoff * (2 ** attempt), 30.0)
            attempt += 1
            log(f"{describe_error(err, pool)}; retry {attempt}/{retries} in {wait:.1f} s")
            time.sleep(wait)


def _reader(credentials: Path) -> ClientCredentials:
    creds = load_client_credentials(credentials)
    if creds.role != "reader":
        raise PoolClientError(f"{credentials}: these are {creds.role} credentials; listing and pulling need a reader")
    return creds


def list_bundles(pool: str, credentials: Path, site: Optional[str] = None, retries: int = 3,
                 backoff: float = 1.0, server_name: Optional[str] = None) -> list[dict]:
    creds = _reader(credentials)
    with open_channel(pool, creds, server_name) as ch:
        stub = pool_pb2_grpc.PoolStub(ch)
        bundles, token = [], ""
        while True:  # the pool pages its reply by bytes: follow the pages
            reply = call_with_retries(
                lambda: stub.List(pool_pb2.ListRequest(site_id=site or "", paged=True, page_token=token), timeout=60),
                pool, retries, backoff, creds=creds, server_name=server_name)
            bundles.extend(reply.bundles)
            if not reply.next_page_token:
                break
            token = reply.next_page_token
    out = []
    for b in bundles:
        out.append({
            "bundle_id": b.bundle_id, "site_id": b.site_id, "n_images": b.n_images, "n_bytes": b.n_bytes,
            "created": b.created, "received": b.received, "generator_sha256": b.generator_sha256,
            "config_sha256": b.config_sha256, "per_class": dict(b.per_class), "per_method": dict(b.per_method),
        })
    return out


@dataclass
class PullResult:
    n_images: int      # catalog entries (bundle, image)
    n_files: int       # distinct files on disk
    n_fetched: int     # files fetched by this pull
    bytes_fetched: int
    seconds: float


def _file_ok(path: Path, size: int, sha: str, verify: bool) -> bool:
    try:
        if path.stat().st_size != size:
            return False
    except FileNotFoundError:
        return False
    if not verify:
        return True
    h = hashlib.sha256(path.read_bytes()).hexdigest()
    return h == sha


def pull(pool: str, credentials: Path, out: Path, site: Optional[str] = None, retries: int = 3,
         backoff: float = 1.0, progress: bool = True, verify: bool = False,
         server_name: Optional[str] = None, log: Callable[[str], None] = lambda m: None) -> PullResult:
    """Pull the pool (or one site's part) into ``out`` (see the module docstring)."""
    t0 = time.perf_counter()
    creds = _reader(credentials)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open_channel(pool, creds, server_name) as ch:
        stub = pool_pb2_grpc.PoolStub(ch)

        def catalog() -> list:
            entries = []
            for reply in stub.Catalog(pool_pb2.CatalogRequest(site_id=site or ""), timeout=600):
                entries.extend(reply.entries)
            return entries

        entries = call_with_retries(catalog, pool, retries, backoff, log, creds, server_name)
        # Distinct files wanted: sha -> (size, [relative paths])
        files: dict[str, tuple[int, list[str]]] = {}
        for e in entries:
            rel = f"{e.class_name}/{e.sha256}.png"
            size, paths = files.setdefault(e.sha256, (e.size, []))
            if rel not in paths:
                paths.append(rel)
        todo = []
        for sha, (size, paths) in files.items():
            present = [p for p in paths if _file_ok(out / p, size, sha, verify)]
            if not present:
                todo.append(sha)
            else:
                for p in paths:
                    if p not in present:
                        _copy_into(out / present[0], out / p)
        fetched, nbytes = 0, 0
        written: set[str] = set()
        bar = tqdm(total=len(todo), unit="img", desc="pull", disable=not progress or not todo)
        staging = out / ".partial"
        staging.mkdir(exist_ok=True)
        try:
            for i in range(0, len(todo), FETCH_BATCH):
                batch = todo[i: i + FETCH_BATCH]

                def fetch(batch=batch) -> tuple[int, int]:
                    done, got = 0, 0
                    cur_sha, fh, hasher = None, None, None
                    remaining = [s for s in batch if s not in written]  # a retry skips what arrived
                    if not remaining:
                        return 0, 0
                    try:
                        for reply in stub.Fetch(pool_pb2.FetchRequest(sha256=remaining), timeout=3600):
                            for c in reply.chunks:
                                if c.sha256 != cur_sha:
                                    if fh is not None:
                                        raise PoolClientError(f"pool sent {cur_sha[:12]}… incomplete")
                                    cur_sha, hasher = c.sha256, hashlib.sha256()
                                    if cur_sha not in files:
                                        raise PoolClientError(f"pool sent an unrequested file {cur_sha[:12]}…")
                                    fh = open(staging / cur_sha, "wb")
                                fh.write(c.data)
                                hasher.update(c.data)
                                got += len(c.data)
                                if c.last:
                                    fh.close()
                                    fh = None
                                    if hasher.hexdigest() != cur_sha:
                                        raise PoolClientError(f"file {cur_sha[:12]}… from the pool does not match its sha256")
                                    paths = files[cur_sha][1]
                                    target = out / paths[0]
                                    target.parent.mkdir(parents=True, exist_ok=True)
                                    os.replace(staging / cur_sha, target)
                                    for p in paths[1:]:
                                        _copy_into(target, out / p)
                                    written.add(cur_sha)
                                    done += 1
                                    bar.update(1)
                                    cur_sha = None
                    finally:
                        if fh is not None:
                            fh.close()
                    return done, got

                d, g = call_with_retries(fetch, pool, retries, backoff, log, creds, server_name)
                fetched += d
                nbytes += g
        finally:
            bar.close()
            shutil.rmtree(staging, ignore_errors=True)
    _write_manifest(out, pool, entries)
    return PullResult(len(entries), len(files), fetched, nbytes, time.perf_counter() - t0)


def _copy_into(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _write_manifest(out: Path, pool: str, entries: list) -> None:
    images, bundles = [], {}
    for e in entries:
        record = json.loads(e.record_json)
        gr = None if e.generator_round < 0 else e.generator_round
        images.append({
            "file": f"{e.class_name}/{e.sha256}.png",
            "sha256": e.sha256,
            "class_name": e.class_name,
            "label": record["label"],
            "method": record["method"],
            "site_id": e.site_id,
            "bundle_id": e.bundle_id,
            "generator_sha256": e.generator_sha256,
            "config_sha256": e.config_sha256,
            "generator_round": gr,
            "record": record,
        })
        b = bundles.setdefault(e.bundle_id, {
            "bundle_id": e.bundle_id, "site_id": e.site_id, "created": e.created,
            "generator_sha256": e.generator_sha256, "config_sha256": e.config_sha256,
            "generator_round": gr, "n_images": 0,
        })
        b["n_images"] += 1
    doc = {
        "format": "plan-pool-pull/1",
        "pool": pool,
        "pulled": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_images": len(images),
        "n_files": len({i["file"] for i in images}),
        "bundles": list(bundles.values()),
        "images": images,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out / "manifest.json")
