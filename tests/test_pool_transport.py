"""plan_shared/pool_transport.py: channel, retry policy and error text, against a real pool process over mTLS."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from client.export import ExportError, export
from plan_shared.config import PoolConfig, config_from_dict
from plan_shared.credentials import load_client_credentials
from plan_shared.pool_proto import pool_pb2, pool_pb2_grpc
from plan_shared.pool_transport import (
    RETRYABLE,
    PoolTransportError,
    RetryPolicy,
    call_with_retries,
    describe_error,
    is_retryable,
    open_channel,
)
from server.pool.client import PoolClientError
from tests.pool_support import PoolServer, free_port, make_site_dir
from tests.security.attacks import held

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(pki, tmp_path_factory):
    work = tmp_path_factory.mktemp("server")
    with PoolServer(work / "store", pki.certs, work, extra=("--max-streams-per-identity", "2")) as srv:
        yield srv



def hold_all_streams(ch: grpc.Channel, release: threading.Event, n: int = 2, within_s: float = 30.0) -> list:
    """``n`` Offer streams held open until ``release``, returned once the pool has counted them all.

    Opening a stream returns before the pool's handler counts it, so an export started at once
    could slip in first (seen in CI: the export went through on its first attempt). A short probe
    stream tells: the pool refuses it (RESOURCE_EXHAUSTED) only when the ``n`` streams hold the
    identity's limit; a blocker refused in the race is opened again.
    """
    stub = pool_pb2_grpc.PoolStub(ch)
    blockers = [stub.Offer.future(held([], release), timeout=60) for _ in range(n)]
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        blockers = [b if not b.done() else stub.Offer.future(held([], release), timeout=60) for b in blockers]
        try:
            stub.Offer(held([], threading.Event(), hold_s=0.3), timeout=0.3)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not any(b.done() for b in blockers):
                return blockers
        time.sleep(0.2)  # let the pool close a probe it accepted before the next one
    raise AssertionError(f"the pool did not count {n} open streams within {within_s} s")


def test_policy_comes_from_the_pool_config_section():
    cfg = config_from_dict({"pool": {"retries": 2, "backoff_s": 0.5, "max_backoff_s": 1.5}})
    p = RetryPolicy.from_config(cfg.pool)
    assert p == RetryPolicy(retries=2, backoff_s=0.5, max_backoff_s=1.5)
    assert [p.wait(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 1.5, 1.5]
    d = PoolConfig()
    assert RetryPolicy.default() == RetryPolicy(d.retries, d.backoff_s, d.max_backoff_s)
    assert RetryPolicy.default(retries=0).retries == 0
    with pytest.raises(ValueError, match="must be >= 0"):
        RetryPolicy(-1, 1.0, 30.0)


def test_a_call_through_the_channel_reaches_the_pool(pki, server):
    creds = load_client_credentials(pki.reader)
    with open_channel(server.address, creds) as ch:
        reply = call_with_retries(lambda: pool_pb2_grpc.PoolStub(ch).List(pool_pb2.ListRequest(), timeout=30),
                                  server.address, RetryPolicy(1, 0.05, 0.1), creds)
    assert list(reply.bundles) == []


def test_unreachable_pool_is_retried_a_bounded_number_of_times(pki):
    creds = load_client_credentials(pki.reader)
    address = f"127.0.0.1:{free_port()}"  # nothing listens here
    logs: list[str] = []
    with open_channel(address, creds) as ch:
        with pytest.raises(PoolTransportError, match=f"pool at {address} unavailable") as ei:
            call_with_retries(lambda: pool_pb2_grpc.PoolStub(ch).List(pool_pb2.ListRequest(), timeout=5),
                              address, RetryPolicy(2, 0.05, 0.1), creds, log=logs.append)
    assert type(ei.value) is PoolTransportError
    assert [m.split("; ")[-1] for m in logs] == ["retry 1/2 in 0.1 s", "retry 2/2 in 0.1 s"]


def test_a_refusal_is_final_and_names_the_pools_reason(pki, server):
    creds = load_client_credentials(pki.site("site-a"))  # a site may not read the catalog
    logs: list[str] = []
    with open_channel(server.address, creds) as ch:
        stub = pool_pb2_grpc.PoolStub(ch)
        with pytest.raises(PoolClientError, match="^pool refused the call: .*reader"):
            call_with_retries(lambda: list(stub.Catalog(pool_pb2.CatalogRequest(), timeout=30)), server.address,
                              RetryPolicy(3, 0.05, 0.1), creds, log=logs.append, error=PoolClientError)
        with pytest.raises(grpc.RpcError) as raw:
            list(stub.Catalog(pool_pb2.CatalogRequest(), timeout=30))
    assert logs == []
    assert not is_retryable(raw.value) and raw.value.code() not in RETRYABLE
    assert describe_error(raw.value, server.address, "the pull").startswith("pool refused the pull: ")


def test_a_foreign_certificate_is_diagnosed_and_not_retried(pki, server):
    creds = load_client_credentials(pki.foreign_site_a)  # another CA: it trusts that CA only
    logs: list[str] = []
    with open_channel(server.address, creds) as ch:
        with pytest.raises(PoolTransportError, match=f"the pool at {server.address} presented a certificate that "
                                                     "this client's ca.crt does not accept"):
            call_with_retries(lambda: pool_pb2_grpc.PoolStub(ch).List(pool_pb2.ListRequest(), timeout=10),
                              server.address, RetryPolicy(3, 0.05, 0.1), creds, log=logs.append)
    assert logs == []


def test_the_stream_limit_is_waited_out(pki, server, tmp_path):
    """RESOURCE_EXHAUSTED (this identity's open-streams limit) clears when the other streams end: retried."""
    out = tmp_path / "out"
    make_site_dir(out, "site-b", 3, seed=7)
    release = threading.Event()
    ch = open_channel(server.address, load_client_credentials(pki.site("site-b")))
    blockers = hold_all_streams(ch, release)
    logs: list[str] = []

    def note(msg: str) -> None:
        logs.append(msg)
        if "retry 2/" in msg:
            release.set()  # the other streams end while the export waits for its second retry

    try:
        res = export(out, server.address, pki.site("site-b"), retries=5, backoff=0.2, progress=False, log=note)
    finally:
        release.set()
        for c in blockers:
            c.cancel()
        ch.close()
    assert res.n_images == 3 and not res.duplicate and res.attempts >= 3
    assert any("RESOURCE_EXHAUSTED" in m and "open streams (limit 2)" in m for m in logs), logs


def test_out_of_retries_the_last_reason_is_the_error(pki, server, tmp_path):
    out = tmp_path / "out"
    make_site_dir(out, "site-c", 2, seed=8)
    release = threading.Event()
    ch = open_channel(server.address, load_client_credentials(pki.site("site-c")))
    blockers = hold_all_streams(ch, release)
    try:
        with pytest.raises(ExportError, match=r"RESOURCE_EXHAUSTED: identity 'site-c' already has 2 open streams"):
            export(out, server.address, pki.site("site-c"), retries=1, backoff=0.05, progress=False)
    finally:
        release.set()
        for c in blockers:
            c.cancel()
        ch.close()


def test_export_takes_the_pool_sections_policy(pki, tmp_path):
    """The configured policy (retries and backoff) is the one export follows."""
    out = tmp_path / "out"
    make_site_dir(out, "site-a", 2, seed=9)
    address = f"127.0.0.1:{free_port()}"
    policy = RetryPolicy.from_config(config_from_dict({"pool": {"retries": 1, "backoff_s": 0.05}}).pool)
    logs: list[str] = []
    with pytest.raises(ExportError, match="unavailable"):
        export(out, address, pki.site("site-a"), progress=False, log=logs.append, policy=policy)
    assert [m.split("; ")[-1] for m in logs] == ["retry 1/1 in 0.1 s"]
