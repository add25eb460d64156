"""A long-lived reader of the pool for programs that browse it (``plan-server pool web``).

:class:`PoolReader` keeps one mutual-TLS channel to the pool service and offers
what a browser of the pool needs on top of :func:`server.pool.client.list_bundles`:
the whole catalog as plain dicts and :meth:`PoolReader.fetch_images`, which returns
the bytes of the images asked for, each checked against its sha256.

The pool is untrusted input here too: a catalog entry whose sha256 is not 64
lowercase hex, or whose site or class name is not a safe name
(:func:`plan_shared.manifest.is_safe_name`), or whose record is not a JSON object,
is set aside in :attr:`Catalog.refused` with the reason, never used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plan_shared.config import PoolConfig
from plan_shared.credentials import ClientCredentials, load_client_credentials
from plan_shared.manifest import is_hex64, is_safe_name
from plan_shared.pool_proto import pool_pb2, pool_pb2_grpc
from plan_shared.pool_transport import RetryPolicy, call_with_retries, open_channel
from server.pool.client import PoolClientError, list_bundles

_POOL = PoolConfig()  # web_retries / web_backoff_s: the documented defaults (plan_shared/config.py)


@dataclass
class Catalog:
    """The pool's catalog: one entry per (bundle, image), plus what was refused and why."""

    entries: list[dict[str, Any]]
    refused: list[str] = field(default_factory=list)


def entry_dict(e: Any) -> tuple[dict[str, Any] | None, str | None]:
    """A catalog entry (protobuf) as a dict, or ``(None, reason)`` when it cannot be used."""
    where = f"catalog entry for bundle {e.bundle_id[:16]!r}"
    if not is_hex64(e.sha256):
        return None, f"{where}: sha256 {e.sha256[:80]!r} is not 64 lowercase hex digits"
    if not is_safe_name(e.site_id):
        return None, f"{where}: site id {e.site_id[:80]!r} is not a safe name"
    if not is_safe_name(e.class_name):
        return None, f"{where}: class name {e.class_name[:80]!r} is not a safe name"
    try:
        record = json.loads(e.record_json)
    except ValueError as err:
        return None, f"{where}, image {e.sha256[:12]}: record is not JSON ({err})"
    if not isinstance(record, dict):
        return None, f"{where}, image {e.sha256[:12]}: record is not a JSON object"
    return {
        "bundle_id": e.bundle_id, "site_id": e.site_id, "sha256": e.sha256, "class_name": e.class_name,
        "size": int(e.size), "record": record, "generator_sha256": e.generator_sha256,
        "config_sha256": e.config_sha256, "generator_round": None if e.generator_round < 0 else int(e.generator_round),
        "created": e.created,
    }, None


class PoolReader:
    """Reader-role access to one pool service (credentials: the reader's own keys folder)."""

    def __init__(self, pool: str, credentials: Path, server_name: str | None = None,
                 retries: int = _POOL.web_retries, backoff: float = _POOL.web_backoff_s):
        self.pool, self.credentials = pool, Path(credentials)
        self.server_name, self.retries, self.backoff = server_name, retries, backoff
        self.creds: ClientCredentials = load_client_credentials(self.credentials)
        if self.creds.role != "reader":
            raise PoolClientError(f"{self.credentials}: these are {self.creds.role} credentials; "
                                  "browsing the pool needs a reader's")
        self._channel = open_channel(pool, self.creds, server_name)
        self._stub = pool_pb2_grpc.PoolStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PoolReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, fn):
        return call_with_retries(fn, self.pool, RetryPolicy.default(self.retries, self.backoff), self.creds,
                                 self.server_name, error=PoolClientError)

    def bundles(self) -> list[dict[str, Any]]:
        """The stored bundles (see :func:`server.pool.client.list_bundles`)."""
        return list_bundles(self.pool, self.credentials, retries=self.retries, backoff=self.backoff,
                            server_name=self.server_name)

    def catalog(self, site: str | None = None) -> Catalog:
        def call() -> list:
            got = []
            for reply in self._stub.Catalog(pool_pb2.CatalogRequest(site_id=site or ""), timeout=600):
                got.extend(reply.entries)
            return got

        cat = Catalog(entries=[])
        for e in self._call(call):
            d, why = entry_dict(e)
            if d is None:
                cat.refused.append(why or "unreadable entry")
            else:
                cat.entries.append(d)
        return cat

    def fetch_images(self, shas: Iterable[str], max_bytes: int = 64 * 1024 * 1024) -> dict[str, bytes]:
        """The files with these sha256 digests, each verified; raises when one is missing or wrong.

        ``max_bytes`` bounds what one call may receive (the caller asks for a page at a time).
        """
        wanted = list(dict.fromkeys(shas))
        for s in wanted:
            if not is_hex64(s):
                raise PoolClientError(f"not a sha256 digest: {s[:80]!r}")
        if not wanted:
            return {}

        def call() -> dict[str, bytes]:
            parts: dict[str, list[bytes]] = {}
            done: dict[str, bytes] = {}
            total = 0
            for reply in self._stub.Fetch(pool_pb2.FetchRequest(sha256=wanted), timeout=300):
                for c in reply.chunks:
                    if c.sha256 not in wanted:
                        raise PoolClientError(f"pool sent an unrequested file {c.sha256[:16]!r}")
                    if c.sha256 in done:
                        raise PoolClientError(f"pool sent file {c.sha256[:12]}… twice")
                    buf = parts.setdefault(c.sha256, [])
                    if c.offset != sum(len(b) for b in buf):
                        raise PoolClientError(f"pool sent file {c.sha256[:12]}… out of order")
                    buf.append(c.data)
                    total += len(c.data)
                    if total > max_bytes:
                        raise PoolClientError(f"pool sent more than {max_bytes} bytes for {len(wanted)} file(s)")
                    if c.last:
                        data = b"".join(parts.pop(c.sha256))
                        if hashlib.sha256(data).hexdigest() != c.sha256:
                            raise PoolClientError(f"file {c.sha256[:12]}… from the pool does not match its sha256")
                        done[c.sha256] = data
            missing = [s for s in wanted if s not in done]
            if missing:
                raise PoolClientError(f"pool did not send {len(missing)} of {len(wanted)} file(s), "
                                      f"first {missing[0][:12]}…")
            return done

        return self._call(call)
