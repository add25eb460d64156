"""Where a site's progress goes: the reporter each ClientApp handler works under.

* **simulation** (virtual sites share the run's disk): one JSON line per event in
  ``<state_dir>/progress.jsonl``; ``plan-server demo`` / ``simulate`` tail these files
  and print the lines in their terminal (Ray's actors print nothing of their own).
* **deployment**: the SuperNode's own log (one line per event, tqdm bars redrawn every
  15 s) and, when the site has a pool address and credentials, the coordinator:
  each event goes as a ``Progress`` call over the site's mutual-TLS pool channel
  (``plan_shared/pool_proto/pool.proto``), which the pool appends to its
  ``progress.jsonl`` and ``plan-server coordinate`` prints. Flower 1.42 has no way to
  stream from inside a ClientApp handler, and the pool channel already authenticates
  the site by its certificate, so no new port, key or trust is needed.

The pool sink sends from a background thread (bounded queue, 5 s deadline per call); a
pool that is down costs the pipeline nothing and is reported once in the site's log.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import grpc

from client.site import Site
from plan_shared import progress as P
from plan_shared.pool_proto import pool_pb2, pool_pb2_grpc

LOG = logging.getLogger("plan.progress")
CALL_TIMEOUT_S = 5.0
QUEUE_MAX = 200
RETRY_AFTER_S = 30.0  # after a failed call, reports are dropped this long


class PoolProgressSink:
    """Sends each progress event to the pool's ``Progress`` RPC (in order, from one thread)."""

    def __init__(self, address: str, credentials: Path, server_name: str | None = None):
        from plan_shared.credentials import load_client_credentials
        from plan_shared.pool_transport import open_channel

        self.address = address
        creds = load_client_credentials(credentials)
        self._channel = open_channel(address, creds, server_name)
        self._stub = pool_pb2_grpc.PoolProgressStub(self._channel)
        self._q: queue.Queue[P.Event | None] = queue.Queue(QUEUE_MAX)
        self._warned = False
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="progress-rpc", daemon=True)
        self._thread.start()

    def __call__(self, ev: P.Event) -> None:
        try:
            self._q.put_nowait(ev)
        except queue.Full:  # the pool is slow or gone: drop, never block the work
            pass

    @staticmethod
    def request(ev: P.Event) -> pool_pb2.ProgressRequest:
        eta = ev.get("eta_s")
        return pool_pb2.ProgressRequest(
            stage=str(ev.get("stage") or ""), event=str(ev.get("event") or ""), task=str(ev.get("task") or ""),
            done=int(ev.get("done") or 0), total=int(ev.get("total") or 0), unit=str(ev.get("unit") or ""),
            elapsed_s=float(ev.get("elapsed_s") or 0.0), eta_s=float(eta) if eta is not None else -1.0,
            index=int(ev.get("index") or 0), n_stages=int(ev.get("n_stages") or 0), failed=bool(ev.get("failed")),
            prev=str(ev.get("prev") or ""), prev_s=float(ev.get("prev_s") or 0.0),
        )

    def _run(self) -> None:
        import time

        quiet_until = 0.0
        while True:
            ev = self._q.get()
            if ev is None:
                return
            if time.monotonic() < quiet_until:  # the pool failed just now: drop instead of waiting again
                continue
            try:
                self._stub.Progress(self.request(ev), timeout=CALL_TIMEOUT_S)
                self.sent += 1
            except grpc.RpcError as err:
                quiet_until = time.monotonic() + RETRY_AFTER_S
                if not self._warned:
                    LOG.warning("progress reports to the pool at %s fail (%s: %s); the work goes on",
                                self.address, err.code().name, err.details())
                    self._warned = True

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (up to ``timeout``), then close the channel."""
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._channel.close()


def _log_to_stderr() -> None:
    """Our loggers to stderr (the SuperNode's own log) in a ClientApp process that has no handler for them.

    Only the ``plan`` logger gets the handler (a root handler would print Flower's lines a
    second time); where the root logger has handlers already, those are used.
    """
    import sys

    lg = logging.getLogger("plan")
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.INFO)
    if not lg.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        lg.addHandler(h)


def site_reporter(site: Site, stages: Sequence[str] = ()) -> P.Reporter:
    """The reporter of one handler's work at ``site`` (simulation: a file; deployment: log + pool)."""
    if site.partition_id is not None:
        return P.Reporter(site.site_id, [P.JsonlSink(site.state_dir / "progress.jsonl")], stages)
    _log_to_stderr()
    sinks: list = [P.LogSink()]
    pool, address = site.cfg.pool, site.cfg.site.pool_address
    if address:
        from client.post_training import site_credentials

        creds = site_credentials(site)
        if creds is not None:
            try:
                sinks.append(PoolProgressSink(address, creds, pool.server_name))
            except Exception as err:  # noqa: BLE001 - progress must not stop the work
                LOG.warning("%s: no progress reports to the pool (%s)", site.site_id, err)
    return P.Reporter(site.site_id, sinks, stages, show_bars=True)


@contextmanager
def site_progress(site: Site, stages: Sequence[str] = ()) -> Iterator[P.Reporter]:
    """:func:`site_reporter`, active for the block (plan_shared loops feed it), closed after.

    In simulation the site's own warnings and errors travel with its progress events too:
    Ray's actors do not print to the demo's terminal (see server/simulate.py).
    """
    rep = site_reporter(site, stages)
    fwd = rep.forward_logs() if site.partition_id is not None else nullcontext()
    with rep, P.active(rep), fwd:
        yield rep
