"""A warm fork server for Flower's per-message ``flwr-clientapp`` processes (``site.clientapp_forkserver``).

Flower 1.42's SuperExec starts a new ``flwr-clientapp`` process for every message it
hands to the ClientApp (``flwr.supercore.superexec.executor.subprocess_executor``:
``Popen(["flwr-clientapp", "--runtime-api-address", ..., "--token", ...])``, the command
found on ``PATH``), and that process spends ~3 s importing Flower before it asks the
SuperNode for its message. ``plan-client start`` therefore starts this server first
(``python -m client.clientapp_forkserver``), which imports Flower and the third-party
modules once (:data:`PRELOAD`; not torch, not the app: the forked process loads the
app from the FAB, as Flower's does), and writes a small ``flwr-clientapp`` launcher
into ``STATE/bin`` (:func:`write_launcher`), which it puts first on the SuperNode's
``PATH``. For each message the launcher (stdlib only, ``python -IS``) sends its
arguments to the server, which forks a child that runs Flower's own ``flwr-clientapp``
main with them; the launcher exits once the child exists (the SuperExec never waits for
it). The child's output goes where the server's goes: the SuperNode's log.

Security: the server listens on an AF_UNIX socket in the site's state folder (mode
0600); every connection must pass the HMAC challenge of
:mod:`multiprocessing.connection` with a secret made at each start (``STATE/clientapp.key``,
0600) before anything is read, and a request is only a list of ``--option value``
strings for Flower's main. Where the server cannot be reached the launcher runs
Flower's ``flwr-clientapp`` itself (as without the server) and says so on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection, Listener
from pathlib import Path

from client.site_worker import serve_connections

LOG = logging.getLogger("plan.clientapp_forkserver")

#: Imported once by the server, so that each forked ClientApp process starts with them loaded.
PRELOAD = ("flwr.supernode.cli.flwr_clientapp", "flwr.app", "flwr.clientapp", "flwr.cli.install",
           "pydantic", "numpy", "yaml", "httpx", "grpc", "tqdm")
#: Flower's ClientApp main: what each forked child runs.
CLIENTAPP_MAIN = ("flwr.supernode.cli.flwr_clientapp", "flwr_clientapp")

LAUNCHER = '''#!{python} -IS
"""flwr-clientapp launcher written by `plan-client start` (client/clientapp_forkserver.py): forks it warm."""
import os, sys
from multiprocessing.connection import Client
ADDRESS, KEY_FILE, FLOWER = {address!r}, {key_file!r}, {flower!r}
try:
    with open(KEY_FILE, "rb") as fh:
        key = fh.read().strip()
    conn = Client(ADDRESS, family="AF_UNIX", authkey=key)
except Exception as err:
    print(f"flwr-clientapp launcher: fork server {{ADDRESS}} not reachable ({{err}}); running {{FLOWER}}",
          file=sys.stderr, flush=True)
    os.execv(FLOWER, [FLOWER, *sys.argv[1:]])
with conn:
    conn.send(sys.argv[1:])
    status, detail = conn.recv()
if status != "ok":
    print(f"flwr-clientapp launcher: {{detail}}", file=sys.stderr, flush=True)
    sys.exit(1)
'''


def write_launcher(path: Path, address: Path, key_file: Path, flower: str) -> Path:
    """Write the ``flwr-clientapp`` launcher (mode 0700) that asks the server at ``address`` for a fork."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(LAUNCHER.format(python=sys.executable, address=str(address), key_file=str(key_file),
                                   flower=str(flower)))
    tmp.chmod(0o700)
    os.replace(tmp, path)
    return path


def check_request(argv: object) -> list[str]:
    """A launcher's request: Flower's ``flwr-clientapp`` options as strings; ValueError otherwise."""
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ValueError(f"request must be a list of strings, got {type(argv).__name__}")
    if argv and not argv[0].startswith("--"):
        raise ValueError(f"request must start with an option, got {argv[0]!r}")
    return argv


def _exit_code(err: SystemExit) -> int:
    if err.code is None:
        return 0
    return err.code if isinstance(err.code, int) else 1


def _run_child(argv: list[str]) -> None:
    """In the forked child: Flower's flwr-clientapp main with ``argv``; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server ignores it; the ClientApp may wait for its own
        sys.argv = ["flwr-clientapp", *argv]
        mod_name, fn_name = CLIENTAPP_MAIN
        getattr(importlib.import_module(mod_name), fn_name)()
        code = 0
    except SystemExit as err:
        code = _exit_code(err)
    except BaseException:  # noqa: BLE001 - the child must end here, whatever happened
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - nothing to report to
                pass
        os._exit(code)


def _serve_one(conn: Connection) -> None:
    try:
        argv = check_request(conn.recv())
    except (ValueError, EOFError) as err:
        LOG.warning("clientapp fork server: bad request: %s", err)
        conn.send(("error", f"clientapp fork server: bad request: {err}"))
        return
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run_child(argv)
    LOG.info("clientapp fork server: flwr-clientapp started as pid %d", pid)
    conn.send(("ok", pid))


def preload() -> None:
    """Import :data:`PRELOAD` and check that Flower's ClientApp main is there (clear error naming flwr otherwise)."""
    for name in PRELOAD:
        importlib.import_module(name)
    mod_name, fn_name = CLIENTAPP_MAIN
    if not callable(getattr(sys.modules[mod_name], fn_name, None)):
        from importlib.metadata import version

        raise RuntimeError(f"flwr {version('flwr')}: {mod_name}.{fn_name} is gone; set site.clientapp_forkserver: false")


def serve(address: Path, key: bytes, ready_file: Path | None = None, max_requests: int | None = None) -> None:
    """Fork one ClientApp process per authenticated request on the AF_UNIX socket ``address``."""
    preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children: no zombies, no waiter thread
    address.unlink(missing_ok=True)
    old = os.umask(0o077)  # owner only from the start, then 0600
    try:
        listener = Listener(str(address), family="AF_UNIX", authkey=key)
    finally:
        os.umask(old)
    address.chmod(0o600)
    with listener:
        LOG.info("clientapp fork server listening on %s", address)
        serve_connections(listener, _serve_one, "clientapp fork server", ready_file, max_requests)


def main(argv: list[str] | None = None) -> int:
    from client.site_worker import read_key

    ap = argparse.ArgumentParser(prog="python -m client.clientapp_forkserver", description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True, type=Path, help="AF_UNIX socket path to listen on")
    ap.add_argument("--key-file", required=True, type=Path, help="file holding the secret (plan-client start makes it)")
    ap.add_argument("--ready-file", type=Path, help="written with the server's pid once it listens")
    args = ap.parse_args(argv)
    handler = logging.StreamHandler()  # ours only: Flower logs through its own handler (root stays quiet)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    try:
        serve(args.socket, read_key(args.key_file), args.ready_file)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: clientapp fork server: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
