"""The one gRPC transport to the pool: mutual-TLS channel, retry policy, error text.

Every pool client (``plan-client export``, ``plan-server pool ls/pull``, the pool web
reader, the site's progress channel) opens its channel with :func:`open_channel` and runs
its calls through :func:`call_with_retries`::

    policy = RetryPolicy.from_config(cfg.pool)
    with open_channel(address, creds, server_name) as ch:
        stub = pool_pb2_grpc.PoolStub(ch)
        reply = call_with_retries(lambda: stub.List(req, timeout=60), address, policy, creds=creds)

Retried status codes (:data:`RETRYABLE`): every pool call is safe to repeat. A push starts
each attempt with a new ``Offer`` (the pool answers with what it still lacks), and
``List``/``Catalog``/``Fetch`` only read. So everything a cut connection, a restarting
pool or a busy pool can produce is retried: UNAVAILABLE (unreachable, reset), DEADLINE_EXCEEDED
(a deadline, or the pool's idle limit), ABORTED (the store asks for a retry), CANCELLED and
INTERNAL (how gRPC reports a stream cut mid-way, e.g. by a proxy), RESOURCE_EXHAUSTED (the
pool's open-streams-per-identity limit, which clears when the other streams end). A site
over its quota gets RESOURCE_EXHAUSTED too; it is retried like the stream limit (the pool
does not tell them apart by code) and the last reply's reason is the error. A refusal
(PERMISSION_DENIED, UNAUTHENTICATED, INVALID_ARGUMENT, FAILED_PRECONDITION, NOT_FOUND) and
a TLS failure are final: repeating them cannot succeed. Before this module, the pull
retried only the first three codes, so a pull through a connection cut mid-stream failed.

Wait before retry n (1-based): ``min(backoff_s * 2**(n-1), max_backoff_s)``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

# Quiet gRPC core's own INFO lines (e.g. a handshake failure, which describe_error explains);
# set before grpc is first imported; an explicit GRPC_VERBOSITY wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc

from plan_shared.credentials import CLIENT_CERT, CLIENT_KEY, ClientCredentials, diagnose_tls

if TYPE_CHECKING:
    from plan_shared.config import PoolConfig

T = TypeVar("T")

MAX_MESSAGE = 8 * 1024 * 1024
"""Largest gRPC message either way (the pool's replies are paged below it)."""

RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED,
})
REFUSALS = frozenset({
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
})
_TLS_WORDS = ("handshake", "ssl", "tls", "certificate", "tsi_")


class PoolTransportError(RuntimeError):
    """A pool call failed for good (refused, TLS, or out of retries); the message is for the user."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failed pool call is repeated (defaults: ``pool.*`` in plan_shared/config.py)."""

    retries: int
    backoff_s: float
    max_backoff_s: float

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"retry policy {self}: retries, backoff_s and max_backoff_s must be >= 0")

    @classmethod
    def from_config(cls, pool: PoolConfig, retries: int | None = None,
                    backoff_s: float | None = None) -> RetryPolicy:
        """The policy of a ``pool`` config section; ``retries``/``backoff_s`` override it when given."""
        return cls(retries=pool.retries if retries is None else retries,
                   backoff_s=pool.backoff_s if backoff_s is None else backoff_s,
                   max_backoff_s=pool.max_backoff_s)

    @classmethod
    def default(cls, retries: int | None = None, backoff_s: float | None = None) -> RetryPolicy:
        """The configuration's defaults (``PoolConfig()``), with the given overrides."""
        from plan_shared.config import PoolConfig

        return cls.from_config(PoolConfig.model_validate({}), retries, backoff_s)

    def wait(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        return float(min(self.backoff_s * 2 ** (retry - 1), self.max_backoff_s))


def open_channel(address: str, creds: ClientCredentials, server_name: str | None = None) -> grpc.Channel:
    """A mutual-TLS channel to ``address`` (HOST:PORT) with this identity's certificate and CA.

    ``server_name`` is the name expected on the server's certificate when it is not the host.
    Keepalive pings every 30 s notice a dead connection during a long transfer.
    """
    tls = grpc.ssl_channel_credentials(root_certificates=creds.ca_pem, private_key=creds.key_pem,
                                       certificate_chain=creds.cert_pem)
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(address, tls, options=options)


def _code(err: grpc.RpcError) -> grpc.StatusCode:
    code: grpc.StatusCode = err.code()
    return code


def _details(err: grpc.RpcError) -> str:
    return str(err.details() or "")


def is_tls_failure(err: grpc.RpcError) -> bool:
    """gRPC's own report of a failed TLS handshake (UNAVAILABLE naming ssl/tls/handshake/certificate)."""
    d = _details(err).lower()
    return _code(err) == grpc.StatusCode.UNAVAILABLE and any(k in d for k in _TLS_WORDS)


def is_retryable(err: grpc.RpcError) -> bool:
    """Whether repeating the call may succeed (see the module docstring)."""
    return _code(err) in RETRYABLE and not is_tls_failure(err)


def describe_error(err: grpc.RpcError, address: str, subject: str = "the call") -> str:
    """One line for the user: a TLS failure, a refusal (the pool's reason), or the transport's code.

    ``subject`` names what was refused ("the bundle" for a push).
    """
    code, details = _code(err), _details(err)
    if is_tls_failure(err):
        return (f"TLS handshake with the pool at {address} failed: the pool accepts only client certificates "
                f"issued by its CA, and this client trusts only its ca.crt ({details})")
    if code in REFUSALS:
        return f"pool refused {subject}: {details}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"pool at {address} unavailable: {details} [UNAVAILABLE]"
    return f"pool at {address}: {code.name}: {details}"


def diagnose(err: grpc.RpcError, address: str, creds: ClientCredentials | None,
             server_name: str | None = None) -> str | None:
    """For an UNAVAILABLE error: the TLS cause found by a standard-library handshake, else None.

    gRPC reports a refused client certificate only as "Socket closed";
    :func:`plan_shared.credentials.diagnose_tls` tells that apart from a pool that is down.
    """
    if creds is None or _code(err) != grpc.StatusCode.UNAVAILABLE:
        return None
    return diagnose_tls(address, creds.ca_pem, creds.directory / CLIENT_CERT, creds.directory / CLIENT_KEY,
                        server_name)


def call_with_retries(
    fn: Callable[[], T],
    address: str,
    policy: RetryPolicy,
    creds: ClientCredentials | None = None,
    server_name: str | None = None,
    log: Callable[[str], None] = lambda m: None,
    subject: str = "the call",
    error: Callable[[str], Exception] = PoolTransportError,
) -> T:
    """Run ``fn``; on a retryable failure wait (``policy.wait``) and run it again, at most ``policy.retries`` times.

    With ``creds``, an UNAVAILABLE failure is first checked for a TLS refusal, which is final.
    A final failure raises ``error(message)`` (default :class:`PoolTransportError`); each retry
    is logged as ``"<reason>; retry n/N in s s"``.
    """
    retry = 0
    while True:
        try:
            return fn()
        except grpc.RpcError as err:
            diag = diagnose(err, address, creds, server_name)
            if diag:
                raise error(diag) from None
            if not is_retryable(err) or retry >= policy.retries:
                raise error(describe_error(err, address, subject)) from None
            retry += 1
            wait = policy.wait(retry)
            log(f"{describe_error(err, address, subject)}; retry {retry}/{policy.retries} in {wait:.1f} s")
            time.sleep(wait)
