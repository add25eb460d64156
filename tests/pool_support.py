"""Helpers for the pool tests: synthetic site output dirs, a real server process, a cutting proxy."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from server.pool.process import PoolProcess

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = {"tau_id": 0.5, "tau_indep": 0.5, "delta": 1.0}


def png_bytes(rng: np.random.Generator, size: int = 28) -> bytes:
    arr = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def make_site_dir(
    outdir: Path,
    site_id: str,
    n: int,
    seed: int = 0,
    size: int = 28,
    classes: tuple[str, ...] = ("normal", "pneumonia"),
    reuse: dict[int, bytes] | None = None,
) -> dict:
    """Write images/<class>/<id>.png, manifest.json and report.json; return the manifest dict.

    ``reuse`` maps an image index to fixed PNG bytes (to share identical images across bundles).
    """
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        cls = classes[i % len(classes)]
        iid = f"{site_id}-{seed}-{i:05d}"
        data = (reuse or {}).get(i) or png_bytes(rng, size)
        p = outdir / "images" / cls / f"{iid}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        records.append({
            "id": iid, "file": f"images/{cls}/{iid}.png", "sha256": hashlib.sha256(data).hexdigest(),
            "label": i % len(classes), "class_name": cls, "method": ("plan", "linear", "random")[i % 3],
            "path_id": i // 10, "position": i % 10,
            "max_id_prob": 0.1, "indep_id_prob": 0.2, "dcr": 2.5, "thresholds": dict(THRESHOLDS),
        })
    manifest = {
        "site_id": site_id, "generator_sha256": hashlib.sha256(b"G" + site_id.encode()).hexdigest(),
        "config_sha256": hashlib.sha256(b"cfg").hexdigest(), "created": f"2025-01-01T00:00:{seed % 60:02d}+00:00",
        "images": records,
    }
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (outdir / "report.json").write_text(json.dumps({"n_candidates": n * 2, "n_accepted": n}))
    return manifest


def rewrite_manifest(outdir: Path, fn) -> None:
    m = json.loads((outdir / "manifest.json").read_text())
    fn(m)
    (outdir / "manifest.json").write_text(json.dumps(m, indent=1))


class PoolServer(PoolProcess):
    """``python -m server.pool serve`` in a subprocess on a port the server binds (port 0), 8 workers."""

    def __init__(self, store: Path, certs: Path, workdir: Path, env: dict | None = None, extra: tuple = ()):
        super().__init__(store, certs, workdir, extra=("--workers", "8", *extra), env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CuttingProxy:
    """TCP proxy on a free port; the first connection is cut after ``cut_after`` client->server bytes.

    At the cut it forwards the bytes up to the limit, holds the connection for ``hold``
    seconds (so the server has processed all it received), then resets both sides.
    """

    def __init__(self, target_port: int, cut_after: int, hold: float = 1.0):
        self.target_port, self.cut_after, self.hold = target_port, cut_after, hold
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.cuts = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            limit = self.cut_after if self.cuts == 0 else None
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, limit), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        n = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and n + len(data) > limit:
                    dst.sendall(data[: max(0, limit - n)])
                    time.sleep(self.hold)
                    self.cuts += 1
                    # Cut both directions (shutdown also wakes the other pipe thread's recv).
                    for s in (src, dst):
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        s.close()
                    return
                n += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()


class Pki:
    """One federation (CA, server, sites a/b/c, a site to revoke, reader alice) and a foreign CA.

    Every identity made its own keys in its own folder under ``keys/`` (``keys init``,
    ``certs enroll``, ``keys install``, all on this machine); ``certs/`` holds the
    CA, the server key and the public registry only.
    """

    SITES = ("site-a", "site-b", "site-c", "site-r")

    def __init__(self, root: Path):
        from server.certs import init_ca, issue

        self.root = root
        self.certs = root / "certs"
        self.keys = root / "keys"
        init_ca(self.certs)
        for s in self.SITES:
            issue(self.certs, s, "site", self.site(s))
        issue(self.certs, "alice", "reader", self.reader)
        self.other = root / "other"
        init_ca(self.other)
        issue(self.other, "site-a", "site", self.foreign_site_a)

    def site(self, name: str) -> Path:
        return self.keys / "sites" / name

    @property
    def reader(self) -> Path:
        return self.keys / "readers" / "alice"

    @property
    def foreign_site_a(self) -> Path:
        return self.root / "other-keys" / "sites" / "site-a"


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m <module> ...`` from the repository root and capture output."""
    e = dict(os.environ, **(env or {}))
    e.setdefault("PYTHONPATH", str(ROOT))
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=timeout)
