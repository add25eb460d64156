"""Helpers for the attack tests: bundles that satisfy the federation policy, signed re-edits, raw pushes."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from client.export import prepare
from plan_shared.bundle import SignedBundle, load_signing_key, sha256_bytes
from plan_shared.credentials import load_client_credentials
from plan_shared.pool_proto import pool_pb2, pool_pb2_grpc
from server.pool.store import Store
from tests.pool_support import make_site_dir, rewrite_manifest

#: The federation's final generator in these tests (what the ServerApp publishes).
GEN = hashlib.sha256(b"final generator weights").hexdigest()

#: The policy file the test pools run with (plan_shared/policy.py format).
POLICY = {
    "format": "plan-pool-policy/1", "max_tau_id": 0.5, "max_tau_indep": 0.5, "min_delta": None,
    "min_delta_quantile": 0.05, "min_k": 5, "min_planted": 4, "all_planted_rejected": True,
    "methods": ["plan", "linear"], "image_size": 28, "channels": 1, "num_classes": 2, "max_pixels": 28 * 28,
    "generator_sha256": GEN,
}


def write_policy(path: Path, **changes: Any) -> Path:
    doc = dict(POLICY, **changes)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    return path


def site_report(n: int, **filter_changes: Any) -> dict:
    """A report.json as client/pipeline.py writes it (the keys the policy reads)."""
    filt = {"tau_id": 0.5, "tau_indep": 0.5, "delta": 1.0, "delta_quantile": 0.05, "planted_total": 4,
            "planted_rejected": 4, "export_blocked": False, "sensitivity_ok": True}
    filt.update(filter_changes)
    return {"n_candidates": 2 * n, "n_accepted": n, "filter": filt, "anchors": {"k": 5, "pairs_m": 3}}


def policy_site_dir(out: Path, site: str, n: int = 4, seed: int = 0, report: dict | None = None,
                    edit: Callable[[dict], None] | None = None) -> Path:
    """A site output dir that satisfies POLICY (28x28 grey PNGs, method plan, generator GEN, full report)."""
    make_site_dir(out, site, n, seed=seed, size=28)

    def fix(m: dict) -> None:
        m["generator_sha256"] = GEN
        for r in m["images"]:
            r["method"] = "plan"
        if edit is not None:
            edit(m)

    rewrite_manifest(out, fix)
    (out / "report.json").write_text(json.dumps(report if report is not None else site_report(n)))
    return out


def replace_image(out: Path, index: int, data: bytes) -> None:
    """Put other bytes in place of image ``index`` (the site signs them: the manifest's sha256 follows)."""
    m = json.loads((out / "manifest.json").read_text())
    rec = m["images"][index]
    (out / rec["file"]).write_bytes(data)
    rec["sha256"] = hashlib.sha256(data).hexdigest()
    (out / "manifest.json").write_text(json.dumps(m, indent=1))


def signed_raw(out: Path, creds_dir: Path, edit: Callable[[dict], None], dumps=None) -> SignedBundle:
    """The bundle of ``out`` with its signed manifest edited by the site itself (bypassing the client's checks).

    ``dumps`` turns the edited dict into bytes (default: canonical JSON with a fresh bundle_id).
    """
    from plan_shared.bundle import with_bundle_id

    creds, signed = prepare(out, creds_dir)
    raw = json.loads(signed.manifest_bytes)
    edit(raw)
    data = dumps(raw) if dumps is not None else with_bundle_id(raw)
    sig = load_signing_key(creds.signing_key_path).sign(data)
    return SignedBundle(out, data, sig, signed.manifest)


def attempt(signed: SignedBundle, creds_dir: Path, address: str) -> tuple[str, str]:
    """Offer, then Push what the pool asks for, as the client does. Returns (status code name, details)."""
    creds = load_client_credentials(creds_dir)
    chan = grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)

    def header(cls):
        data = signed.manifest_bytes
        for i in range(0, len(data), 1 << 20):
            yield cls(manifest_part=data[i: i + (1 << 20)])
        yield cls(signature=signed.signature)

    with grpc.secure_channel(address, chan, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = pool_pb2_grpc.PoolStub(ch)
        try:
            offer = stub.Offer(header(pool_pb2.OfferRequest), timeout=60)
            if offer.duplicate:
                return "OK", "duplicate"

            def requests():
                yield from header(pool_pb2.PushRequest)
                files = [(signed.image_path(i), i, False) for i in offer.need]
                if offer.need_report:
                    files.append((signed.report_path, 0, True))
                for path, index, report in files:
                    data = path.read_bytes()
                    yield pool_pb2.PushRequest(chunks=[pool_pb2.FileChunk(index=index, report=report, offset=0,
                                                                          data=data, last=True)])

            reply = stub.Push(requests(), timeout=60)
        except grpc.RpcError as err:
            return err.code().name, err.details()
    return "OK", reply.message


def store_state(store_dir: Path) -> tuple[set[str], list[str], list[str]]:
    """(bundle ids, problems, garbage) of a running pool's store, read-only."""
    st = Store(store_dir, create=False, readonly=True)
    try:
        rep = st.check()
        ids = {r[0] for r in st._db.execute("SELECT bundle_id FROM bundles")}
    finally:
        st.close()
    return ids, rep.problems, rep.garbage


def assert_refused_and_clean(server, signed: SignedBundle, code: str, details: str, want_code: str, want: str) -> None:
    assert (code, details) == (want_code, want) or (code == want_code and want in details), (code, details)
    ids, problems, garbage = store_state(server.store)
    m = re.search(rb'"bundle_id":\s*"([0-9a-f]{64})"', signed.manifest_bytes)  # json.loads may not cope
    bid = m.group(1).decode() if m else None
    assert bid not in ids
    assert problems == [] and garbage == [], (problems, garbage)


# ---------------------------------------------------------------- PNG builders


def chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload) & 0xFFFFFFFF)


def png_with(width: int, height: int, idat: bytes, depth: int = 8, colour: int = 0, extra: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"") + extra


def bomb(side: int) -> bytes:
    """An IHDR claiming side x side grey pixels behind a small IDAT (zeros compress ~1000:1)."""
    return png_with(side, side, zlib.compress(b"\x00" * (1 << 20), 9))


def index_copy(store_dir: Path, dst: Path) -> Path:
    """A consistent copy of a running pool's index (SQLite backup API)."""
    src = sqlite3.connect(f"file:{store_dir / 'index.sqlite'}?mode=ro", uri=True)
    out = sqlite3.connect(dst)
    src.backup(out)
    src.close()
    out.close()
    return dst


__all__ = ["GEN", "POLICY", "attempt", "assert_refused_and_clean", "bomb", "chunk", "index_copy", "png_with",
           "policy_site_dir", "replace_image", "sha256_bytes", "signed_raw", "site_report", "store_state",
           "write_policy"]
