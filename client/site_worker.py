"""The site worker: one long-lived process per site that runs the ClientApp's handlers warm.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message; importing torch,
the models and the site's images there costs seconds per round. ``plan-client start``
therefore also starts this worker (``python -m client.site_worker``) next to the
SuperNode, and the per-message ClientApp forwards the message to it (client/app.py) and
returns the worker's reply. The worker imports ``client.app`` once and calls the very same
handler functions, so the site's behaviour does not depend on which process runs them;
the site's data set stays cached in the worker (client/site.py).

Security: the worker listens on 127.0.0.1 only, and every connection must pass the
HMAC challenge of :mod:`multiprocessing.connection` with a 32-byte secret made at each
start (``STATE/worker.key``, mode 0600) before anything it sends is read. The node
config tells the ClientApp where to connect (``worker-address``) and where the secret is
(``worker-key``). Where the worker cannot be reached the ClientApp runs the handler
itself (in its own process, as without a worker) and logs why.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

LOG = logging.getLogger("plan.site_worker")

#: Node-config keys the worker is announced with (written by client/supernode.py).
ADDRESS_KEY = "worker-address"
KEY_FILE_KEY = "worker-key"
#: Handlers the ClientApp forwards (message type -> client.app function name).
FORWARDED = ("train",)


class WorkerError(RuntimeError):
    """The worker ran the handler and it failed; the message is the handler's error."""


def make_key(path: Path) -> bytes:
    """A fresh 32-byte secret in ``path`` (hex, created 0600, replacing an older one)."""
    key = secrets.token_hex(32).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    os.replace(tmp, path)
    return key


def read_key(path: Path) -> bytes:
    key = Path(path).read_bytes().strip()
    if len(key) < 32:
        raise ValueError(f"{path}: site worker key too short ({len(key)} bytes)")
    return key


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        raise ValueError(f"site worker address {address!r}: must be 127.0.0.1:PORT (loopback only)")
    return "127.0.0.1", int(port)


def _handlers() -> dict[str, Callable[..., Any]]:
    import client.app as capp

    return {name: getattr(capp, name) for name in FORWARDED}


def _serve_one(conn: Connection, handlers: dict[str, Callable[..., Any]]) -> None:
    name, msg, context = conn.recv()
    if name not in handlers:
        conn.send(("error", f"site worker: unknown handler {name!r} (serves {sorted(handlers)})"))
        return
    # The handler runs here, not forwarded again.
    context.node_config = {k: v for k, v in context.node_config.items() if k not in (ADDRESS_KEY, KEY_FILE_KEY)}
    t0 = time.perf_counter()
    try:
        reply = handlers[name](msg, context)
    except Exception as err:
        LOG.exception("site worker: %s failed", name)
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    LOG.info("site worker: %s handled in %.2fs", name, time.perf_counter() - t0)
    conn.send(("ok", (reply, context.state)))


def serve(address: str, key: bytes, ready_file: Path | None = None, max_requests: int | None = None) -> None:
    """Accept authenticated connections on ``address`` and run one handler per connection."""
    handlers = _handlers()
    import torch  # noqa: F401 - warm: what each ClientApp process would import otherwise

    import plan_shared.gan  # noqa: F401

    with Listener(parse_address(address), authkey=key) as listener:
        LOG.info("site worker listening on %s (handlers %s)", address, ", ".join(handlers))
        serve_connections(listener, lambda conn: _serve_one(conn, handlers), "site worker", ready_file, max_requests)


def serve_connections(listener: Listener, serve_one: Callable[[Connection], None], what: str,
                      ready_file: Path | None, max_requests: int | None) -> None:
    """Accept authenticated connections on ``listener`` and serve each with ``serve_one``, one at a time.

    ``ready_file`` gets the pid once listening; a refused (wrong key) or lost connection is logged
    as ``what`` and the loop goes on; it ends after ``max_requests`` (None = never).
    """
    if ready_file is not None:
        ready_file.write_text(str(os.getpid()))
    served = 0
    while max_requests is None or served < max_requests:
        try:
            conn = listener.accept()  # raises AuthenticationError for a wrong key
        except Exception as err:  # noqa: BLE001 - a bad client must not stop the server
            LOG.warning("%s: refused a connection: %s", what, err)
            continue
        with conn:
            try:
                serve_one(conn)
            except (EOFError, OSError) as err:
                LOG.warning("%s: connection lost: %s", what, err)
        served += 1


def forward(name: str, msg: Any, context: Any) -> Any | None:
    """Run handler ``name`` in the site worker named by the node config; None where there is none.

    Returns the worker's reply Message; raises :class:`WorkerError` when the handler failed
    there. None (run it here instead) when the node config names no worker or it cannot be
    reached (logged).
    """
    nc = context.node_config or {}
    if name not in FORWARDED or not nc.get(ADDRESS_KEY):
        return None
    try:
        addr = parse_address(str(nc[ADDRESS_KEY]))
        key = read_key(Path(str(nc[KEY_FILE_KEY])))
        conn = Client(addr, authkey=key)
    except (OSError, ValueError, KeyError, EOFError) as err:
        LOG.warning("site worker at %s not reachable (%s); running %s in this process", nc.get(ADDRESS_KEY), err, name)
        return None
    with conn:
        conn.send((name, msg, context))
        status, payload = conn.recv()
    if status != "ok":
        raise WorkerError(str(payload))
    reply, state = payload
    context.state = state  # what the handler kept in context.state, as if it had run here
    return reply


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client.site_worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", required=True, help="127.0.0.1:PORT to listen on")
    ap.add_argument("--key-file", required=True, type=Path, help="file holding the secret (plan-client start makes it)")
    ap.add_argument("--ready-file", type=Path, help="written with the worker's pid once it listens")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(args.address, read_key(args.key_file), args.ready_file)
    except (OSError, ValueError) as err:
        print(f"error: site worker: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
