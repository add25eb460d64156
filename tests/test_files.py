"""plan_shared/files.py: atomic writes (whole or not at all) and file hashes."""

from __future__ import annotations

import hashlib
import os
import stat
import threading

import pytest

from plan_shared.files import atomic_write, file_sha256, sha256_bytes, sha256_file


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_bytes_text_and_writer_content(tmp_path):
    p = atomic_write(tmp_path / "sub" / "a.bin", b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01" and _mode(p) == 0o644
    atomic_write(p, "héllo", fsync=False)
    assert p.read_bytes() == "héllo".encode()
    atomic_write(p, lambda fh: fh.write(b"x" * 10))
    assert p.read_bytes() == b"x" * 10
    key = atomic_write(tmp_path / "k.key", b"secret", mode=0o600)
    assert _mode(key) == 0o600
    assert sorted(q.name for q in tmp_path.rglob("*")) == ["a.bin", "k.key", "sub"]  # no temporary left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = atomic_write(tmp_path / "report.json", '{"old": 1}')

    def broken(fh):
        fh.write(b'{"new": ')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(p, broken)
    assert p.read_text() == '{"old": 1}'
    assert [q.name for q in tmp_path.iterdir()] == ["report.json"]


def test_concurrent_writers_never_leave_a_mixed_file(tmp_path):
    p = tmp_path / "state.bin"
    blobs = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=atomic_write, args=(p, b), kwargs={"fsync": False}) for b in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.read_bytes() in blobs  # one writer's whole content (a shared ".tmp" name could mix them)
    assert [q.name for q in tmp_path.iterdir()] == ["state.bin"]


def test_hashes_agree_with_hashlib(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    p = tmp_path / "blob"
    p.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert sha256_file(p) == (want, len(data))
    assert file_sha256(p) == want == sha256_bytes(data)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == (hashlib.sha256(b"").hexdigest(), 0)
