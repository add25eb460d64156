"""Pool service CPU seconds per push and per pull of 2000-image bundles, read from /proc.

    python benchmarks/pool_server_cpu.py

CPU time of the server process is far less sensitive to a loaded machine than the wall
times of benchmarks/pool.py: use it to compare two versions of the service. Four bundles
of one site are pushed one after the other (Offer + Push, real mutual TLS) and after each
the whole pool is pulled into a new folder (so the pull figure grows with the pool).
It imports the checkout it lives in: to compare versions, run a copy inside each.
"""
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from client.export import export
from server.pool.client import pull
from tests.pool_support import Pki, PoolServer, make_site_dir


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

root = Path(tempfile.mkdtemp(dir="/dev/shm"))
try:
    pki = Pki(root / "pki")
    dirs = []
    for k in range(4):
        d = root / f"s{k}"
        make_site_dir(d, "site-a", 2000, seed=k, size=32)
        dirs.append(d)
    with PoolServer(root / "store", pki.certs, root) as srv:
        pid = srv.proc.pid
        time.sleep(1)
        push_cpu, pull_cpu = [], []
        for k, d in enumerate(dirs):
            c0 = cpu(pid)
            export(d, srv.address, pki.site("site-a"), progress=False)
            push_cpu.append(cpu(pid) - c0)
            c0 = cpu(pid)
            pull(srv.address, pki.reader, root / f"p{k}", site=None, progress=False)
            pull_cpu.append(cpu(pid) - c0)
    print("server CPU s per push:", " ".join(f"{x:.2f}" for x in push_cpu),
          " per pull (growing pool):", " ".join(f"{x:.2f}" for x in pull_cpu))
finally:
    shutil.rmtree(root, ignore_errors=True)
