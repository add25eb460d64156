"""Site progress to the coordinator in deployment: the pool's Progress RPC in a real process, real mutual TLS.

A site's reporter sends its events through its pool channel; the pool records them
under the site of the certificate (never the message's) in progress.jsonl, refuses
readers and malformed reports, rate-limits; the coordinator prints the lines.
"""

from __future__ import annotations

import io
import json
import time

import grpc
import pytest

from client.progress_rpc import PoolProgressSink, site_reporter
from client.site import Site
from plan_shared import progress as P
from plan_shared.config import config_from_dict
from plan_shared.credentials import load_client_credentials
from plan_shared.pool_proto import pool_pb2, pool_pb2_grpc
from server.coordinate import print_progress
from server.pool.service import PROGRESS_BURST, PROGRESS_LOG
from tests.pool_support import PoolServer
from tests.test_federation_util import tiny_config


@pytest.fixture(scope="module")
def server(pki, tmp_path_factory):
    work = tmp_path_factory.mktemp("server")
    with PoolServer(work / "store", pki.certs, work) as srv:
        yield srv


def _stub(address: str, creds_dir):
    from plan_shared.pool_transport import open_channel

    ch = open_channel(address, load_client_credentials(creds_dir))
    return ch, pool_pb2_grpc.PoolProgressStub(ch)


def _wait_lines(path, n: int, timeout: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            rows = [json.loads(x) for x in path.read_text().splitlines()]
            if len(rows) >= n:
                return rows
        time.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {n} lines after {timeout}s")


def test_site_reporter_in_deployment_reaches_the_coordinator(pki, server, tmp_path):
    log = server.store / PROGRESS_LOG
    tail = P.ProgressTail(server.store, PROGRESS_LOG, from_end=True)
    cfg = config_from_dict(tiny_config())
    site = Site("site-a", tmp_path / "state", cfg.model_copy(update={
        "site_id": "site-a", "site": cfg.site.model_copy(update={"pool_address": server.address,
                                                                  "pool_keys_dir": str(pki.site("site-a"))})}))
    rep = site_reporter(site, stages=["inversion", "navigation"])
    assert any(isinstance(s, PoolProgressSink) for s in rep.sinks) and rep.show_bars
    rep.interval_s = 0.1
    with rep, P.active(rep):
        with rep.stage("inversion"):
            for _ in P.bar(range(5), desc="inversion", unit="batch-steps"):
                time.sleep(0.05)
        with rep.stage("navigation"):
            pass
    rows = _wait_lines(log, 4)
    assert {r["site"] for r in rows} == {"site-a"}
    assert [(r["stage"], r["event"]) for r in rows][:1] == [("inversion", "start")]
    assert ("navigation", "end") == (rows[-1]["stage"], rows[-1]["event"])
    ticks = [r for r in rows if r["event"] == "progress"]
    assert ticks and ticks[0]["total"] == 5 and ticks[0]["unit"] == "batch-steps" and ticks[0]["index"] == 1
    out = io.StringIO()
    assert print_progress(tail, out) >= 3
    text = out.getvalue().splitlines()
    assert text[0] == "[site-a] inversion started (stage 1/2)"
    assert text[-2].startswith("[site-a] navigation started (stage 2/2); inversion took ")
    assert text[-1].startswith("[site-a] navigation done in 0 s (stage 2/2)")


def test_identity_from_the_certificate_and_refusals(pki, server):
    log = server.store / PROGRESS_LOG
    ch, stub = _stub(server.address, pki.site("site-b"))
    try:
        r = stub.Progress(pool_pb2.ProgressRequest(stage="filter", event="start"), timeout=10)
        assert r.recorded
        with pytest.raises(grpc.RpcError) as ei:
            stub.Progress(pool_pb2.ProgressRequest(stage="filter", event="halfway"), timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "must be start, progress or end, got 'halfway'" in ei.value.details()
        with pytest.raises(grpc.RpcError) as ei:
            stub.Progress(pool_pb2.ProgressRequest(stage="x\nfake line", event="start"), timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stage must be printable" in ei.value.details()
    finally:
        ch.close()
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert rows[-1]["site"] == "site-b" and rows[-1]["stage"] == "filter"  # the certificate's name
    ch, stub = _stub(server.address, pki.reader)
    try:
        with pytest.raises(grpc.RpcError) as ei:
            stub.Progress(pool_pb2.ProgressRequest(stage="filter", event="start"), timeout=10)
        assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "role 'reader'; reporting progress needs role 'site'" in ei.value.details()
    finally:
        ch.close()
    assert [json.loads(x) for x in log.read_text().splitlines()][-1] == rows[-1]  # nothing written


def test_rate_limit_per_site(pki, server):
    ch, stub = _stub(server.address, pki.site("site-c"))
    try:
        replies = [stub.Progress(pool_pb2.ProgressRequest(stage="s", event="progress", done=i), timeout=10)
                   for i in range(PROGRESS_BURST + 10)]
    finally:
        ch.close()
    recorded = sum(r.recorded for r in replies)
    assert PROGRESS_BURST <= recorded < PROGRESS_BURST + 10
    assert "rate limit" in [r for r in replies if not r.recorded][0].message
    rows = [json.loads(x) for x in (server.store / PROGRESS_LOG).read_text().splitlines()]
    assert sum(r["site"] == "site-c" for r in rows) == recorded


def test_a_pool_that_is_down_costs_the_work_nothing(pki, caplog):
    import logging

    from tests.pool_support import free_port

    caplog.set_level(logging.WARNING, logger="plan.progress")
    sink = PoolProgressSink(f"127.0.0.1:{free_port()}", pki.site("site-a"))
    t0 = time.monotonic()
    for i in range(500):  # more than the queue holds: dropped, never blocking
        sink({"site": "site-a", "stage": "x", "event": "progress", "done": i})
    assert time.monotonic() - t0 < 1.0
    t0 = time.monotonic()
    sink.close(timeout=10.0)  # one failed call, the rest dropped: closing does not wait out 500 timeouts
    assert time.monotonic() - t0 < 8.0 and sink.sent == 0
    assert "progress reports to the pool at" in caplog.text
