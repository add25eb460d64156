"""``plan-client start``: this hospital's Flower SuperNode (TLS + node authentication).

From ``site.yaml`` (a PlanConfig; relative paths are relative to the YAML file):

* ``site_id`` and ``data`` (source/path/name of the site's own images),
* ``site.superlink_address``: the coordinator's proxy, ``host:port``,
* ``site.keys_dir``: this site's own keys folder (``plan-client keys init`` +
  ``keys install``, holding ``node_key`` and ``ca.crt``); a folder with ``sites/SITE``
  in it works too (one machine running several sites),
* ``site.state_dir``: where the site keeps its trainer state, the Flower home,
  ``node.toml`` and its log,
* ``site.supernode_port``: local runtime port (one per SuperNode on a machine),
* ``site.pool_address`` (+ optional ``pool.server_name``): where this site exports its
  synthetic images after training (the coordinator's pool service, e.g.
  ``coordinator.example.org:9444``), and ``site.pool_keys_dir``: the folder it pushes with
  (``client.crt``, ``client.key``, ``signing.key``, ``ca.crt``; default: the site's
  credentials folder above). They go into the node config (``pool-address``,
  ``pool-server-name``, ``pool-credentials``): the site, not the coordinator, decides them.
* ``site_minimums`` (optional): the loosest synthesis settings this site accepts
  (``min-k``, ``max-tau-id``, ``max-tau-indep``, ``min-delta-quantile``, ``min-planted``,
  ``block-on-planted`` in the node config; client/post_training.py refuses a looser request).
* ``site.superexec_poll_s``: how often the SuperNode's SuperExec looks for a new
  task (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``; Flower's default of 1 s is paid per message).
* ``site.worker`` (default on): a site worker (client/site_worker.py) is started
  first, on a free 127.0.0.1 port with a secret made for this start (``STATE/worker.key``);
  the node config announces it (``worker-address``, ``worker-key``) and each ClientApp
  process forwards its train message there instead of importing torch and the data itself.
* ``site.supernode_poll_s`` (default 0.25 s): the SuperNode runs as Flower's own main through
  client/supernode_runner.py, which caps the hard-coded sleeps of its loop (3 s after an
  empty pull, 0.5 s while waiting for a reply) at this value; null = plain ``flower-supernode``.
* ``site.clientapp_forkserver`` (default on): a warm fork server (client/clientapp_forkserver.py)
  is started before the SuperNode; a ``flwr-clientapp`` launcher in ``STATE/bin``, first on the
  SuperNode's PATH, has it fork each per-message ClientApp process with Flower already imported.

The SuperNode runs in the foreground; Ctrl-C or SIGTERM stop it and its ClientApps.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from plan_shared.config import PlanConfig, load_config
from plan_shared.credentials import NODE_KEY, find_identity_dir, identity_dir
from plan_shared.flower_env import flower_env


class StartError(RuntimeError):
    """The SuperNode cannot start; the message says what to fix."""


def _resolve(p: str, base: Path) -> Path:
    q = Path(p).expanduser()
    return (q if q.is_absolute() else base / q).resolve()


def _toml_str(v: str) -> str:
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def site_minimums_node_config(cfg: PlanConfig) -> dict[str, str]:
    """The site's ``site_minimums`` as node-config entries (only the keys it sets)."""
    from client.site import MINIMUM_KEYS

    out = {}
    for key, nc_key in MINIMUM_KEYS.items():
        v = getattr(cfg.site_minimums, key)
        if v is not None:
            out[nc_key] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


@dataclass
class StartPlan:
    """What ``plan-client start`` runs: the SuperNode and (optionally) the site worker."""

    supernode: list[str]
    env: dict[str, str]
    state: Path
    worker: list[str] | None = None  # argv of the site worker, None when site.worker is off
    worker_ready: Path | None = None  # the worker writes its pid here once it listens
    forkserver: list[str] | None = None  # argv of the ClientApp fork server, None when site.clientapp_forkserver is off
    forkserver_ready: Path | None = None


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Longest AF_UNIX socket path Linux takes (sun_path is 108 bytes with its NUL).
_MAX_SOCKET_PATH = 107


def _socket_path(state: Path) -> Path:
    """STATE/clientapp.sock, or one in a fresh 0700 temporary folder where that path is too long for AF_UNIX."""
    p = state / "clientapp.sock"
    if len(os.fsencode(p)) <= _MAX_SOCKET_PATH:
        return p
    return Path(tempfile.mkdtemp(prefix="plan-capp-")) / "s"


def _flower_command(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.is_file() else (shutil.which(name) or name)


def supernode_command_line(config_path: str | Path) -> tuple[list[str], dict[str, str], Path]:
    """(argv, env, state dir) of the SuperNode for ``site.yaml``; writes ``STATE/node.toml``."""
    plan = start_plan(config_path)
    return plan.supernode, plan.env, plan.state


def start_plan(config_path: str | Path) -> StartPlan:
    """The SuperNode (and site worker) for ``site.yaml``; writes ``STATE/node.toml`` (and a fresh worker key)."""
    config_path = Path(config_path).expanduser().resolve()
    cfg: PlanConfig = load_config(config_path, role="site")
    base = config_path.parent
    fed = cfg.site
    state = _resolve(fed.state_dir, base)
    certs = _resolve(fed.keys_dir, base)
    # plumbing: the one credentials-folder rule (plan_shared.credentials.find_identity_dir)
    ident = find_identity_dir(certs, "site", cfg.site_id, marker=NODE_KEY) or identity_dir(certs, cfg.site_id, "site")
    key = ident / "node_key"
    ca = ident / "ca.crt" if (ident / "ca.crt").is_file() else certs / "ca.crt"
    for f, what in ((key, "node private key"), (ca, "federation CA certificate")):
        if not f.is_file():
            raise StartError(f"{f}: {what} missing; the coordinator issues it with "
                             f"`plan-client keys init --dir DIR --name {cfg.site_id}` + `keys install` (site.keys_dir)")
    node = {"site-id": cfg.site_id, "data-source": cfg.data.source, "state-dir": str(state / "site")}
    if cfg.data.path:
        data_path = _resolve(cfg.data.path, base)
        if not data_path.exists():
            raise StartError(f"data.path {data_path} does not exist")
        node["data-path"] = str(data_path)
    elif cfg.data.name:
        node["data-name"] = cfg.data.name
    else:
        raise StartError("site.yaml names no data: set data.path (or data.name for a MedMNIST set)")
    if fed.pool_address:
        node["pool-address"] = fed.pool_address
        if cfg.pool.server_name:
            node["pool-server-name"] = cfg.pool.server_name
        creds = _resolve(fed.pool_keys_dir, base) if fed.pool_keys_dir else ident
        for name in ("client.crt", "client.key", "signing.key", "ca.crt"):
            if not (creds / name).is_file():
                raise StartError(f"{creds / name} missing: site.pool_keys_dir must be this site's keys folder "
                                 f"for this site (`plan-client keys init --name {cfg.site_id}` + `keys install`)")
        node["pool-credentials"] = str(creds)
    else:
        print("warning: site.pool_address is not set in the site config: this site cannot export synthetic images "
              "(the post-training synthesis phase will fail here)", file=sys.stderr)
    node.update(site_minimums_node_config(cfg))
    state.mkdir(parents=True, exist_ok=True)
    worker: list[str] | None = None
    ready: Path | None = None
    if fed.worker:
        from client.site_worker import ADDRESS_KEY, KEY_FILE_KEY, make_key

        key_file = state / "worker.key"
        make_key(key_file)  # a new secret per start: an old ClientApp or worker cannot use it
        address = f"127.0.0.1:{_free_loopback_port()}"
        ready = state / "worker.ready"
        ready.unlink(missing_ok=True)
        node[ADDRESS_KEY] = address
        node[KEY_FILE_KEY] = str(key_file)
        worker = [sys.executable, "-m", "client.site_worker", "--address", address, "--key-file", str(key_file),
                  "--ready-file", str(ready)]
    node_toml = state / "node.toml"
    node_toml.write_text("".join(f"{k} = {_toml_str(v)}\n" for k, v in node.items()))
    # fixedcost: Flower's SuperNode main with its loop's sleeps capped (client/supernode_runner.py)
    runner = ([sys.executable, "-m", "client.supernode_runner", "--poll-s", str(fed.supernode_poll_s), "--"]
              if fed.supernode_poll_s is not None else [_flower_command("flower-supernode")])
    argv = [
        *runner,
        "--superlink", fed.superlink_address,
        "--root-certificates", str(ca),
        "--auth-supernode-private-key", str(key),
        "--node-config", str(node_toml),
        "--host", "127.0.0.1",
        "--port", str(fed.supernode_port),
    ]
    env = flower_env(state / "flwr-home")  # plumbing: plan_shared.flower_env
    if cfg.threads:
        env.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    # Read by the SuperExec the SuperNode starts: how long a new message waits before its ClientApp starts.
    env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(fed.superexec_poll_s)
    forkserver: list[str] | None = None
    fs_ready: Path | None = None
    if fed.clientapp_forkserver:  # fixedcost: per-message ClientApp processes forked warm
        from client.clientapp_forkserver import write_launcher
        from client.site_worker import make_key

        fs_key = state / "clientapp.key"
        make_key(fs_key)
        sock = _socket_path(state)
        fs_ready = state / "clientapp-forkserver.ready"
        fs_ready.unlink(missing_ok=True)
        bin_dir = state / "bin"
        write_launcher(bin_dir / "flwr-clientapp", sock, fs_key, _flower_command("flwr-clientapp"))
        env["PATH"] = os.pathsep.join(p for p in (str(bin_dir), env.get("PATH", os.environ.get("PATH", ""))) if p)
        forkserver = [sys.executable, "-m", "client.clientapp_forkserver", "--socket", str(sock), "--key-file",
                      str(fs_key), "--ready-file", str(fs_ready)]
    return StartPlan(argv, env, state, worker, ready, forkserver, fs_ready)


def _wait_ready(ready: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if ready.is_file():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def start_command(config: str, dry_run: bool = False, worker_ready_timeout_s: float = 120.0) -> int:
    try:
        plan = start_plan(config)
    except (StartError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if plan.worker:
        print("starting site worker: " + " ".join(plan.worker), flush=True)
    if plan.forkserver:
        print("starting ClientApp fork server: " + " ".join(plan.forkserver), flush=True)
    print("starting SuperNode: " + " ".join(plan.supernode), flush=True)
    if dry_run:
        return 0
    # Same process group as this command: Ctrl-C, systemd and `kill -- -PGID` reach the
    # SuperNode, its ClientApp processes and the site worker too.
    worker = subprocess.Popen(plan.worker, env=plan.env, cwd=plan.state) if plan.worker else None
    forkserver = subprocess.Popen(plan.forkserver, env=plan.env, cwd=plan.state) if plan.forkserver else None
    if worker is not None and plan.worker_ready and not _wait_ready(plan.worker_ready, worker, worker_ready_timeout_s):
        print(f"warning: the site worker is not ready after {worker_ready_timeout_s:.0f}s (exit {worker.poll()}); "
              "ClientApps run the handlers in their own processes until it is", file=sys.stderr)
    if (forkserver is not None and plan.forkserver_ready
            and not _wait_ready(plan.forkserver_ready, forkserver, worker_ready_timeout_s)):
        print(f"warning: the ClientApp fork server is not ready after {worker_ready_timeout_s:.0f}s (exit "
              f"{forkserver.poll()}); each message starts Flower's flwr-clientapp until it is", file=sys.stderr)
    proc = subprocess.Popen(plan.supernode, env=plan.env, cwd=plan.state)
    helpers = [p for p in (worker, forkserver) if p is not None]

    def _stop(signum: int, frame: object) -> None:  # forward; the SuperNode stops its SuperExec/ClientApp children
        for p in (proc, *helpers):
            if p.poll() is None:
                p.terminate()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    rc = proc.wait()
    for p in helpers:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    if rc not in (0, -signal.SIGTERM, 143):
        print(f"SuperNode exited with {rc} (TLS, key not registered, or proxy unreachable?); see the log above",
              file=sys.stderr)
    return max(0, rc)
