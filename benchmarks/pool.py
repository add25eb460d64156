"""Pool throughput on loopback: push and pull of one bundle vs copying the same files locally.

    python benchmarks/pool.py [--images 5000] [--size 32] [--repeat 3] [--dir /dev/shm]

Generates a site output dir of N noise PNGs (size x size, grey), makes a throw-away
federation (CA, one site, one reader), starts ``python -m server.pool serve`` on a
free loopback port, and measures:

* sign:  building the signed bundle (hash every file, Ed25519 signature)
* push:  Offer + Push of the whole bundle (mutual TLS, server verifies every sha256,
         fsyncs every file, one SQLite transaction)
* pull:  Catalog + Fetch into an empty folder (client verifies every sha256)
* copy:  shutil.copyfile of the same files into a new tree (the local baseline), and
         the same with an fsync per file (what the store does for durability)

and prints MB/s, images/s and the ratio to the local copy.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.export import prepare, push  # noqa: E402
from server.certs import init_ca, issue  # noqa: E402
from server.pool.client import pull  # noqa: E402


def make_site(out: Path, n: int, size: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    records, total = [], 0
    for i in range(n):
        cls = ("normal", "pneumonia")[i % 2]
        iid = f"img{i:05d}"
        # Smooth-ish noise: compresses like a small grey medical thumbnail would.
        arr = (rng.normal(128, 40, size=(size, size)).clip(0, 255)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, mode="L").save(buf, format="PNG")
        data = buf.getvalue()
        total += len(data)
        p = out / "images" / cls / f"{iid}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        records.append({
            "id": iid, "file": f"images/{cls}/{iid}.png", "sha256": hashlib.sha256(data).hexdigest(),
            "label": i % 2, "class_name": cls, "method": "plan", "path_id": i // 10, "position": i % 10,
            "max_id_prob": 0.1, "indep_id_prob": 0.1, "dcr": 2.0,
            "thresholds": {"tau_id": 0.5, "tau_indep": 0.5, "delta": 1.0},
        })
    (out / "manifest.json").write_text(json.dumps({
        "site_id": "bench-site", "generator_sha256": "0" * 64, "config_sha256": "1" * 64,
        "created": "2025-01-01T00:00:00+00:00", "images": records}))
    (out / "report.json").write_text(json.dumps({"n_candidates": n, "n_accepted": n}))
    return total


def copy_tree(src: Path, dst: Path, fsync: bool) -> None:
    for p in sorted((src / "images").rglob("*.png")):
        t = dst / p.relative_to(src)
        t.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, t)
        if fsync:
            fd = os.open(t, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def start_server(store: Path, certs: Path, work: Path) -> tuple[subprocess.Popen, str]:
    port_file = work / "port"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.pool", "serve", "--store", str(store), "--certs", str(certs),
         "--address", "127.0.0.1:0", "--port-file", str(port_file)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "wb"))
    t0 = time.monotonic()
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() - t0 > 30:
            raise SystemExit(f"server failed to start:\n{(work / 'server.log').read_text()}")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{int(port_file.read_text())}"


def line(name: str, seconds: float, n: int, nbytes: int, base: float | None) -> str:
    ratio = f"{seconds / base:6.2f}x copy time" if base else ""
    return (f"{name:22s} {seconds:8.3f} s  {nbytes / 1e6 / seconds:8.2f} MB/s  {n / seconds:9.0f} images/s  {ratio}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="Repeat every measurement on fresh folders; report the best.")
    ap.add_argument("--dir", default=None, help="Where the site, the store and the copies live (default: system temp).")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="plan-pool-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        site = work / "site"
        nbytes = make_site(site, args.images, args.size)
        certs = work / "certs"
        init_ca(certs)
        issue(certs, "bench-site", "site", work / "keys" / "bench-site")
        issue(certs, "bench-reader", "reader", work / "keys" / "bench-reader")
        n = args.images
        print(f"bundle: {n} PNGs of {args.size}x{args.size}, {nbytes / 1e6:.2f} MB "
              f"(mean {nbytes / n:.0f} B/image), loopback, {os.cpu_count()} CPUs, in {work.parent}, "
              f"best of {args.repeat}")

        best: dict[str, float] = {}

        def keep(k: str, v: float) -> None:
            best[k] = min(best.get(k, float("inf")), v)

        for r in range(args.repeat):
            for k, fs in (("copy", False), ("copy_fsync", True)):
                dst = work / f"{k}-{r}"
                t0 = time.perf_counter()
                copy_tree(site, dst, fs)
                keep(k, time.perf_counter() - t0)
            t0 = time.perf_counter()
            creds, signed = prepare(site, work / "keys" / "bench-site")
            keep("sign", time.perf_counter() - t0)
            proc, addr = start_server(work / f"store-{r}", certs, work / "")
            try:
                t0 = time.perf_counter()
                res = push(signed, addr, creds, retries=0, progress=False)
                keep("push", time.perf_counter() - t0)
                assert not res.duplicate and res.n_images == n
                t0 = time.perf_counter()
                got = pull(addr, work / "keys" / "bench-reader", work / f"pulled-{r}", progress=False)
                keep("pull", time.perf_counter() - t0)
                assert got.n_fetched == n
                t0 = time.perf_counter()
                again = pull(addr, work / "keys" / "bench-reader", work / f"pulled-{r}", progress=False)
                keep("pull_again", time.perf_counter() - t0)
                assert again.n_fetched == 0
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            (work / "port").unlink(missing_ok=True)

        base = best["copy"]
        print(line("local copy", base, n, nbytes, None))
        print(line("local copy + fsync", best["copy_fsync"], n, nbytes, base))
        print(line("sign bundle", best["sign"], n, nbytes, base))
        print(line("push (TLS, verify)", best["push"], n, nbytes, base))
        print(line("pull (TLS, verify)", best["pull"], n, nbytes, base))
        print(f"{'pull again (no-op)':22s} {best['pull_again']:8.3f} s")
        print(f"ratios: push/copy {best['push'] / base:.1f}, pull/copy {best['pull'] / base:.1f}, "
              f"push/(copy+fsync) {best['push'] / best['copy_fsync']:.2f}")


if __name__ == "__main__":
    main()
