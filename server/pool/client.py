"""Reader side of the pool: list bundles and pull the pooled data set.

``pull`` writes ``OUT/<class>/<sha256>.png``, ``OUT/manifest.json`` and ``OUT/DATASHEET.md``
(with ``fmt="npz"`` also ``OUT/pool.npz``, the MedMNIST format: :func:`write_npz`); files
already present (right name and size) are not fetched again, so a second pull into the same
folder fetches only what is new, and an interrupted pull resumes.

The pool is not trusted:

- every catalog entry is validated before any path is built from it (sha256: 64 lower-case
  hex digits; class and site names: ``plan_shared.manifest.is_safe_name``; the privacy
  record: ``ImageRecord.from_dict``, matching the entry); one bad entry refuses the pull
  before anything is written;
- files are written only under ``OUT`` (resolved); an existing symlink on the way is refused;
- each file is received into ``OUT/.partial/`` and gets its final name only after its size
  and sha256 match the catalog (nothing unverified ever carries a final name);
- every requested file must arrive complete and verified: otherwise the pull fails naming
  what is missing (verified files stay for the next pull) and writes no manifest.

``OUT/manifest.json``::

    {"format": "plan-pool-pull/1", "pool": "host:port", "pulled": "<ISO time>",
     "n_images": N, "n_files": F,
     "classes": [{"label": 0, "name": "normal", "n_images": n}, ...],
     "bundles": [{"bundle_id", "site_id", "created", "generator_sha256", "config_sha256",
                  "generator_round", "n_images"}],
     "images": [{"file": "<class>/<sha256>.png", "sha256", "class_name", "label", "method",
                 "site_id", "bundle_id", "generator_sha256", "config_sha256",
                 "generator_round", "record": {<privacy record, plan_shared.manifest format>}}]}

One entry per (bundle, image): identical content pushed twice appears twice in
``images`` with its two provenances, and once on disk. ``plan_shared.pool_dataset``
reads such a folder back (``PooledDataset``) and writes its datasheet.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from plan_shared.credentials import ClientCredentials, load_client_credentials
from plan_shared.files import atomic_write, sha256_file
from plan_shared.manifest import ImageRecord, ManifestError, is_hex64, is_safe_name
from plan_shared.pool_proto import pool_pb2, pool_pb2_grpc
from plan_shared.pool_transport import PoolTransportError, RetryPolicy, call_with_retries, open_channel

FETCH_BATCH = 1000
_DEFAULT = RetryPolicy.default()  # pool.retries / pool.backoff_s of plan_shared/config.py


class PoolClientError(PoolTransportError):
    """The pool refused a call or could not be reached; the message is for the user."""


def _reader(credentials: Path) -> ClientCredentials:
    creds = load_client_credentials(credentials)
    if creds.role != "reader":
        raise PoolClientError(f"{credentials}: these are {creds.role} credentials; listing and pulling need a reader")
    return creds


def list_bundles(pool: str, credentials: Path, site: str | None = None, retries: int = _DEFAULT.retries,
                 backoff: float = _DEFAULT.backoff_s, server_name: str | None = None) -> list[dict]:
    creds = _reader(credentials)
    policy = RetryPolicy.default(retries, backoff)
    with open_channel(pool, creds, server_name) as ch:
        stub = pool_pb2_grpc.PoolStub(ch)
        bundles, token = [], ""
        while True:  # the pool pages its reply by bytes: follow the pages
            reply = call_with_retries(
                partial(stub.List, pool_pb2.ListRequest(site_id=site or "", paged=True, page_token=token), timeout=60),
                pool, policy, creds, server_name, error=PoolClientError)
            bundles.extend(reply.bundles)
            if not reply.next_page_token:
                break
            token = reply.next_page_token
    out = []
    for b in bundles:
        out.append({
            "bundle_id": b.bundle_id, "site_id": b.site_id, "n_images": b.n_images, "n_bytes": b.n_bytes,
            "created": b.created, "received": b.received, "generator_sha256": b.generator_sha256,
            "config_sha256": b.config_sha256, "per_class": dict(b.per_class), "per_method": dict(b.per_method),
        })
    return out


@dataclass
class PullResult:
    n_images: int      # catalog entries (bundle, image)
    n_files: int       # distinct files on disk
    n_fetched: int     # files fetched by this pull
    bytes_fetched: int
    seconds: float
    npz: Path | None = None  # OUT/pool.npz with --format npz


FORMATS = ("imagefolder", "npz")
NPZ_NAME = "pool.npz"
DATASHEET_NAME = "DATASHEET.md"
MAX_IMAGE_BYTES = 64 * 1024 * 1024  # a catalog entry claiming more is refused (the pool's own default is 8 MiB)
_REPORT_PROBLEMS = 5
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@dataclass
class _Wanted:
    """One distinct file wanted from the pool: its size and every path under OUT it goes to."""

    sha: str
    size: int
    paths: list[str]


def _entry_problems(i: int, e, max_image_bytes: int) -> tuple[list[str], dict | None]:
    """What is wrong with catalog entry ``i`` (empty: safe to use), and its parsed record.
    Names become paths: nothing lax here."""
    out = []

    def where() -> str:
        return f"catalog entry {i} (bundle {str(e.bundle_id)[:16]!r}, site {str(e.site_id)[:64]!r})"

    if not is_hex64(e.sha256):
        out.append(f"{where()}: sha256 {e.sha256!r} is not 64 lower-case hex digits")
    if not is_safe_name(e.class_name):
        out.append(f"{where()}: class_name {e.class_name!r} is not a plain name "
                   "(letters, digits, '.', '_', '-'; starting with a letter or digit)")
    if not is_safe_name(e.site_id):
        out.append(f"{where()}: site_id {e.site_id!r} is not a plain name")
    for key in ("bundle_id", "generator_sha256", "config_sha256"):
        if not is_hex64(getattr(e, key)):
            out.append(f"{where()}: {key} {getattr(e, key)!r} is not 64 lower-case hex digits")
    if not 0 < e.size <= max_image_bytes:
        out.append(f"{where()}: size {e.size} is not in 1..{max_image_bytes} bytes")
    raw = None
    try:
        raw = json.loads(e.record_json)
        rec = ImageRecord.from_dict(raw, "record")
    except ManifestError as err:
        out.append(f"{where()}: {err}")
    except ValueError as err:
        out.append(f"{where()}: record is not valid JSON: {err}")
    else:
        if rec.sha256 != e.sha256 or rec.class_name != e.class_name:
            out.append(f"{where()}: the record's sha256/class_name ({rec.sha256[:12]}…, {rec.class_name!r}) "
                       f"differ from the entry's ({str(e.sha256)[:12]}…, {e.class_name!r})")
    return out, raw


def _plan(entries: list, max_image_bytes: int) -> tuple[dict[str, _Wanted], list[dict]]:
    """Validate every catalog entry and group them by file; raises before anything is written.
    Returns the files wanted and each entry's parsed record."""
    problems: list[str] = []
    files: dict[str, _Wanted] = {}
    records: list[dict] = []
    for i, e in enumerate(entries):
        bad, raw = _entry_problems(i, e, max_image_bytes)
        if bad or raw is None:
            problems.append(bad[0] if bad else f"entry {i}: unreadable")  # the first problem of each bad entry
            continue
        records.append(raw)
        w = files.setdefault(e.sha256, _Wanted(e.sha256, e.size, []))
        if w.size != e.size:
            problems.append(f"catalog entry {i}: file {e.sha256[:12]}… listed with sizes {w.size} and {e.size}")
        rel = f"{e.class_name}/{e.sha256}.png"
        if rel not in w.paths:
            w.paths.append(rel)
    if problems:
        more = f" (and {len(problems) - _REPORT_PROBLEMS} more)" if len(problems) > _REPORT_PROBLEMS else ""
        raise PoolClientError("the pool's catalog is not safe to use; nothing was written: "
                              + "; ".join(problems[:_REPORT_PROBLEMS]) + more)
    return files, records


class _Out:
    """Paths under the (resolved) output folder: every component a plain name, none a symlink.

    With the names validated that keeps every path under ``root``; folders already checked
    (or made) are remembered so a pull stats each class folder once, not once per file.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: set[str] = set()   # checked: not a symlink
        self._made: set[str] = set()   # exist as real folders

    def _check(self, p: str) -> None:
        if os.path.islink(p):
            raise PoolClientError(f"{p}: is a symlink; pull writes only plain files and folders under --out "
                                  "and follows no links (remove it or pull into another folder)")

    def path(self, rel: str) -> str:
        parts = rel.split("/")
        p = str(self.root)
        for i, part in enumerate(parts):
            if part in ("", ".", "..") or os.sep in part or (os.altsep and os.altsep in part):
                raise PoolClientError(f"{self.root / rel}: not a plain path below {self.root}")
            p = os.path.join(p, part)
            if i == len(parts) - 1:
                self._check(p)
            elif p not in self._dirs:
                self._check(p)
                self._dirs.add(p)
        return p

    def parent_made(self, p: str) -> None:
        d = os.path.dirname(p)
        if d not in self._made:
            os.makedirs(d, exist_ok=True)
            self._check(d)  # nothing swapped for a link meanwhile
            self._made.add(d)


def _file_ok(path: Path, size: int, sha: str, verify: bool) -> bool:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        return False
    if not verify:
        return True
    return sha256_file(path)[0] == sha


def _catalog(stub, site: str | None) -> list:
    """The whole catalog (every (bundle, image) entry), in the pool's order: the one place that reads it."""
    entries = []
    for reply in stub.Catalog(pool_pb2.CatalogRequest(site_id=site or ""), timeout=600):
        entries.extend(reply.entries)
    return entries


class _Receiver:
    """Receives Fetch streams into ``staging``; a file gets its final name(s) only once its size and
    sha256 are verified. Per-file failures are collected in ``failed``; protocol violations raise."""

    def __init__(self, out: _Out, staging: Path, files: dict[str, _Wanted], bar) -> None:
        self.out, self.staging, self.files, self.bar = out, staging, files, bar
        self.written: set[str] = set()
        self.failed: dict[str, str] = {}
        self.violation: str | None = None
        self.bytes = 0

    def fetch(self, stub, batch: list[str]) -> None:
        remaining = [s for s in batch if s not in self.written and s not in self.failed]  # a retry skips those
        if not remaining or self.violation:
            return
        asked = set(remaining)
        cur: str | None = None
        fh, tmp, hasher, got = None, None, None, 0

        def drop(reason: str | None) -> None:
            """Discard the file being received (its remaining chunks are skipped)."""
            nonlocal fh, tmp
            if fh is not None:
                fh.close()
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            if reason is not None and cur is not None:
                self.failed[cur] = reason
            fh, tmp = None, None

        try:
            for reply in stub.Fetch(pool_pb2.FetchRequest(sha256=remaining), timeout=3600):
                for c in reply.chunks:
                    if c.sha256 != cur:
                        if fh is not None and cur is not None:
                            drop(f"the pool sent {got} of {self.files[cur].size} bytes and no end")
                        if c.sha256 not in asked or c.sha256 in self.written or c.sha256 in self.failed:
                            name = c.sha256[:64] if is_hex64(c.sha256) else repr(c.sha256[:64])
                            self.violation = f"the pool sent a file that was not asked for (or twice): {name}"
                            return  # the stream is abandoned: nothing more from it is trusted
                        cur, hasher, got = c.sha256, hashlib.sha256(), 0
                        tmp = self.staging / cur  # a validated hex name; the folder is fresh for this pull
                        fh = os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644), "wb")
                    if fh is None:  # rest of a file already failed
                        continue
                    assert cur is not None and hasher is not None and tmp is not None  # set with fh
                    want = self.files[cur].size
                    if c.offset != got:
                        drop(f"the pool sent a chunk at offset {c.offset}, expected {got}")
                        continue
                    got += len(c.data)
                    self.bytes += len(c.data)
                    if got > want:
                        drop(f"the pool sent more than the catalog's {want} bytes")
                        continue
                    fh.write(c.data)
                    hasher.update(c.data)
                    if c.last:
                        self._finish(cur, fh, tmp, got, hasher.hexdigest())
                        fh, tmp = None, None
            if fh is not None and cur is not None:
                drop(f"the pool sent {got} of {self.files[cur].size} bytes and no end")
        finally:
            drop(None)

    def _finish(self, sha: str, fh, tmp: Path, got: int, digest: str) -> None:
        fh.close()  # no fsync per file (pull throughput); after a crash, `pull --verify` re-hashes what is there
        w = self.files[sha]
        if got != w.size:
            tmp.unlink(missing_ok=True)
            self.failed[sha] = f"the pool sent {got} of {w.size} bytes"
            return
        if digest != sha:
            tmp.unlink(missing_ok=True)
            self.failed[sha] = "its content does not match its sha256"
            return
        first = self.out.path(w.paths[0])
        self.out.parent_made(first)
        os.replace(tmp, first)
        for p in w.paths[1:]:
            _copy_into(self.out, first, p)
        self.written.add(sha)
        self.bar.update(1)


def pull(pool: str, credentials: Path, out: Path, site: str | None = None, retries: int = _DEFAULT.retries,
         backoff: float = _DEFAULT.backoff_s, progress: bool = True, verify: bool = False,
         server_name: str | None = None, log: Callable[[str], None] = lambda m: None,
         fmt: str = "imagefolder", max_image_bytes: int = MAX_IMAGE_BYTES,
         policy: RetryPolicy | None = None) -> PullResult:
    """Pull the pool (or one site's part) into ``out`` (see the module docstring).

    Every name from the pool is validated before it becomes a path, files are written only
    under ``out`` (no symlink followed), and every requested image must arrive complete and
    verified: otherwise :class:`PoolClientError` names what is missing (verified files stay,
    so pulling again resumes) and no manifest is written. ``policy`` (e.g.
    ``RetryPolicy.from_config(cfg.pool)``) replaces ``retries``/``backoff``.
    """
    if fmt not in FORMATS:
        raise PoolClientError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    creds = _reader(credentials)
    policy = policy or RetryPolicy.default(retries, backoff)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    with open_channel(pool, creds, server_name) as ch:
        stub = pool_pb2_grpc.PoolStub(ch)
        entries = call_with_retries(lambda: _catalog(stub, site), pool, policy, creds, server_name, log,
                                    error=PoolClientError)
        files, records = _plan(entries, max_image_bytes)
        od = _Out(root)
        for w in files.values():  # every target checked before anything is written
            for p in w.paths:
                od.path(p)
        for name in (".partial", "manifest.json", DATASHEET_NAME, NPZ_NAME):
            od.path(name)
        todo = []
        for sha, w in files.items():
            present = [p for p in w.paths if _file_ok(root / p, w.size, sha, verify)]
            if not present:
                todo.append(sha)
            else:
                for p in w.paths:
                    if p not in present:
                        _copy_into(od, root / present[0], p)
        bar = tqdm(total=len(todo), unit="img", desc="pull", disable=not progress or not todo)
        staging = root / ".partial"
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted pull (checked: not a link)
        staging.mkdir()
        rx = _Receiver(od, staging, files, bar)
        try:
            for i in range(0, len(todo), FETCH_BATCH):
                batch = todo[i: i + FETCH_BATCH]
                call_with_retries(partial(rx.fetch, stub, batch), pool, policy, creds, server_name, log,
                                  error=PoolClientError)
        finally:
            bar.close()
            shutil.rmtree(staging, ignore_errors=True)
    missing = [s for s in todo if s not in rx.written]
    if missing or rx.violation:
        where: dict[str, str] = {}
        for e in entries:
            where.setdefault(e.sha256, f"{e.class_name}/{e.sha256}.png (site {e.site_id}, bundle {e.bundle_id[:12]}…)")
        listed = "; ".join(f"{where[s]}: {rx.failed.get(s, 'not sent')}" for s in missing[:_REPORT_PROBLEMS])
        more = f" (and {len(missing) - _REPORT_PROBLEMS} more)" if len(missing) > _REPORT_PROBLEMS else ""
        broke = f"{rx.violation}; " if rx.violation else ""
        raise PoolClientError(
            f"{broke}{len(missing)} of {len(files)} image file(s) did not arrive complete and verified; missing: {listed}{more}. "
            f"The {len(files) - len(missing)} verified file(s) are kept under {out} (pull again to resume); "
            "no manifest was written")
    doc = _write_manifest(root, pool, entries, records)
    npz = write_npz(root, doc) if fmt == "npz" else None
    write_datasheet(root, doc, npz)
    return PullResult(len(entries), len(files), len(rx.written), rx.bytes, time.perf_counter() - t0, npz)


def _copy_into(od: _Out, src: str | Path, rel: str) -> None:
    """Copy a verified file to ``OUT/rel`` (same content, another class folder) through a temp file."""
    dst = Path(od.path(rel))
    od.parent_made(str(dst))
    with open(src, "rb") as fin:
        atomic_write(dst, lambda fh: shutil.copyfileobj(fin, fh), fsync=False)  # no fsync per file, as a fetch


def _write_manifest(root: Path, pool: str, entries: list, records: list[dict]) -> dict:
    images: list[dict[str, Any]] = []
    bundles: dict[str, Any] = {}
    classes: dict[tuple[int, str], int] = {}
    for e, record in zip(entries, records):
        gr = None if e.generator_round < 0 else e.generator_round
        images.append({
            "file": f"{e.class_name}/{e.sha256}.png",
            "sha256": e.sha256,
            "class_name": e.class_name,
            "label": record["label"],
            "method": record["method"],
            "site_id": e.site_id,
            "bundle_id": e.bundle_id,
            "generator_sha256": e.generator_sha256,
            "config_sha256": e.config_sha256,
            "generator_round": gr,
            "record": record,
        })
        b = bundles.setdefault(e.bundle_id, {
            "bundle_id": e.bundle_id, "site_id": e.site_id, "created": e.created,
            "generator_sha256": e.generator_sha256, "config_sha256": e.config_sha256,
            "generator_round": gr, "n_images": 0,
        })
        b["n_images"] += 1
        key = (record["label"], e.class_name)
        classes[key] = classes.get(key, 0) + 1
    doc = {
        "format": "plan-pool-pull/1",
        "pool": pool,
        "pulled": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_images": len(images),
        "n_files": len({i["file"] for i in images}),
        "classes": [{"label": k[0], "name": k[1], "n_images": n} for k, n in sorted(classes.items())],
        "bundles": list(bundles.values()),
        "images": images,
    }
    _write_text(root, "manifest.json", _manifest_json(doc))
    return doc


def _manifest_json(doc: dict) -> str:
    """Indented at the top level, one image (or bundle) per line: readable, and written by json's
    C encoder (``indent`` would switch to its pure-Python one, the slowest part of a large pull)."""
    lines = ["{"]
    keys = list(doc)
    for n, k in enumerate(keys):
        end = "," if n < len(keys) - 1 else ""
        v = doc[k]
        if isinstance(v, list) and v:
            lines.append(f" {json.dumps(k)}: [")
            lines += [f"  {json.dumps(item)}," for item in v[:-1]] + [f"  {json.dumps(v[-1])}"]
            lines.append(f" ]{end}")
        else:
            lines.append(f" {json.dumps(k)}: {json.dumps(v)}{end}")
    return "\n".join(lines + ["}"]) + "\n"


def _write_text(root: Path, name: str, text: str) -> None:
    atomic_write(_Out(root).path(name), text, fsync=False)


def write_npz(root: Path, doc: dict) -> Path:
    """``OUT/pool.npz`` in the MedMNIST format, one row per manifest image, in the manifest's order.

    ``train_images`` uint8 (N, H, W) for grey or (N, H, W, 3) for colour, ``train_labels``
    uint8 (N, 1); ``val_*`` and ``test_*`` are present and empty (a pool has no split of its
    own: ``plan_shared.data`` then makes its seeded stratified split, and the ``medmnist``
    package reads ``split="train"``); ``class_names`` (str, per label) is an extra array
    that MedMNIST loaders ignore and ``plan_shared.data`` uses.
    """
    from plan_shared.data import DataError, read_image
    from plan_shared.pool_dataset import label_names

    arrays, labels = [], []
    shape = None
    for im in doc["images"]:
        path = root / im["file"]
        try:
            a = read_image(path)
        except DataError as err:
            raise PoolClientError(str(err)) from None
        a = a[:, :, 0] if a.shape[2] == 1 else a
        if shape is None:
            shape = a.shape
        elif a.shape != shape:
            raise PoolClientError(f"{path}: image shape {a.shape} differs from {shape} of the first image; "
                                  "an npz needs one shape (pull with --format imagefolder)")
        if not 0 <= im["label"] <= 255:
            raise PoolClientError(f"{path}: label {im['label']} does not fit the MedMNIST uint8 labels")
        arrays.append(a)
        labels.append(im["label"])
    shape = shape or (28, 28)
    x = np.stack(arrays) if arrays else np.zeros((0, *shape), np.uint8)
    y = np.asarray(labels, np.uint8).reshape(-1, 1)
    empty_x, empty_y = np.zeros((0, *x.shape[1:]), np.uint8), np.zeros((0, 1), np.uint8)
    target = _Out(root).path(NPZ_NAME)
    atomic_write(target, lambda fh: np.savez_compressed(
        fh, train_images=x, train_labels=y, val_images=empty_x, val_labels=empty_y, test_images=empty_x,
        test_labels=empty_y, class_names=np.array(label_names(doc), dtype=str)), fsync=False)
    return Path(target)


def write_datasheet(root: Path, doc: dict, npz: Path | None = None) -> Path:
    """``OUT/DATASHEET.md``: what the pulled set holds, where it came from and what it is (not) for."""
    from plan_shared.pool_dataset import datasheet_text

    _write_text(root, DATASHEET_NAME, datasheet_text(doc, npz.name if npz else None))
    return root / DATASHEET_NAME
