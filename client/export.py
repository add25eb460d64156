"""``plan-client export OUTDIR``: sign a site output dir and push it to the pool.

The bundle (see :mod:`plan_shared.bundle`) is built from ``OUTDIR/manifest.json``
and the files it lists, signed with ``CREDENTIALS/signing.key``, and sent over
mutual TLS with ``CREDENTIALS/client.crt``. The push is two calls:

* ``Offer`` sends the signed manifest; the pool checks identity, signature,
  records and limits, and answers *duplicate* or the list of images it still needs
  (identical images already in the pool, or already received by an interrupted
  earlier attempt, are not sent again);
* ``Push`` sends the manifest again and the needed files in chunks; the pool
  stores the bundle whole, or nothing.

Transient failures (pool unreachable, connection cut, pool restarted) are retried
at most ``--retries`` times with exponential backoff; each retry starts with a new
``Offer``, so it sends only what the pool is still missing. Refusals are not
retried: the pool's reason is printed and the command exits 1.

Library use::

    result = export(Path("out/site-a"), "pool.example.org:9444", Path("keys"))
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import typer
from tqdm import tqdm

from plan_shared.bundle import BundleError, SignedBundle, build_bundle, load_signing_key
from plan_shared.credentials import ClientCredentials, CredentialsError, load_client_credentials
from plan_shared.pool_proto import pool_pb2, pool_pb2_grpc
from plan_shared.pool_transport import PoolTransportError, RetryPolicy, call_with_retries, open_channel

CHUNK = 256 * 1024
BATCH_BYTES = 256 * 1024
_DEFAULT = RetryPolicy.default()  # pool.retries / pool.backoff_s of plan_shared/config.py


class ExportError(PoolTransportError):
    """The export failed; the message is for the user (the pool's reason when it refused)."""


@dataclass
class ExportResult:
    bundle_id: str
    duplicate: bool
    n_images: int
    n_sent: int          # files sent by the successful attempt
    bytes_sent: int      # bytes of file data sent by the successful attempt
    attempts: int
    seconds: float


def prepare(outdir: Path, credentials: Path) -> tuple[ClientCredentials, SignedBundle]:
    """Load the site's credentials and build the signed bundle of ``outdir``."""
    try:
        creds = load_client_credentials(credentials)
    except CredentialsError as err:
        raise ExportError(str(err)) from None
    if creds.role != "site":
        raise ExportError(f"{credentials}: these are {creds.role} credentials; only a site can export")
    try:
        key = load_signing_key(creds.signing_key_path)
        signed = build_bundle(outdir, key, site_id=creds.name)
    except BundleError as err:
        raise ExportError(str(err)) from None
    return creds, signed


def _manifest_parts(signed: SignedBundle, cls) -> Iterator:
    data = signed.manifest_bytes
    for i in range(0, len(data), BATCH_BYTES):
        yield cls(manifest_part=data[i: i + BATCH_BYTES])
    yield cls(signature=signed.signature)


def _file_chunks(path: Path, index: int, report: bool) -> Iterator[pool_pb2.FileChunk]:
    with open(path, "rb") as fh:
        data = fh.read()
    if not data:
        yield pool_pb2.FileChunk(index=index, report=report, offset=0, data=b"", last=True)
        return
    for off in range(0, len(data), CHUNK):
        piece = data[off: off + CHUNK]
        yield pool_pb2.FileChunk(index=index, report=report, offset=off, data=piece, last=off + CHUNK >= len(data))


def _push_requests(signed: SignedBundle, need: list[int], need_report: bool, sent: dict,
                   bar: tqdm | None) -> Iterator[pool_pb2.PushRequest]:
    yield from _manifest_parts(signed, pool_pb2.PushRequest)
    batch, size = [], 0
    files = [(signed.image_path(i), i, False) for i in need]
    if need_report:
        files.append((signed.report_path, 0, True))
    for path, index, report in files:
        for ch in _file_chunks(path, index, report):
            batch.append(ch)
            size += len(ch.data)
            if size >= BATCH_BYTES:
                yield pool_pb2.PushRequest(chunks=batch)
                sent["bytes"] += size
                if bar is not None:
                    bar.update(size)
                batch, size = [], 0
        sent["files"] += 1
    if batch:
        yield pool_pb2.PushRequest(chunks=batch)
        sent["bytes"] += size
        if bar is not None:
            bar.update(size)


def push(
    signed: SignedBundle,
    pool: str,
    creds: ClientCredentials,
    retries: int = _DEFAULT.retries,
    backoff: float = _DEFAULT.backoff_s,
    progress: bool = True,
    server_name: str | None = None,
    log: Callable[[str], None] = lambda m: None,
    policy: RetryPolicy | None = None,
) -> ExportResult:
    """Offer then push ``signed``; retry transient failures (see the module docstring).

    ``policy`` (e.g. ``RetryPolicy.from_config(cfg.pool)``) replaces ``retries``/``backoff``.
    """
    t0 = time.perf_counter()
    attempts = 0

    def attempt() -> ExportResult:
        nonlocal attempts
        attempts += 1
        sent = {"files": 0, "bytes": 0}
        offer = stub.Offer(_manifest_parts(signed, pool_pb2.OfferRequest), timeout=600)
        if offer.duplicate:
            return ExportResult(offer.bundle_id, True, len(signed.manifest.images), 0, 0, attempts,
                                time.perf_counter() - t0)
        need = list(offer.need)
        total = sum(signed.manifest.images[i].size for i in need)
        if offer.need_report:
            total += signed.manifest.report_size
        log(f"attempt {attempts}: pool needs {len(need)} of {len(signed.manifest.images)} images "
            f"({total / 1e6:.2f} MB)")
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"push {signed.bundle_id[:8]}",
                  disable=not progress, file=sys.stderr) as bar:
            reply = stub.Push(_push_requests(signed, need, offer.need_report, sent, bar))
        return ExportResult(reply.bundle_id, reply.duplicate, reply.n_images, sent["files"],
                            sent["bytes"], attempts, time.perf_counter() - t0)

    policy = policy or RetryPolicy.default(retries, backoff)
    with open_channel(pool, creds, server_name) as channel:
        stub = pool_pb2_grpc.PoolStub(channel)
        return call_with_retries(attempt, pool, policy, creds, server_name, log, subject="the bundle",
                                 error=ExportError)


def export(outdir: Path, pool: str, credentials: Path, retries: int = _DEFAULT.retries,
           backoff: float = _DEFAULT.backoff_s, progress: bool = True, server_name: str | None = None,
           log: Callable[[str], None] = lambda m: None, policy: RetryPolicy | None = None) -> ExportResult:
    creds, signed = prepare(Path(outdir), Path(credentials))
    return push(signed, pool, creds, retries, backoff, progress, server_name, log, policy)


def export_command(
    outdir: Path = typer.Argument(..., help="Site output dir: images/<class>/<id>.png, manifest.json, report.json."),
    pool: str = typer.Option(..., "--pool", help="HOST:PORT of the pool service."),
    credentials: Path = typer.Option(..., "--credentials", help="This site's own keys folder (`plan-client keys init` + `keys install`)."),
    retries: int = typer.Option(_DEFAULT.retries, "--retries", min=0,
                                help="Retries of a failed transfer (exponential backoff; config pool.retries)."),
    backoff: float = typer.Option(_DEFAULT.backoff_s, "--backoff", min=0.0,
                                  help=f"First retry delay in seconds (doubles, max {_DEFAULT.max_backoff_s:g})."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    server_name: str | None = typer.Option(None, "--server-name", help="Expected name in the pool's certificate."),
) -> None:
    """Sign OUTDIR as a bundle and push it to the pool (retries; a duplicate is acknowledged).

    Example: plan-client export out/site-a --pool pool.example.org:9444 --credentials keys
    """
    def log(msg: str) -> None:
        typer.echo(msg, err=True)

    try:
        res = export(outdir, pool, credentials, retries, backoff, progress, server_name, log)
    except ExportError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if res.duplicate:
        typer.echo(f"bundle {res.bundle_id} already in the pool (duplicate, {res.n_images} images); nothing sent")
    else:
        typer.echo(f"stored bundle {res.bundle_id}: {res.n_images} images, sent {res.n_sent} file(s) "
                   f"({res.bytes_sent / 1e6:.2f} MB) in {res.seconds:.1f} s, {res.attempts} attempt(s)")


if __name__ == "__main__":
    typer.run(export_command)
