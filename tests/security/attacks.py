"""Helpers for the attack tests: raw pool streams a misbehaving site or reader would open."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc

from client.export import prepare
from plan_shared.bundle import SignedBundle, load_signing_key, parse_bundle_manifest, with_bundle_id
from plan_shared.credentials import load_client_credentials
from plan_shared.pool_proto import pool_pb2, pool_pb2_grpc
from server.pool.store import Store


def channel(address: str, creds_dir: Path) -> grpc.Channel:
    c = load_client_credentials(creds_dir)
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(c.ca_pem, c.key_pem, c.cert_pem))


def stub(ch: grpc.Channel) -> pool_pb2_grpc.PoolStub:
    return pool_pb2_grpc.PoolStub(ch)


def header(signed: SignedBundle) -> list[pool_pb2.PushRequest]:
    return [pool_pb2.PushRequest(manifest_part=signed.manifest_bytes), pool_pb2.PushRequest(signature=signed.signature)]


def file_messages(signed: SignedBundle, n_files: int | None = None, half_of_next: bool = False) -> list:
    """One PushRequest per image (in manifest order) for the first ``n_files`` distinct images;
    optionally the first half of the next one (``last`` not set)."""
    msgs, done = [], set()
    for i, im in enumerate(signed.manifest.images):
        if im.record.sha256 in done:
            continue
        data = signed.image_path(i).read_bytes()
        if n_files is not None and len(done) >= n_files:
            if half_of_next:
                msgs.append(pool_pb2.PushRequest(chunks=[pool_pb2.FileChunk(index=i, offset=0, data=data[: len(data) // 2])]))
            break
        msgs.append(pool_pb2.PushRequest(chunks=[pool_pb2.FileChunk(index=i, offset=0, data=data, last=True)]))
        done.add(im.record.sha256)
    return msgs


def report_message(signed: SignedBundle) -> pool_pb2.PushRequest:
    data = signed.report_path.read_bytes()
    return pool_pb2.PushRequest(chunks=[pool_pb2.FileChunk(report=True, offset=0, data=data, last=True)])


def held(msgs: list, release: threading.Event, then: list = (), hold_s: float = 60.0) -> Iterator:
    """Yield ``msgs``, wait for ``release`` (at most ``hold_s``), then yield ``then``."""
    yield from msgs
    release.wait(hold_s)
    yield from then


def resign(out: Path, creds_dir: Path, edit) -> SignedBundle:
    """A bundle whose signed manifest the site itself edited (bypassing the client's checks)."""
    creds, signed = prepare(out, creds_dir)
    raw = json.loads(signed.manifest_bytes)
    edit(raw)
    data = with_bundle_id(raw)
    sig = load_signing_key(creds.signing_key_path).sign(data)
    return SignedBundle(out, data, sig, parse_bundle_manifest(data))


def leftovers(store_dir: Path) -> list[str]:
    """Staging entries and unindexed object files of the store (what an upload left behind)."""
    st = Store(store_dir, create=False, readonly=True)
    try:
        rep = st.check()
    finally:
        st.close()
    assert rep.ok, rep.problems
    return rep.garbage
