"""client/clientapp_forkserver.py as a real process, driven through the launcher `plan-client start` writes.

The launcher (what the SuperExec finds as ``flwr-clientapp`` on PATH) has the server fork a
child that runs Flower's own flwr-clientapp main with the launcher's arguments (here
``--help``, whose usage text lands in the server's output); a wrong secret is refused
before anything is read and the server keeps serving; a server that is gone makes the
launcher run Flower's command itself; a request that is not a list of options is refused.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from multiprocessing.connection import Client
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from client.clientapp_forkserver import check_request, write_launcher
from client.site_worker import make_key

ROOT = Path(__file__).resolve().parent.parent


def _wait_for(pred, timeout_s: float = 60.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if pred():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real fork server on an AF_UNIX socket; (socket, key file, pid, log)."""
    tmp = Path(tmp_path_factory.mktemp("fs"))
    key = tmp / "clientapp.key"
    make_key(key)
    sock, ready, log_path = tmp / "s.sock", tmp / "ready", tmp / "server.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    with open(log_path, "wb") as log:
        p = subprocess.Popen([sys.executable, "-m", "client.clientapp_forkserver", "--socket", str(sock), "--key-file",
                              str(key), "--ready-file", str(ready)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert _wait_for(lambda: ready.is_file() or p.poll() is not None, 120) and p.poll() is None, \
                log_path.read_text()[-2000:]
            yield sock, key, p.pid, log_path
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(20)


def test_socket_and_launcher_are_private(tmp_path, server):
    sock, key, _, _ = server
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and stat.S_ISSOCK(sock.stat().st_mode)
    launcher = write_launcher(tmp_path / "bin" / "flwr-clientapp", sock, key, "/bin/echo")
    assert stat.S_IMODE(launcher.stat().st_mode) == 0o700
    assert launcher.read_text().splitlines()[0] == f"#!{sys.executable} -IS"


def test_launcher_has_flowers_clientapp_main_forked(tmp_path, server):
    sock, key, pid, log = server
    launcher = write_launcher(tmp_path / "bin" / "flwr-clientapp", sock, key, "/bin/false")
    r = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # Flower's own usage text, printed by the forked child into the server's output
    assert _wait_for(lambda: "Run a Flower ClientApp" in log.read_text(), 30), log.read_text()[-2000:]
    started = [int(line.rsplit(" ", 1)[1]) for line in log.read_text().splitlines() if "started as pid" in line]
    assert started and started[-1] != pid


def test_wrong_secret_is_refused_and_the_server_keeps_serving(tmp_path, server):
    sock, key, _, log = server
    with pytest.raises(Exception):  # noqa: B017 - AuthenticationError or a closed connection
        with Client(str(sock), family="AF_UNIX", authkey=b"0" * 64) as c:
            c.send(["--help"])
            c.recv()
    with Client(str(sock), family="AF_UNIX", authkey=key.read_bytes().strip()) as c:
        c.send(["not-an-option"])
        status, detail = c.recv()
    assert status == "error" and "must start with an option" in detail
    with Client(str(sock), family="AF_UNIX", authkey=key.read_bytes().strip()) as c:
        c.send(["--help"])
        assert c.recv()[0] == "ok"


def test_launcher_without_server_runs_flowers_command(tmp_path):
    key = tmp_path / "k"
    make_key(key)
    launcher = write_launcher(tmp_path / "bin" / "flwr-clientapp", tmp_path / "gone.sock", key, "/bin/echo")
    r = subprocess.run([str(launcher), "--token", "t1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "--token t1"
    assert "not reachable" in r.stderr and "/bin/echo" in r.stderr


def test_request_check():
    assert check_request(["--token", "x"]) == ["--token", "x"]
    assert check_request([]) == []
    for bad in ("--token x", ["--token", 3], ["x"], None):
        with pytest.raises(ValueError):
            check_request(bad)
