"""Files written whole or not at all, and their sha256: the one implementation of each.

:func:`atomic_write` writes a temporary file next to the target (unique name, so two writers
never share it), optionally fsyncs it, sets its mode and renames it over the target: a reader
sees the old file or the new one, never half of one, and a failed write leaves the old file
and no temporary behind::

    atomic_write("report.json", json.dumps(doc))                      # text
    atomic_write("node.key", key_bytes, mode=0o600)                   # private from the first byte
    atomic_write("model.pt", lambda fh: torch.save(state, fh))        # any writer of a binary file
    digest, size = sha256_file("model.pt")
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

Content = bytes | str | Callable[[BinaryIO], object]

_CHUNK = 1 << 20


def atomic_write(path: str | Path, content: Content, *, mode: int = 0o644, fsync: bool = True,
                 encoding: str = "utf-8") -> Path:
    """Replace ``path`` by ``content`` atomically; returns the path.

    ``content``: bytes, text (encoded with ``encoding``), or a function that writes to the
    open binary file. The temporary file is created with mode 0600 and gets ``mode`` before
    the rename; ``fsync=False`` skips the flush to disk (bulk copies that can be verified
    again later). The parent folder is created when missing.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(content, bytes):
                fh.write(content)
            elif isinstance(content, str):
                fh.write(content.encode(encoding))
            else:
                content(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (:func:`sha256_file` without the size)."""
    return sha256_file(path)[0]
