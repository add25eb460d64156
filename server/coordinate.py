"""``plan-server coordinate``: SuperLink with TLS + SuperNode auth, run submission, follow-up.

What it does, in order:

1. starts ``flower-superlink`` bound to **127.0.0.1** (HTTPS with the federation's server
   certificate, ``--enable-supernode-auth``, ``--database STATE/state.db`` so a restart
   keeps the registered nodes, ``--disable-runtime-dependency-installation``). Hospitals
   never reach it directly: a TLS reverse proxy (deploy/nginx-plan.conf) forwards only
   ``/v1/fleet/*``, because the open-source SuperLink's control API is unauthenticated;
2. registers the node public key of every active site in ``CERTS/registry.json``
   (``flwr supernode register``, via ``STATE/node-keys/NAME.pub`` written from the
   registry; revoked sites are unregistered);
3. with ``federation.post_training``: starts the pool service (gRPC, mutual TLS with the
   federation's server certificate) bound to ``coordinator.pool_listen``, store ``STATE/pool-store``,
   log ``STATE/pool-service.log``, enforcing the ``policy:`` section written to
   ``pool.policy_file`` (default ``STATE/pool-policy.json``; the ServerApp adds the final
   generator's digest before synthesis, until then the pool refuses every bundle), and
   finds the coordinator's reader credentials (``coordinator.reader_dir``, else ``STATE/reader``,
   enrolled as reader ``coordinator`` on first use: keys made there, certificate from the
   CA, no private key in CERTS);
4. submits the Flower app (``flwr run``) with ``STATE/run-config.yaml`` (the config with
   absolute paths and, for post-training, the pool address to pull from over loopback
   and the reader credentials) and the output directory ``STATE/run`` as run-config,
   stopping a run left over by a killed coordinator;
5. follows the run to its real end state by polling ``flwr ls --run-id`` (the exit code
   of ``flwr run`` says nothing), printing one progress line per finished round, and
   with post-training the path of ``STATE/run/report.json`` and its key figures; and each
   site's stage transitions and progress (elapsed, ETA), which the sites report over their
   mutual-TLS pool channel and the pool appends to ``STATE/pool-store/progress.jsonl``;
6. stops the pool service and the SuperLink (its whole process group) on exit, Ctrl-C or
   SIGTERM.

Restarted with the same config, it resumes: the ServerApp continues after the last
round found in ``STATE/run/checkpoints/latest.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plan_shared.config import ConfigError, PlanConfig, load_config
from plan_shared.flower_env import flower_env

if TYPE_CHECKING:
    from plan_shared.progress import ProgressTail
    from server.pool.process import PoolProcess

LOG = logging.getLogger("plan.coordinate")
CONNECTION = "plan"
FINISHED = ("finished:completed", "finished:failed", "finished:stopped")
# Written into the run's output folder by the ServerApp as its last step (server/app.py), as error.json is on a
# failure: the follower of a run (here and server/simulate.py) then checks the status at once, not every 30 s.
SERVERAPP_DONE = "serverapp.done"
# Following a run, each status check starts a `flwr` CLI process (~1.5 s of CPU; polled every 2 s in the demo it
# took ~40 % of a core from the sites): check every STATUS_EVERY_S while the run goes on, every STATUS_ENDING_S
# once it is ending (its log stream closed with it, or the ServerApp wrote error.json or SERVERAPP_DONE).
STATUS_EVERY_S = 30.0
STATUS_ENDING_S = 2.0
RUN_END_MARKERS = ("error.json", SERVERAPP_DONE)


def clear_run_markers(out: Path) -> None:
    """Remove an older run's end markers from a reused output folder (they are not this run's end)."""
    for name in RUN_END_MARKERS:
        (out / name).unlink(missing_ok=True)


def status_check_due(since_last_s: float, out: Path, log_stream: subprocess.Popen | None) -> bool:
    """Whether a follower that checked the run's status ``since_last_s`` ago should check it now."""
    ending = (log_stream is not None and log_stream.poll() is not None) or any(
        (out / name).is_file() for name in RUN_END_MARKERS)
    return since_last_s >= (STATUS_ENDING_S if ending else STATUS_EVERY_S)


class CoordinateError(RuntimeError):
    """The coordinator cannot continue; the message says what to fix."""


def _resolve(p: str, base: Path) -> Path:
    q = Path(p).expanduser()
    return (q if q.is_absolute() else base / q).resolve()


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise CoordinateError(f"{name} not found next to {sys.executable} nor on PATH (pip install 'flwr[simulation]')")
    return found


def default_app_dir() -> Path:
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise CoordinateError(f"no pyproject.toml in {root}: pass --app with the project folder (the Flower app)")
    return root


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc; empty where /proc is missing)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], list(kids.get(pid, []))
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(kids.get(c, []))
    return out


def kill_tree(pid: int, known: list[int] | None = None) -> None:
    """SIGKILL ``pid``'s process group and every (known or current) descendant."""
    pids = set(known or []) | set(descendants(pid))
    for target in (pid, *pids):
        try:
            os.killpg(target, signal.SIGKILL) if target == pid else os.kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Coordinator:
    def __init__(self, config_path: str | Path, app_dir: Path | None = None, poll_s: float = 2.0):
        self.config_path = Path(config_path).expanduser().resolve()
        self.cfg: PlanConfig = load_config(self.config_path, role="coordinator")
        base = self.config_path.parent
        fed = self.cfg.coordinator
        self.state = _resolve(fed.state_dir, base)
        self.certs = _resolve(fed.ca_dir, base)
        self.out = self.state / "run"
        self.home = self.state / "flwr-home"
        self.port = fed.superlink_port
        self.app_dir = (app_dir or default_app_dir()).resolve()
        self.poll_s = poll_s
        self.proc: subprocess.Popen | None = None
        self.log_proc: subprocess.Popen | None = None  # `flwr log --stream` into run/serverapp.log
        self.pool: PoolProcess | None = None  # while it runs
        self.policy_file: Path | None = None  # the pool's policy file when coordinate started the pool
        self.pool_address: str | None = None  # where the ServerApp pulls from
        self.reader: Path | None = None
        self._registry_stamp: tuple | None = None  # registry.json as last acted on (revocations)
        self.progress: ProgressTail | None = None  # of the pool's progress.jsonl
        for f in ("ca.crt", "server.crt", "server.key", "registry.json"):
            if not (self.certs / f).is_file():
                raise CoordinateError(f"{self.certs / f} missing: run `plan-server certs init --dir {self.certs}` first")

    # ------------------------------------------------------------------ environment
    def env(self) -> dict[str, str]:
        return flower_env(self.home)

    def write_connection(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs / "ca.crt"}"\n'
        )

    def flwr(self, *args: str, timeout: float = 120) -> dict[str, Any]:
        """Run a ``flwr`` CLI command with ``--format json``; return the parsed answer."""
        cmd = [_bin("flwr"), *args, "--format", "json"]
        r = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout, cwd=self.state)
        try:
            start = r.stdout.index("{")
            return json.loads(r.stdout[start:])
        except ValueError:
            return {"success": False, "error-message": (r.stdout + r.stderr).strip()[-2000:]}

    # ------------------------------------------------------------------ superlink
    def start_superlink(self, ready_timeout: float = 90) -> None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", self.port)) == 0:
                raise CoordinateError(f"port 127.0.0.1:{self.port} is already in use (another SuperLink?)")
        self.state.mkdir(parents=True, exist_ok=True)
        self.write_connection()
        cmd = [
            _bin("flower-superlink"),
            "--ssl-ca-certfile", str(self.certs / "ca.crt"),
            "--ssl-certfile", str(self.certs / "server.crt"),
            "--ssl-keyfile", str(self.certs / "server.key"),
            "--enable-supernode-auth",
            "--database", str(self.state / "state.db"),
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1",
            "--port", str(self.port),
        ]
        log = open(self.state / "superlink.log", "ab")
        LOG.info("starting SuperLink on 127.0.0.1:%d (log %s)", self.port, self.state / "superlink.log")
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT, cwd=self.state,
                                     start_new_session=True)
        (self.state / "superlink.pid").write_text(str(self.proc.pid))
        t0 = time.monotonic()
        while time.monotonic() - t0 < ready_timeout:
            if self.proc.poll() is not None:
                raise CoordinateError(f"SuperLink exited with {self.proc.returncode}; see {self.state / 'superlink.log'}")
            if self.flwr("supernode", "ls", timeout=30).get("success"):
                return
            time.sleep(1)
        raise CoordinateError(f"SuperLink not ready after {ready_timeout:.0f}s; see {self.state / 'superlink.log'}")

    def stop_superlink(self) -> None:
        if self.proc is None:
            return
        tree = descendants(self.proc.pid)
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
        kill_tree(self.proc.pid, tree)  # SuperExec and ServerApp run in their own sessions; none may outlive it
        if self.proc.poll() is None:
            self.proc.wait(5)

    # ------------------------------------------------------------------ pool
    def reader_credentials(self) -> Path:
        """The coordinator's reader identity for pulling the pool: ``coordinator.reader_dir``, else ``STATE/reader``.

        ``STATE/reader`` is made on first use through the same two halves as any reader's
        (``keys init`` there, ``certs enroll``, ``keys install``): its private key lives in
        the coordinator's state folder, never in CERTS.
        """
        from server.certs import CertsError, issue

        if self.cfg.coordinator.reader_dir:
            p = _resolve(self.cfg.coordinator.reader_dir, self.config_path.parent)
            if not (p / "client.crt").is_file():
                raise CoordinateError(f"coordinator.reader_dir {p}: no client.crt there; make a reader with "
                                      f"`plan-client keys init --role reader`, `plan-server certs enroll --role reader` "
                                      "and `plan-client keys install`")
            return p
        own = self.state / "reader"
        if (own / "client.crt").is_file():
            return own
        if not (self.certs / "ca.key").is_file():
            raise CoordinateError(f"no reader credentials in {own} and no CA key in {self.certs} to enrol one: "
                                  "set coordinator.reader_dir to a reader folder")
        try:
            out = issue(self.certs, "coordinator", "reader", own)
        except (CertsError, OSError) as err:  # e.g. ca_dir read-only under systemd's ProtectSystem=strict
            raise CoordinateError(f"enrolling the coordinator's reader identity failed: {err}; make one with "
                                  f"`plan-server certs issue --dir {self.certs} --name coordinator --role reader "
                                  f"--out {own}` or set coordinator.reader_dir") from None
        LOG.info("enrolled the coordinator's reader identity %s", out)
        return out

    def start_pool(self) -> None:
        """Pool service on ``coordinator.pool_listen`` (or the external ``coordinator.pool_address`` when listen is null)."""
        from server.pool.process import PoolProcess, limits_args

        pool, own = self.cfg.pool, self.cfg.coordinator
        self.reader = self.reader_credentials()
        if not own.pool_listen:
            if not own.pool_address:
                raise CoordinateError("federation.post_training needs a pool: set coordinator.pool_listen (coordinate "
                                      "starts it) or coordinator.pool_address (an external `plan-server pool serve`)")
            self.pool_address = own.pool_address
            LOG.info("using the external pool service at %s", own.pool_address)
            return
        host, _, port_s = own.pool_listen.rpartition(":")
        try:
            port = int(port_s)
        except ValueError:
            raise CoordinateError(f"coordinator.pool_listen {own.pool_listen!r}: expected host:port") from None
        host = host or "0.0.0.0"
        if port:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    raise CoordinateError(f"coordinator.pool_listen {own.pool_listen}: port {port} is already in use "
                                          "(another pool service?)")
        from plan_shared.policy import policy_from_config, write_policy_file

        self.policy_file = Path(pool.policy_file).expanduser().resolve() if pool.policy_file else \
            self.state / "pool-policy.json"
        write_policy_file(self.policy_file, policy_from_config(self.cfg))  # digest null: a new run
        self.pool = PoolProcess(self.state / "pool-store", self.certs, self.state, host=host, port=port,
                                extra=("--policy", str(self.policy_file), *limits_args(pool.limits)))
        from plan_shared.progress import ProgressTail
        from server.pool.service import PROGRESS_LOG

        self.progress = ProgressTail(self.state / "pool-store", PROGRESS_LOG, from_end=True)
        pool_proc = self.pool
        try:
            pool_proc.start()
        except RuntimeError as err:
            self.pool = None
            raise CoordinateError(f"the pool service did not start: {err}") from None
        local = "localhost" if host.strip("[]") in ("0.0.0.0", "::", "") else host
        self.pool_address = f"{local}:{pool_proc.port}"
        print(f"pool service on {host}:{pool_proc.port} (mutual TLS), store {self.state / 'pool-store'}, "
              f"log {pool_proc.log_path}; the coordinator pulls from {self.pool_address} as {self.reader.name}",
              flush=True)

    def stop_pool(self) -> None:
        if self.pool is not None:
            self.pool.stop()
            self.pool = None

    def run_config_file(self) -> Path:
        """``STATE/run-config.yaml``: the config the ServerApp reads (absolute paths, pool to pull from)."""
        own: dict[str, Any] = {"state_dir": str(self.state), "ca_dir": str(self.certs)}
        upd: dict[str, Any] = {}
        if self.pool_address:
            own.update(pool_address=self.pool_address, reader_dir=str(self.reader))
            if self.policy_file is not None:
                upd["pool"] = self.cfg.pool.model_copy(update={"policy_file": str(self.policy_file)})
        upd["coordinator"] = self.cfg.coordinator.model_copy(update=own)
        path = self.state / "run-config.yaml"
        path.write_text(self.cfg.model_copy(update=upd).to_yaml())
        return path

    # ------------------------------------------------------------------ sites
    def register_sites(self) -> dict[str, str]:
        from server.certs import read_registry

        reg = read_registry(self.certs)
        known_path = self.state / "nodes.json"
        known: dict[str, str] = json.loads(known_path.read_text()) if known_path.is_file() else {}
        active = {}
        for name, e in sorted(reg.get("identities", {}).items()):
            if e.get("role") != "site":
                continue
            if e.get("revoked"):
                if name in known:
                    self.flwr("supernode", "unregister", known.pop(name))
                    LOG.info("site %s is revoked: unregistered node %s", name, name)
                continue
            if not e.get("node_public_key"):
                raise CoordinateError(f"{self.certs / 'registry.json'}: site {name!r} has no node_public_key "
                                      "(enrolled by an older version? re-enrol it with `plan-server certs enroll --force`)")
            pub = self.state / "node-keys" / f"{name}.pub"  # flwr reads the key from a file; the registry is the source
            pub.parent.mkdir(parents=True, exist_ok=True)
            pub.write_text(e["node_public_key"].strip() + "\n")
            r = self.flwr("supernode", "register", str(pub), "--name", name)
            if r.get("success"):
                known[name] = str(r["node-id"])
                LOG.info("registered site %s (node %s)", name, r["node-id"])
            elif "already in use" in r.get("error-message", ""):
                LOG.info("site %s already registered%s", name, f" (node {known[name]})" if name in known else "")
            else:
                raise CoordinateError(f"registering site {name} failed: {r.get('error-message')}")
            active[name] = known.get(name, "?")
        known_path.write_text(json.dumps(known, indent=1))
        self._registry_stamp = self._registry_file_stamp()
        if not active:
            raise CoordinateError(f"no active site in {self.certs / 'registry.json'}: enrol one with "
                                  "`plan-server certs enroll ENROLMENT --dir CERTS`")
        return active

    def _registry_file_stamp(self) -> tuple | None:
        try:
            st = os.stat(self.certs / "registry.json")
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def unregister_revoked(self) -> list[str]:
        """While the run goes on: when registry.json changed, unregister from the RUNNING SuperLink the node of
        every site now revoked (``flwr supernode unregister`` disconnects it). Returns the sites unregistered."""
        from server.certs import read_registry

        stamp = self._registry_file_stamp()
        if stamp is None or stamp == self._registry_stamp:
            return []
        self._registry_stamp = stamp
        reg = read_registry(self.certs)
        known_path = self.state / "nodes.json"
        known: dict[str, str] = json.loads(known_path.read_text()) if known_path.is_file() else {}
        done = []
        for name, e in sorted(reg.get("identities", {}).items()):
            if e.get("role") != "site" or not e.get("revoked") or name not in known:
                continue
            r = self.flwr("supernode", "unregister", known[name])
            if not r.get("success"):
                LOG.warning("unregistering revoked site %s (node %s) failed: %s", name, known[name],
                            r.get("error-message"))
                self._registry_stamp = None  # try again at the next poll
                continue
            print(f"site {name} is revoked: unregistered its node {known.pop(name)} from the running SuperLink",
                  flush=True)
            done.append(name)
        if done:
            known_path.write_text(json.dumps(known, indent=1))
        return done

    def online_nodes(self) -> list[str]:
        r = self.flwr("supernode", "ls")
        return [n["node-id"] for n in r.get("nodes", []) if n.get("status") == "online"]

    # ------------------------------------------------------------------ run
    def stop_stale_run(self) -> None:
        p = self.state / "current_run.json"
        if not p.is_file():
            return
        rid = json.loads(p.read_text()).get("run-id")
        status = self.run_status(rid).get("status", "")
        if rid and not status.startswith("finished"):
            LOG.info("stopping run %s left over by a previous coordinator (%s)", rid, status or "unknown")
            self.flwr("stop", str(rid))

    def submit(self, expected: int) -> str:
        rc = (f'plan-config="{self.run_config_file()}" out-dir="{self.out}" expected-nodes={expected} '
              f"num-server-rounds=0")
        r = self.flwr("run", str(self.app_dir), CONNECTION, "--run-config", rc, timeout=300)
        if not r.get("success"):
            raise CoordinateError(f"submitting the run failed: {r.get('error-message')}")
        rid = str(r["run-id"])
        (self.state / "current_run.json").write_text(json.dumps({"run-id": rid, "time": time.time()}))
        return rid

    def stream_serverapp_log(self, run_id: str) -> Path:
        """Keep the ServerApp's own log (waiting, resume, missing sites) in ``run/serverapp.log``.

        In deployment the ServerApp runs in a process of the SuperLink whose output only
        Flower's log API carries; ``flwr log --stream`` follows it until the run ends.
        """
        path = self.out / "serverapp.log"
        with open(path, "ab") as log:
            self.log_proc = subprocess.Popen([_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"], env=self.env(),
                                             stdout=log, stderr=subprocess.STDOUT, cwd=self.state)
        return path

    def stop_log_stream(self) -> None:
        if self.log_proc is not None and self.log_proc.poll() is None:
            self.log_proc.terminate()
            try:
                self.log_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.log_proc.kill()
                self.log_proc.wait(5)

    def run_status(self, run_id: str) -> dict[str, Any]:
        r = self.flwr("ls", "--run-id", str(run_id))
        runs = r.get("runs") or []
        return runs[0] if runs else {}

    def follow(self, run_id: str, n_sites: int) -> str:
        """Poll until the run is finished; print per-round progress; return the final status."""
        fed = self.cfg.federation
        seen = 0
        if (self.out / "metrics.jsonl").is_file():
            seen = len((self.out / "metrics.jsonl").read_text().splitlines())
        t0 = time.monotonic()
        last_wait = 0.0
        # deploy: not every poll (status_check_due), so that the coordinator does not take a core from the
        # SuperLink and ServerApp
        last_status, status = -STATUS_EVERY_S, ""
        while True:
            if status_check_due(time.monotonic() - last_status, self.out, self.log_proc):
                status, last_status = self.run_status(run_id).get("status", ""), time.monotonic()
            lines = (self.out / "metrics.jsonl").read_text().splitlines() if (self.out / "metrics.jsonl").is_file() else []
            for line in lines[seen:]:
                rec = json.loads(line)
                agg = rec.get("aggregate", {})
                miss = rec.get("missing") or []
                missing = ", ".join(f"{m['site']} ({m['reason']})" for m in miss)
                print(f"round {rec['round']}/{fed.rounds}: {rec['sites_replied']}/{rec['sites_sent']} sites, "
                      f"loss_g={agg.get('loss_g', float('nan')):.3f} loss_d={agg.get('loss_d', float('nan')):.3f}, "
                      f"{rec['wall_s']:.1f}s" + (f", missing: {missing}" if miss else ""), flush=True)
            seen = max(seen, len(lines))
            if self.progress is not None:
                print_progress(self.progress)
            if status in FINISHED:
                return status
            self.unregister_revoked()
            if seen == 0 and time.monotonic() - last_wait > 15:
                online = self.online_nodes()
                print(f"waiting for sites: {len(online)}/{n_sites} online ({time.monotonic() - t0:.0f}s, "
                      f"deadline {fed.wait_for_nodes_s:.0f}s), run {status or 'pending'}", flush=True)
                last_wait = time.monotonic()
            if self.proc is not None and self.proc.poll() is not None:
                raise CoordinateError(f"SuperLink exited with {self.proc.returncode}; see {self.state / 'superlink.log'}")
            time.sleep(self.poll_s)

    def run(self) -> int:
        fed = self.cfg.federation
        self.out.mkdir(parents=True, exist_ok=True)
        clear_run_markers(self.out)
        started = time.time()
        prev = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            if fed.post_training:
                self.start_pool()
            self.start_superlink()
            sites = self.register_sites()
            self.stop_stale_run()
            rid = self.submit(expected=len(sites))
            print(f"run {rid} submitted: {fed.rounds} rounds x {fed.local_steps} local steps, share={fed.share}, "
                  f"{len(sites)} registered sites ({', '.join(sites)}), min_nodes={fed.min_nodes}; output {self.out}, "
                  f"ServerApp log {self.stream_serverapp_log(rid)}", flush=True)
            status = self.follow(rid, len(sites))
            if status == "finished:completed" and (self.out / "federation.json").is_file():
                summ = json.loads((self.out / "federation.json").read_text())
                print(f"run {rid} completed: {summ['rounds_done']}/{summ['rounds']} rounds; checkpoints in "
                      f"{self.out / 'checkpoints'}", flush=True)
                if not fed.post_training:
                    return 0
                report = self.out / "report.json"
                if report.is_file() and report.stat().st_mtime >= started:
                    print(report_summary(json.loads(report.read_text()), report), flush=True)
                    return 0
                status = "finished:completed without a report"
            err = self.out / "error.json"
            why = json.loads(err.read_text()).get("error") if err.is_file() else "see " + str(self.state / "superlink.log")
            print(f"run {rid} ended {status}: {why}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            print("interrupted: stopping the SuperLink (restart `plan-server coordinate` to resume)", file=sys.stderr)
            return 130
        finally:
            self.stop_log_stream()
            self.stop_superlink()
            self.stop_pool()
            signal.signal(signal.SIGTERM, prev)


def print_progress(tail, file=None) -> int:
    """Print the sites' new progress lines (``[site] stage ...``) of a ProgressTail; return how many."""
    from plan_shared.progress import format_line, is_line

    n = 0
    for ev in tail.poll():
        if is_line(ev):
            print(format_line(ev), file=file or sys.stdout, flush=True)
            n += 1
    return n


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("n/a" if v is None else str(v))


def report_summary(report: dict[str, Any], path: Path) -> str:
    """The key figures of a federation report, a few lines for the terminal."""
    pool, util, priv = report.get("pool", {}), report.get("utility", {}), report.get("privacy", {})
    per_site = ", ".join(f"{k}={v}" for k, v in sorted((pool.get("per_site") or {}).items()))
    return "\n".join([
        f"report: {path} (and {path.with_suffix('.md')})",
        f"  pool: {pool.get('n_images', 0)} images ({per_site or 'none'})",
        f"  phi_down on the sites' real test data: accuracy {_fmt(util.get('accuracy'))}, balanced "
        f"{_fmt(util.get('balanced_accuracy'))}, qwk {_fmt(util.get('qwk'))} (real-data reference: accuracy "
        f"{_fmt(util.get('real_accuracy'))})",
        f"  privacy: MIA AUC {_fmt(priv.get('mia_auc'))}, TPR@1%FPR {_fmt(priv.get('mia_tpr_at_1pct_fpr'))}, "
        f"DCR ratio {_fmt(priv.get('dcr_ratio'))}, too-close rate {_fmt(priv.get('too_close_rate'))}",
    ])


def _raise_interrupt(signum, frame) -> None:  # SIGTERM (systemd stop) -> the same clean path as Ctrl-C
    raise KeyboardInterrupt


def coordinate_command(config: str, app_dir: str | None = None) -> int:
    from plan_shared.runtime import setup_logging

    setup_logging()
    try:
        return Coordinator(config, Path(app_dir) if app_dir else None).run()
    except (CoordinateError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
