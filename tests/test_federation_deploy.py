"""Deployment with real processes on loopback: SuperLink (TLS + node auth), SuperNodes.

* deploy/smoke.sh end to end (nginx proxy, 3 sites, 2 rounds, control API refused, then the
  post-training phases: pool service started by coordinate, synthesis + export at every
  site, pull, phi_down, evaluation, report; pool store checked);
* a SuperNode whose key is not registered is refused;
* a hospital killed mid-run does not stop the run (min_nodes < N), and a coordinator
  killed and restarted resumes after the last completed round.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_federation_util import flower_env, free_port, listening, make_npz, tiny_config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _env(home: Path) -> dict[str, str]:
    env = flower_env(home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


class Procs:
    """Processes started by a test, each in its own session; all killed at teardown."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, argv, log: Path, env=None, cwd=None) -> subprocess.Popen:
        fh = open(log, "ab")
        p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        self.procs.append(p)
        return p

    @staticmethod
    def kill(p: subprocess.Popen, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                self.kill(p, signal.SIGTERM)
            try:  # children left in the session (SuperLink, SuperExec, ClientApps)
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def procs():
    ps = Procs()
    yield ps
    ps.close()


def _wait(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(1)
    tail = log.read_text()[-3000:] if log is not None and log.is_file() else ""
    raise AssertionError(f"timed out / exited waiting for {what}\n{tail}")


def _certs(tmp: Path, sites: list[str]) -> Path:
    from server.certs import init_ca, issue

    certs = tmp / "certs"
    init_ca(certs)
    for s in sites:
        issue(certs, s, "site", tmp / "keys" / s)  # each hospital's own folder, outside the CA folder
    return certs


def _coordinator_yaml(tmp: Path, certs: Path, port: int, **fed) -> Path:
    raw = tiny_config(**fed)
    raw["coordinator"] = {"state_dir": str(tmp / "coord"), "ca_dir": str(certs), "superlink_port": port}
    p = tmp / "coordinator.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _site_yaml(tmp: Path, certs: Path, name: str, superlink: str, port: int, n_train: int) -> Path:
    npz = make_npz(tmp / f"{name}.npz", n_train=n_train, seed=port)
    raw = {"site_id": name, "device": "cpu", "threads": 1, "data": {"source": "medmnist", "path": str(npz)},
           "site": {"superlink_address": superlink, "keys_dir": str(tmp / "keys" / name),
                    "state_dir": str(tmp / name), "supernode_port": port}}
    p = tmp / f"site-{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _metrics(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.is_file() else []


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed (apt-get install -y nginx-light)")
def test_deploy_smoke_script(tmp_path):
    env = _env(tmp_path / "flwr")
    env.update(SMOKE_SL_PORT=str(free_port()), SMOKE_PROXY_PORT=str(free_port()), SMOKE_SN_PORT=str(free_port()),
               SMOKE_POOL_PORT=str(free_port()), SMOKE_DIR=str(tmp_path / "smoke"), SMOKE_TIMEOUT="900")
    r = subprocess.run(["bash", str(ROOT / "deploy" / "smoke.sh")], env=env, capture_output=True, text=True, timeout=1100)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "control API refused" in r.stdout and "[smoke] checkpoints" in r.stdout
    assert "[smoke] post-training: report.json" in r.stdout and "pool check clean" in r.stdout, r.stdout[-3000:]


def test_unregistered_supernode_is_refused(tmp_path, procs):
    from server.certs import make_node_key
    from server.coordinate import Coordinator

    certs = _certs(tmp_path, ["hospital-a"])
    port = free_port()
    coord = Coordinator(_coordinator_yaml(tmp_path, certs, port))
    try:
        coord.start_superlink()
        coord.register_sites()
        priv, _ = make_node_key()
        key = tmp_path / "rogue_key"
        key.write_bytes(priv)
        key.chmod(0o600)
        log = tmp_path / "rogue.log"
        p = procs.start([str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--root-certificates",
                         str(certs / "ca.crt"), "--auth-supernode-private-key", str(key), "--port", str(free_port())],
                        log, env=_env(tmp_path / "rogue-home"))
        rc = p.wait(90)
        assert rc != 0, log.read_text()[-2000:]
        nodes = coord.flwr("supernode", "ls")["nodes"]
        assert all(n["status"] != "online" for n in nodes)
    finally:
        coord.stop_superlink()


def test_dropout_and_coordinator_restart(tmp_path, procs):
    sites = ["hospital-a", "hospital-b", "hospital-c"]
    certs = _certs(tmp_path, sites)
    port = free_port()
    # straggler_min_wait_s 10 (default 30): the dead site's round closes 2x the two live sites' time after
    # they replied (but at least 10 s) instead of at least 30 s; what it checks is the same.
    cfg_path = _coordinator_yaml(tmp_path, certs, port, rounds=3, min_nodes=2, round_timeout_s=240,
                                 wait_for_nodes_s=120, straggler_min_wait_s=10)
    run = tmp_path / "coord" / "run"
    clog = tmp_path / "coordinator.log"
    coordinate = [str(BIN / "plan-server"), "coordinate", "--config", str(cfg_path)]
    coord = procs.start(coordinate, clog, env=_env(tmp_path / "h"))
    _wait(lambda: "submitted" in clog.read_text(), 120, "run submission", coord, clog)

    site_procs = {}
    for i, s in enumerate(sites):
        y = _site_yaml(tmp_path, certs, s, f"127.0.0.1:{port}", free_port(), n_train=12 + 4 * i)
        site_procs[s] = procs.start([str(BIN / "plan-client"), "start", "--config", str(y)], tmp_path / f"{s}.log",
                                    env=_env(tmp_path / "h"))

    # Round 1 with everyone, then hospital-c dies (SIGKILL, its whole process group).
    _wait(lambda: len(_metrics(run)) >= 1, 300, "round 1", coord, clog)
    assert _metrics(run)[0]["sites_replied"] == 3
    Procs.kill(site_procs["hospital-c"])

    _wait(lambda: len(_metrics(run)) >= 2, 360, "round 2 without hospital-c", coord, clog)
    r2 = _metrics(run)[1]
    assert r2["sites_replied"] == 2, r2
    assert sorted(s["site"] for s in r2["sites"]) == ["hospital-a", "hospital-b"]
    assert r2["missing"] and r2["missing"][0]["site"] == "hospital-c", r2["missing"]
    # The round did not sit out round_timeout_s (240 s) for the dead site: the straggler grace
    # (or Flower's heartbeat-based "Node Unavailable" reply) closed it.
    assert r2["ended"] in ("grace", "all") and r2["collect_s"] < 200, r2
    assert "straggler grace" in r2["missing"][0]["reason"] or "Node Unavailable" in r2["missing"][0]["reason"], r2
    applog = run / "serverapp.log"  # the ServerApp's own log, kept by coordinate through `flwr log --stream`
    _wait(lambda: applog.is_file() and "did not contribute" in applog.read_text(), 60, "the ServerApp log", coord, clog)

    # The coordinator machine dies: coordinator, SuperLink (own process group) and ServerApp
    # killed at once, as systemd's KillMode=control-group or a power cut would. Restarted, it resumes.
    from server.coordinate import descendants, kill_tree

    sl_pid = int((tmp_path / "coord" / "superlink.pid").read_text())
    tree = descendants(sl_pid)
    Procs.kill(coord)
    kill_tree(sl_pid, tree)
    _wait(lambda: not listening(port), 30, "SuperLink port to close")
    done_before = len(_metrics(run))
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())["round"]
    assert latest == done_before
    clog2 = tmp_path / "coordinator2.log"
    coord2 = procs.start(coordinate, clog2, env=_env(tmp_path / "h"))
    rc = coord2.wait(420)
    out = clog2.read_text()
    assert rc == 0, out[-4000:]
    recs = _metrics(run)
    assert [r["round"] for r in recs] == [1, 2, 3], [r["round"] for r in recs]
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["round"] == 3
    assert "completed: 3/3 rounds" in out
    # Resumed with the two sites of round 2, without sitting out wait_for_nodes_s for hospital-c.
    text = applog.read_text()
    assert "resuming from round-0002.pt" in text and "waiting for the 2 site(s) of round 2" in text, text[-3000:]
    assert "only 2 of 3 expected sites connected" not in text, text[-3000:]


def test_coordinator_fails_clearly_when_sites_do_not_come(tmp_path, procs):
    certs = _certs(tmp_path, ["hospital-a", "hospital-b"])
    cfg_path = _coordinator_yaml(tmp_path, certs, free_port(), wait_for_nodes_s=3, min_nodes=2)
    log = tmp_path / "coordinator.log"
    p = procs.start([str(BIN / "plan-server"), "coordinate", "--config", str(cfg_path)], log, env=_env(tmp_path / "h"))
    rc = p.wait(240)
    out = log.read_text()
    assert rc == 1, out[-3000:]
    assert "finished:failed" in out and "only 0 site(s) connected" in out and "min_nodes" in out, out[-3000:]
