"""A reader is safe from the pool it pulls from (issue 12, "Readers trust the pool").

Two kinds of pool: the REAL pool service in its own process whose store was tampered
with on disk (an object truncated), and a malicious pool: a small real gRPC server in
this test implementing the Pool service over the federation's mutual TLS, which sends
path-traversal class names, bad sha256 strings, wrong, short, long or missing files.
Every case runs ``pool pull`` through its CLI and checks the exit status, the message
and that nothing was written outside ``--out`` (and nothing unverified under a final name).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from client.export import export
from plan_shared.credentials import load_server_credentials
from plan_shared.pool_proto import pool_pb2, pool_pb2_grpc
from server.pool.store import Store
from tests.pool_support import THRESHOLDS, PoolServer, make_site_dir, png_bytes, run_cli

pytestmark = pytest.mark.slow


def _entry(i: int, data: bytes, cls: str = "normal", sha: str | None = None, size: int | None = None,
           label: int = 0) -> pool_pb2.CatalogEntry:
    real = hashlib.sha256(data).hexdigest()
    iid = f"evil-{i:03d}"
    record = {"id": iid, "file": f"images/{cls}/{iid}.png", "sha256": sha or real, "label": label,
              "class_name": cls, "method": "plan", "path_id": 0, "position": i, "max_id_prob": 0.1,
              "indep_id_prob": 0.2, "dcr": 2.5, "thresholds": dict(THRESHOLDS)}
    return pool_pb2.CatalogEntry(
        bundle_id="b" * 64, site_id="site-a", sha256=sha or real, class_name=cls,
        size=len(data) if size is None else size, record_json=json.dumps(record),
        generator_sha256="c" * 64, config_sha256="d" * 64, generator_round=3, created="2025-01-01T00:00:00+00:00")


class EvilPool(pool_pb2_grpc.PoolServicer):
    """Serves ``entries`` and, for Fetch, ``blobs[sha]`` (or whatever ``serve`` returns for a sha)."""

    def __init__(self, entries: list, blobs: dict[str, bytes], serve=None):
        self.entries, self.blobs = entries, blobs
        self.serve = serve or (lambda sha: [(sha, self.blobs[sha], True)])
        self.fetched: list[str] = []

    def Catalog(self, request, context):
        yield pool_pb2.CatalogReply(entries=self.entries)

    def Fetch(self, request, context):
        for sha in request.sha256:
            self.fetched.append(sha)
            chunks = [pool_pb2.FetchChunk(sha256=s, offset=0, data=d, last=last) for s, d, last in self.serve(sha)]
            if chunks:
                yield pool_pb2.FetchReply(chunks=chunks)


class EvilServer:
    def __init__(self, certs: Path, servicer: EvilPool):
        creds = load_server_credentials(certs)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pool_pb2_grpc.add_PoolServicer_to_server(servicer, self.server)
        tls = grpc.ssl_server_credentials([(creds.key_pem, creds.cert_pem)], root_certificates=creds.ca_pem,
                                          require_client_auth=True)
        self.port = self.server.add_secure_port("127.0.0.1:0", tls)
        self.address = f"127.0.0.1:{self.port}"

    def __enter__(self) -> EvilServer:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(grace=None)


def snapshot(root: Path, out: Path) -> set[str]:
    """Every path below ``root`` that is not below ``out`` (symlinks not followed)."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if d == out or out in d.parents:
            continue
        for n in dirnames + filenames:
            if d / n == out:
                continue
            seen.add(str((d / n).relative_to(root)))
    return seen


def evil_pull(pki, tmp_path: Path, servicer: EvilPool, out: Path | None = None):
    out = out or tmp_path / "work" / "out"
    out.parent.mkdir(parents=True, exist_ok=True)
    before = snapshot(tmp_path, out)
    with EvilServer(pki.certs, servicer) as srv:
        r = run_cli("server.pool", "pull", "--pool", srv.address, "--credentials", str(pki.reader),
                    "--out", str(out), "--no-progress", "--retries", "0")
    print(r.stderr)
    return r, snapshot(tmp_path, out) - before, out


def final_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


@pytest.mark.parametrize("bad_class", ["../../x", "/ABS"])
def test_traversal_class_names_refused(pki, tmp_path, bad_class):
    rng = np.random.default_rng(1)
    data = [png_bytes(rng) for _ in range(3)]
    if bad_class == "/ABS":
        bad_class = str(tmp_path / "abs" / "x")  # an absolute path outside --out
    entries = [_entry(0, data[0]), _entry(1, data[1], cls=bad_class), _entry(2, data[2], cls="pneumonia", label=1)]
    blobs = {hashlib.sha256(d).hexdigest(): d for d in data}
    evil = EvilPool(entries, blobs)
    r, outside, out = evil_pull(pki, tmp_path, evil)
    assert outside == set(), outside
    assert r.returncode != 0, r.stdout
    assert "class_name" in r.stderr and repr(bad_class) in r.stderr, r.stderr
    assert outside == set(), outside
    assert final_files(out) == [] and evil.fetched == []  # refused before anything was fetched


@pytest.mark.parametrize("bad_sha", ["../../evil", "A" * 64, "abc", "0" * 63 + "/"])
def test_bad_sha_strings_refused(pki, tmp_path, bad_sha):
    rng = np.random.default_rng(2)
    good, bad = png_bytes(rng), png_bytes(rng)
    entries = [_entry(0, good), _entry(1, bad, sha=bad_sha)]
    blobs = {hashlib.sha256(good).hexdigest(): good, bad_sha: bad}
    evil = EvilPool(entries, blobs)
    r, outside, out = evil_pull(pki, tmp_path, evil)
    assert outside == set(), outside
    assert r.returncode != 0, r.stdout
    assert "sha256" in r.stderr and repr(bad_sha) in r.stderr, r.stderr
    assert outside == set(), outside
    assert final_files(out) == [] and evil.fetched == []


def test_symlink_inside_out_is_not_followed(pki, tmp_path):
    rng = np.random.default_rng(3)
    data = [png_bytes(rng) for _ in range(2)]
    entries = [_entry(0, data[0]), _entry(1, data[1], cls="pneumonia", label=1)]
    evil = EvilPool(entries, {hashlib.sha256(d).hexdigest(): d for d in data})
    out = tmp_path / "work" / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir(parents=True)
    (out / "normal").symlink_to(elsewhere, target_is_directory=True)
    r, outside, _ = evil_pull(pki, tmp_path, evil, out)
    assert r.returncode != 0, r.stdout
    assert "symlink" in r.stderr and str(out / "normal") in r.stderr, r.stderr
    assert list(elsewhere.iterdir()) == [] and outside == set()


@pytest.mark.parametrize("how", ["wrong-content", "truncated", "too-long", "omitted", "other-file"])
def test_every_image_arrives_complete_and_verified(pki, tmp_path, how):
    rng = np.random.default_rng(4)
    data = [png_bytes(rng) for _ in range(3)]
    shas = [hashlib.sha256(d).hexdigest() for d in data]
    victim = shas[2]  # the last file of the stream: an early end of stream is not noticed by accident
    stranger = png_bytes(rng)

    def serve(sha):
        d = data[shas.index(sha)]
        if sha != victim:
            return [(sha, d, True)]
        if how == "wrong-content":
            return [(sha, bytes(len(d)), True)]
        if how == "truncated":
            return [(sha, d[: len(d) // 2], True)]
        if how == "too-long":
            return [(sha, d + b"\0" * 4096, True)]
        if how == "omitted":
            return []
        return [(hashlib.sha256(stranger).hexdigest(), stranger, True)]

    entries = [_entry(0, data[0]), _entry(1, data[1], cls="pneumonia", label=1), _entry(2, data[2])]
    evil = EvilPool(entries, {}, serve)
    r, outside, out = evil_pull(pki, tmp_path, evil)
    assert outside == set(), outside
    assert r.returncode != 0, r.stdout
    assert victim[:12] in r.stderr, r.stderr
    assert outside == set(), outside
    files = final_files(out)
    assert f"normal/{victim}.png" not in files  # never an unverified file under its final name
    for f in files:
        assert hashlib.sha256((out / f).read_bytes()).hexdigest() == Path(f).stem
    assert not (out / "manifest.json").exists()  # no manifest claims what is not there


def test_truncated_object_on_the_real_pools_disk(pki, tmp_path):
    site = tmp_path / "a"
    make_site_dir(site, "site-a", 6, seed=5)
    out = tmp_path / "out"
    with PoolServer(tmp_path / "store", pki.certs, tmp_path) as srv:
        export(site, srv.address, pki.site("site-a"), progress=False)
        st = Store(tmp_path / "store", create=False, readonly=True)
        try:
            victim = st.catalog()[-1]["sha256"]  # the last file of the stream
            obj = st.object_path(victim)
        finally:
            st.close()
        with open(obj, "r+b") as fh:
            fh.truncate(obj.stat().st_size // 2)
        r = run_cli("server.pool", "pull", "--pool", srv.address, "--credentials", str(pki.reader),
                    "--out", str(out), "--no-progress", "--retries", "0")
    print(r.stderr)
    assert r.returncode != 0, r.stdout
    assert victim[:12] in r.stderr and "missing" in r.stderr, r.stderr
    files = final_files(out)
    assert len([f for f in files if f.endswith(".png")]) == 5 and not any(victim in f for f in files)
    assert not (out / "manifest.json").exists()


def test_honest_evil_pool_baseline_and_shared_content(pki, tmp_path):
    """The in-test server is a faithful Pool when it behaves: the same file named under two classes lands,
    verified, in both folders, and the manifest lists both entries."""
    rng = np.random.default_rng(6)
    data = png_bytes(rng)
    entries = [_entry(0, data), _entry(1, data, cls="pneumonia", label=1)]
    evil = EvilPool(entries, {hashlib.sha256(data).hexdigest(): data})
    r, outside, out = evil_pull(pki, tmp_path, evil)
    assert r.returncode == 0, r.stderr
    sha = hashlib.sha256(data).hexdigest()
    assert final_files(out) == ["DATASHEET.md", "manifest.json", f"normal/{sha}.png", f"pneumonia/{sha}.png"]
    assert (out / "pneumonia" / f"{sha}.png").read_bytes() == data and evil.fetched == [sha]
    assert outside == set()
