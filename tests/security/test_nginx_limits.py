"""The Fleet proxy (deploy/nginx-plan.conf) refuses a request body larger than any real Flower
request (issue 12, deliverable 9): it never reaches the SuperLink, which reads whole bodies
before authenticating the node. A real nginx with the shipped server block."""

from __future__ import annotations

import http.client
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.pool_support import ROOT, free_port

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed (apt-get install -y nginx-light)")


@pytest.fixture
def proxy(tmp_path):
    from server.certs import init_ca

    certs = tmp_path / "certs"
    init_ca(certs)
    port, upstream = free_port(), free_port()  # nothing listens upstream: a forwarded request gets 502
    d = tmp_path / "nginx"
    (d / "tmp").mkdir(parents=True)
    conf = (ROOT / "deploy" / "nginx-plan.conf").read_text()
    conf = conf.replace("__LISTEN__", f"127.0.0.1:{port}").replace("__CERTS__", str(certs)).replace(
        "__UPSTREAM__", f"127.0.0.1:{upstream}")
    (d / "plan.conf").write_text(conf)
    (d / "nginx.conf").write_text(
        f"worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 64; }}\n"
        f"http {{\n  access_log {d}/access.log;\n" + "".join(
            f"  {k}_temp_path {d}/tmp/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        + f"  include {d}/plan.conf;\n}}\n")
    subprocess.run(["nginx", "-p", str(d), "-c", str(d / "nginx.conf")], check=True, capture_output=True)
    try:
        deadline = time.monotonic() + 10
        while not (d / "nginx.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield port, certs
    finally:
        subprocess.run(["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-s", "stop"], capture_output=True)


def _post(port: int, certs: Path, n: int) -> int:
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=30)
    try:
        conn.request("POST", "/v1/fleet/push-object", body=b"\0" * n,
                     headers={"Content-Type": "application/protobuf", "Content-Length": str(n)})
        return conn.getresponse().status
    except (BrokenPipeError, ConnectionResetError):  # nginx may answer 413 and close before the body is sent
        return 413
    finally:
        conn.close()


def test_oversized_fleet_body_refused_real_sized_forwarded(proxy):
    port, certs = proxy
    assert _post(port, certs, 9 * 2**20) == 413              # larger than any Flower request
    assert _post(port, certs, 5 * 2**20 + 4096) == 502       # a full 5 MiB array chunk: forwarded
