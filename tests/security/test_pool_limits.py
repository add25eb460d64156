"""No site can block the pool, and no stored row can break reading it (issue 12, deliverable 5).

Every test attacks a real ``python -m server.pool serve`` process over real mutual TLS.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from client.export import export, prepare
from plan_shared.config import PoolLimitsConfig
from plan_shared.pool_proto import pool_pb2
from server.pool.client import list_bundles, pull
from server.pool.process import limits_args
from server.pool.store import Store
from tests.pool_support import PoolServer, make_site_dir
from tests.security.attacks import channel, file_messages, header, held, leftovers, report_message, resign, stub

pytestmark = pytest.mark.slow

LIMITS = ("--max-streams-per-identity", "4", "--idle-timeout-s", "30", "--site-quota-images", "30",
          "--site-quota-mb", "0.06", "--max-manifest-kb", "64", "--keep-interrupted-s", "0", "--page-kb", "2")


@pytest.fixture(scope="module")
def server(pki, tmp_path_factory):
    work = tmp_path_factory.mktemp("server")
    with PoolServer(work / "store", pki.certs, work, extra=LIMITS) as srv:
        yield srv
        log = srv.log()
    print(log)


def _wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def test_idle_push_streams_of_one_site_do_not_starve_others(pki, server, tmp_path):
    release = threading.Event()
    out = tmp_path / "idle"
    make_site_dir(out, "site-a", 2, seed=1)
    _, signed = prepare(out, pki.site("site-a"))
    ch = channel(server.address, pki.site("site-a"))
    calls = [stub(ch).Push.future(held([], release), timeout=60) for _ in range(16)]
    try:
        time.sleep(1.0)  # all 16 streams are open and send nothing
        other = tmp_path / "other"
        make_site_dir(other, "site-b", 4, seed=2)
        _, theirs = prepare(other, pki.site("site-b"))
        with channel(server.address, pki.site("site-b")) as bch:
            reply = stub(bch).Push(iter(header(theirs) + file_messages(theirs) + [report_message(theirs)]), timeout=10)
        assert not reply.duplicate and reply.n_images == 4
        refused = [c.exception() for c in calls if c.done()]
        assert len(refused) == 12
        for e in refused:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert e.details() == "identity 'site-a' already has 4 open streams (limit 4)"
    finally:
        release.set()
        for c in calls:
            c.cancel()
        ch.close()


def test_reader_calls_succeed_within_their_deadline_while_a_site_holds_streams(pki, server, tmp_path):
    release = threading.Event()
    ch = channel(server.address, pki.site("site-a"))
    calls = [stub(ch).Offer.future(held([], release), timeout=60) for _ in range(16)]
    try:
        time.sleep(1.0)
        with channel(server.address, pki.reader) as rch:
            reply = stub(rch).List(pool_pb2.ListRequest(), timeout=5)
        assert reply is not None
    finally:
        release.set()
        for c in calls:
            c.cancel()
        ch.close()


def test_cancelled_push_leaves_no_files(pki, server, tmp_path):
    out = tmp_path / "cancel"
    make_site_dir(out, "site-a", 8, seed=3)
    _, signed = prepare(out, pki.site("site-a"))
    release = threading.Event()
    with channel(server.address, pki.site("site-a")) as ch:
        call = stub(ch).Push.future(held(header(signed) + file_messages(signed, 5, half_of_next=True), release),
                                    timeout=60)
        # Wait until the server has placed the 5 verified files and staged the half one.
        assert _wait_until(lambda: len(leftovers(server.store)) >= 2), leftovers(server.store)
        call.cancel()  # the request stream stays open: the server sees the cancellation, not an end
        try:
            assert _wait_until(lambda: leftovers(server.store) == [], 5.0), leftovers(server.store)
        finally:
            release.set()
    # The server removes the files before the call's handler logs the cancellation (the log line is
    # written after the exception leaves the push): wait for the line rather than read it at once.
    assert _wait_until(lambda: "upload interrupted" in server.log(), 5.0), server.log()


def test_site_quota_refuses_naming_site_quota_and_usage(pki, server, tmp_path):
    first, second, big = tmp_path / "q1", tmp_path / "q2", tmp_path / "q3"
    make_site_dir(first, "site-c", 20, seed=4)
    make_site_dir(second, "site-c", 20, seed=5)
    make_site_dir(big, "site-c", 8, seed=6, size=90)
    r1 = export(first, server.address, pki.site("site-c"), retries=0, progress=False)
    assert not r1.duplicate
    stored = sum(b["n_bytes"] for b in list_bundles(server.address, pki.reader, "site-c"))
    for out, kind in ((second, "image"), (big, "byte")):
        _, signed = prepare(out, pki.site("site-c"))
        with channel(server.address, pki.site("site-c")) as ch, pytest.raises(grpc.RpcError) as ei:
            stub(ch).Push(iter(header(signed) + file_messages(signed) + [report_message(signed)]), timeout=30)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        if kind == "image":
            assert ei.value.details() == "site 'site-c' is over its image quota: 30 allowed, 20 stored, this bundle adds 20"
        else:
            adds = signed.manifest.total_bytes
            assert ei.value.details() == (f"site 'site-c' is over its byte quota: {int(0.06 * 2**20)} allowed, "
                                          f"{stored} stored, this bundle adds {adds}")
    assert [b["bundle_id"] for b in list_bundles(server.address, pki.reader, "site-c")] == [r1.bundle_id]
    assert leftovers(server.store) == []


def test_oversized_manifest_refused_before_parsing(pki, server):
    release = threading.Event()
    junk = [pool_pb2.PushRequest(manifest_part=b"{" * 50_000) for _ in range(4)]  # 200 kB, no signature follows
    with channel(server.address, pki.site("site-a")) as ch:
        call = stub(ch).Push.future(held(junk, release), timeout=10)
        try:
            with pytest.raises(grpc.RpcError) as ei:
                call.result()
        finally:
            release.set()
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details() == "bundle manifest exceeds 65536 bytes (--max-manifest-kb)"


def test_huge_field_refused_at_ingest_and_list_is_paged(pki, server, tmp_path):
    out = tmp_path / "huge"
    make_site_dir(out, "site-b", 3, seed=7)
    signed = resign(out, pki.site("site-b"), lambda m: m.update(created="2025-01-01T00:00:00+00:00" + " " * 9_000_000))
    with channel(server.address, pki.site("site-b")) as ch, pytest.raises(grpc.RpcError) as ei:
        data = signed.manifest_bytes
        parts = [pool_pb2.PushRequest(manifest_part=data[i: i + (1 << 20)]) for i in range(0, len(data), 1 << 20)]
        stub(ch).Push(iter(parts + [pool_pb2.PushRequest(signature=signed.signature)] + file_messages(signed)
                           + [report_message(signed)]), timeout=30)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Refused either by the manifest size limit or by the field length limit, never stored.
    assert ei.value.details().startswith("bundle manifest exceeds") or "'created'" in ei.value.details()
    # Under the manifest limit, the field limit refuses it, naming the field.
    long = "2025-01-01T00:00:00+00:00" + " " * 300
    signed = resign(out, pki.site("site-b"), lambda m: m.update(created=long))
    with channel(server.address, pki.site("site-b")) as ch, pytest.raises(grpc.RpcError) as ei:
        stub(ch).Push(iter(header(signed) + file_messages(signed) + [report_message(signed)]), timeout=30)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details() == (f"bundle manifest: key 'created' is {len(long)} characters long, at most 256 "
                                  "(--max-field-chars)")
    assert leftovers(server.store) == []
    # List replies are paged by bytes (2 kB here): the client follows the pages.
    for seed in range(10, 16):
        d = tmp_path / f"p{seed}"
        make_site_dir(d, "site-b", 2, seed=seed)
        export(d, server.address, pki.site("site-b"), retries=0, progress=False)
    with channel(server.address, pki.reader) as ch:
        first = stub(ch).List(pool_pb2.ListRequest(paged=True), timeout=10)
        unpaged = stub(ch).List(pool_pb2.ListRequest(), timeout=10)  # what a client from before paging gets
    assert first.next_page_token and first.ByteSize() < 4096
    everything = list_bundles(server.address, pki.reader)
    assert len(everything) > len(first.bundles) and len({b["bundle_id"] for b in everything}) == len(everything)
    assert [b.bundle_id for b in unpaged.bundles] == [b["bundle_id"] for b in everything]
    assert not unpaged.next_page_token


def test_fetch_serves_each_image_once_per_call(pki, server, tmp_path):
    out = tmp_path / "dup"
    make_site_dir(out, "site-b", 2, seed=20)
    export(out, server.address, pki.site("site-b"), retries=0, progress=False)
    _, signed = prepare(out, pki.site("site-b"))
    sha = signed.manifest.images[0].record.sha256
    with channel(server.address, pki.reader) as ch:
        chunks = [c for r in stub(ch).Fetch(pool_pb2.FetchRequest(sha256=[sha] * 1000), timeout=30) for c in r.chunks]
    assert sum(len(c.data) for c in chunks) == signed.manifest.images[0].size
    assert [c.sha256 for c in chunks if c.last] == [sha]


def test_second_server_on_the_same_store_refused(pki, server, tmp_path):
    second = PoolServer(server.store, pki.certs, tmp_path)
    try:
        with pytest.raises(RuntimeError) as ei:
            second.start(timeout=30)
    finally:
        second.stop()  # should it have started after all
    assert f"pool store {server.store} is in use by another pool service (pid {server.proc.pid})" in str(ei.value)


@pytest.fixture(scope="module")
def short(pki, tmp_path_factory):
    """A pool with short idle and keep-for-retry times, set through the config section's own mapping."""
    work = tmp_path_factory.mktemp("short")
    extra = limits_args(PoolLimitsConfig(workers=8, idle_timeout_s=1, keep_interrupted_s=1, call_timeout_s=3))
    with PoolServer(work / "store", pki.certs, work, extra=tuple(extra)) as srv:
        yield srv


def test_idle_stream_aborted_and_staging_removed(pki, short, tmp_path):
    out = tmp_path / "idle"
    make_site_dir(out, "site-a", 4, seed=30)
    _, signed = prepare(out, pki.site("site-a"))
    release = threading.Event()
    with channel(short.address, pki.site("site-a")) as ch:
        t0 = time.monotonic()
        call = stub(ch).Push.future(held(header(signed) + file_messages(signed, 2, half_of_next=True), release),
                                    timeout=20)
        try:
            with pytest.raises(grpc.RpcError) as ei:
                call.result()
        finally:
            release.set()
        waited = time.monotonic() - t0
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert ei.value.details() == "stream idle for more than 1 s (--idle-timeout-s): aborted"
    assert waited < 15
    assert leftovers(short.store) == []


def test_trickling_stream_aborted_at_the_call_deadline(pki, short, tmp_path):
    """One byte every 0.4 s never trips the idle timeout; the per-call deadline ends it."""
    out = tmp_path / "trickle"
    make_site_dir(out, "site-c", 2, seed=33)
    _, signed = prepare(out, pki.site("site-c"))
    data = signed.image_path(0).read_bytes()

    def trickle():
        yield from header(signed)
        for i in range(len(data)):
            time.sleep(0.4)
            yield pool_pb2.PushRequest(chunks=[pool_pb2.FileChunk(index=0, offset=i, data=data[i: i + 1])])

    t0 = time.monotonic()
    with channel(short.address, pki.site("site-c")) as ch, pytest.raises(grpc.RpcError) as ei:
        stub(ch).Push(trickle(), timeout=30)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert ei.value.details() == "stream open for more than 3 s (--call-timeout-s): aborted"
    assert time.monotonic() - t0 < 20
    assert leftovers(short.store) == []


def test_files_of_a_cut_push_kept_for_the_retry_then_removed_without_restart(pki, short, tmp_path):
    out = tmp_path / "cut"
    make_site_dir(out, "site-b", 6, seed=31)
    _, signed = prepare(out, pki.site("site-b"))
    release = threading.Event()
    with channel(short.address, pki.site("site-b")) as ch:
        call = stub(ch).Push.future(held(header(signed) + file_messages(signed, 3), release), timeout=60)
        assert _wait_until(lambda: len(leftovers(short.store)) >= 3), leftovers(short.store)
        call.cancel()
        try:
            assert _wait_until(lambda: "upload interrupted" in short.log(), 5.0), short.log()
            assert [g for g in leftovers(short.store) if g.startswith("unindexed file")]  # kept: a retry skips them
            assert _wait_until(lambda: leftovers(short.store) == [], 10.0), leftovers(short.store)
        finally:
            release.set()
    # Logged just after the sweep removed the files: wait for the line, as above.
    assert _wait_until(lambda: "removed 3 files of an interrupted push after 1 s" in short.log(), 5.0), short.log()


def test_row_with_a_huge_field_stored_before_the_limit_does_not_break_list_or_pull(pki, tmp_path):
    out = tmp_path / "legacy"
    make_site_dir(out, "site-c", 3, seed=32)
    signed = resign(out, pki.site("site-c"), lambda m: m.update(created="2025-01-01T00:00:00+00:00" + " " * 9_000_000))
    store = Store(tmp_path / "store")  # what an older pool accepted: the row is in the index
    staging = store.new_staging()
    for i, im in enumerate(signed.manifest.images):
        (staging / "f").write_bytes(signed.image_path(i).read_bytes())
        store.place(staging / "f", im.record.sha256)
    (staging / "r").write_bytes(signed.report_path.read_bytes())
    store.place(staging / "r", signed.manifest.report_sha256)
    store.sync_dirs(set())
    staging.rmdir()
    store.commit(signed.manifest, signed.manifest_bytes, signed.signature, "01")
    store.close()
    with PoolServer(tmp_path / "store", pki.certs, tmp_path) as srv:
        [b] = list_bundles(srv.address, pki.reader)
        assert b["bundle_id"] == signed.bundle_id and len(b["created"]) <= 256
        res = pull(srv.address, pki.reader, tmp_path / "pulled", progress=False, retries=0)
    assert (res.n_images, res.n_fetched) == (3, 3)
