"""Crash-safe, content-addressed store of the pool: files on disk + an SQLite index.

Layout of ``STORE``::

    objects/ab/<sha256>     one file per distinct content (images and report.json files)
    staging/<upload>/       files being received (never visible)
    index.sqlite            WAL-mode SQLite: objects, bundles, bundle_images, site_state
    pool.lock               held (fcntl) by the one service using this store

Quarantine: a site whose ``site_state`` row says ``quarantined`` keeps its bundles and
files, but List, Catalog and Fetch do not show them. The service quarantines a site
when the registry marks it revoked; ``plan-server pool restore`` lifts it (and a later
revocation, with a new ``revoked_at``, quarantines again).

Visibility rule: a bundle exists when, and only when, its ``bundles`` row exists;
rows of a bundle are written in **one** transaction, and only after every file it
references has been verified (sha256, size), renamed into ``objects/`` and made
durable (every not-yet-indexed file and its directory fsynced). A crash at any point therefore leaves the whole
bundle or nothing. Files in ``objects/`` without an ``objects`` row, and anything in
``staging/``, are garbage from interrupted uploads: :meth:`Store.collect_garbage`
(run when the service starts) removes them. Until then an interrupted upload's
verified files let a retry skip re-sending them (:meth:`Store.missing`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from plan_shared.bundle import BundleError, BundleManifest, parse_bundle_manifest, sha256_file

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects(
    sha256 TEXT PRIMARY KEY,
    size   INTEGER NOT NULL,
    kind   TEXT NOT NULL              -- image | report
);
CREATE TABLE IF NOT EXISTS bundles(
    bundle_id        TEXT PRIMARY KEY,
    site_id          TEXT NOT NULL,
    generator_sha256 TEXT NOT NULL,
    config_sha256    TEXT NOT NULL,
    generator_round  INTEGER,
    created          TEXT NOT NULL,
    received         TEXT NOT NULL,
    n_images         INTEGER NOT NULL,
    n_bytes          INTEGER NOT NULL,
    report_sha256    TEXT REFERENCES objects(sha256),
    signer_serial    TEXT NOT NULL,
    manifest         BLOB NOT NULL,   -- the signed manifest bytes, as received
    signature        BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS bundles_site ON bundles(site_id);
CREATE TABLE IF NOT EXISTS bundle_images(
    bundle_id  TEXT NOT NULL REFERENCES bundles(bundle_id),
    idx        INTEGER NOT NULL,
    image_id   TEXT NOT NULL,
    sha256     TEXT NOT NULL REFERENCES objects(sha256),
    class_name TEXT NOT NULL,
    label      INTEGER NOT NULL,
    method     TEXT NOT NULL,
    record     TEXT NOT NULL,         -- privacy record, JSON (plan_shared.manifest format)
    PRIMARY KEY(bundle_id, idx)
);
CREATE INDEX IF NOT EXISTS bundle_images_sha ON bundle_images(sha256);
CREATE TABLE IF NOT EXISTS site_state(  -- quarantine: a quarantined site's bundles are hidden from readers
    site_id        TEXT PRIMARY KEY,
    quarantined    INTEGER NOT NULL,
    since          TEXT NOT NULL,
    reason         TEXT NOT NULL,
    revoked_at     TEXT               -- the revocation already acted on (a restore is not undone by it)
);
"""
HIDDEN = "SELECT site_id FROM site_state WHERE quarantined=1"
LOCK_FILE = "pool.lock"


class StoreError(RuntimeError):
    """The store cannot complete an operation (e.g. a referenced file is missing)."""


class KindError(StoreError):
    """A bundle names as an image a blob the store holds as a report, or the reverse."""


@dataclass
class CommitResult:
    duplicate: bool
    n_images: int
    n_new_files: int


@dataclass
class CheckReport:
    n_bundles: int = 0
    n_objects: int = 0
    problems: list[str] = field(default_factory=list)
    garbage: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def with_article(kind: str) -> str:
    """'an image', 'a report'."""
    return f"an {kind}" if kind[:1] in "aeiou" else f"a {kind}"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Store:
    """Thread-safe store; one instance per process (the service) or read-only use (check)."""

    def __init__(self, root: str | Path, create: bool = True, readonly: bool = False, lock: bool = False):
        """``lock=True`` (the service): hold ``pool.lock`` so a second service on this store fails at once."""
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.staging = self.root / "staging"
        self.index_path = self.root / "index.sqlite"
        if create and not readonly:
            self.objects.mkdir(parents=True, exist_ok=True)
            self.staging.mkdir(parents=True, exist_ok=True)
        elif not self.index_path.is_file():
            raise StoreError(f"{self.root}: no pool store here (no index.sqlite)")
        self._lock = threading.RLock()
        self._dirs: set[Path] = set()
        self._verified: dict[str, tuple] = {}  # sha -> (size, mtime_ns, ino) of leftovers known good
        self._lock_fh = self._take_lock() if lock else None
        if readonly:
            uri = f"file:{self.index_path}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        else:
            self._db = sqlite3.connect(self.index_path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        self._db.execute("PRAGMA foreign_keys=ON")

    def _take_lock(self):
        fh = open(self.root / LOCK_FILE, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise StoreError(f"pool store {self.root} is in use by another pool service (pid {holder}); "
                             "one store serves one service") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        return fh

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._lock_fh is not None:
                self._lock_fh.close()  # releases the lock
                self._lock_fh = None

    # ------------------------------------------------------------ paths and objects

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / sha256

    def is_indexed(self, sha256: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM objects WHERE sha256=?", (sha256,)).fetchone()
        return row is not None

    def kinds(self, shas: set[str]) -> dict[str, str]:
        """sha256 -> kind (``image`` | ``report``) of those of ``shas`` that are indexed."""
        items = list(shas)
        out: dict[str, str] = {}
        with self._lock:
            for i in range(0, len(items), 500):
                part = items[i : i + 500]
                q = f"SELECT sha256, kind FROM objects WHERE sha256 IN ({','.join('?' * len(part))})"
                out.update(self._db.execute(q, part).fetchall())
        return out

    def has_bundle(self, bundle_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM bundles WHERE bundle_id=?", (bundle_id,)).fetchone()
        return row is not None

    def _valid_unindexed(self, sha256: str, size: int) -> bool:
        """A file left by an interrupted upload: usable only if its content is right."""
        p = self.object_path(sha256)
        try:
            st = p.stat()
            if st.st_size != size:
                return False
            stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
            if self._verified.get(sha256) == stamp:
                return True  # hashed (or received verified) before, unchanged since: not re-hashed per Offer
            digest, _ = sha256_file(p)
        except OSError:
            return False
        if digest == sha256:
            self._verified[sha256] = stamp
        return digest == sha256

    def missing(self, wanted: dict[str, int]) -> set[str]:
        """Which of ``{sha256: size}`` the store can not supply (neither indexed nor a valid leftover)."""
        with self._lock:
            indexed: set[str] = set()
            items = list(wanted)
            for i in range(0, len(items), 500):
                part = items[i : i + 500]
                q = f"SELECT sha256 FROM objects WHERE sha256 IN ({','.join('?' * len(part))})"
                indexed.update(r[0] for r in self._db.execute(q, part))
        return {s for s, size in wanted.items() if s not in indexed and not self._valid_unindexed(s, size)}

    def new_staging(self) -> Path:
        p = self.staging / uuid.uuid4().hex
        p.mkdir(parents=True)
        return p

    def place(self, staged: Path, sha256: str) -> Path:
        """Move a verified staging file to its content address.

        Not yet durable: :meth:`make_durable` runs before the commit that indexes it.
        Until then the file is an unindexed leftover (garbage, or reused after re-hashing).
        """
        target = self.object_path(sha256)
        if self.is_indexed(sha256):
            # Never replace an indexed (durable) file with a not-yet-durable copy of it.
            staged.unlink()
            return target
        d = target.parent
        if d not in self._dirs:
            d.mkdir(exist_ok=True)
            self._dirs.add(d)
        os.replace(staged, target)
        st = target.stat()
        self._verified[sha256] = (st.st_size, st.st_mtime_ns, st.st_ino)  # the service hashed it while receiving
        return target

    def make_durable(self, shas: set[str]) -> None:
        """fsync the given object files (in parallel: the file system batches them) and their directories."""
        paths = [self.object_path(s) for s in shas]

        def sync(p: Path) -> None:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        if len(paths) > 16:
            with ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync") as ex:
                list(ex.map(sync, paths))
        else:
            for p in paths:
                sync(p)
        self.sync_dirs(shas)

    def sync_dirs(self, shas: set[str]) -> None:
        """fsync the object directories that received new names (once per directory)."""
        for d in sorted({s[:2] for s in shas}):
            _fsync_dir(self.objects / d)
        _fsync_dir(self.objects)

    def unindexed(self, shas: set[str]) -> set[str]:
        """The subset of ``shas`` without an ``objects`` row."""
        items = list(shas)
        indexed: set[str] = set()
        with self._lock:
            for i in range(0, len(items), 500):
                part = items[i : i + 500]
                q = f"SELECT sha256 FROM objects WHERE sha256 IN ({','.join('?' * len(part))})"
                indexed.update(r[0] for r in self._db.execute(q, part))
        return shas - indexed

    def discard_unindexed(self, shas: set[str]) -> None:
        """Remove files placed by a refused upload, unless another bundle indexed them meanwhile."""
        with self._lock:
            for s in shas:
                if not self.is_indexed(s):
                    self._verified.pop(s, None)
                    try:
                        self.object_path(s).unlink()
                    except FileNotFoundError:
                        pass

    # ------------------------------------------------------------ commit

    def commit(
        self,
        bm: BundleManifest,
        manifest_bytes: bytes,
        signature: bytes,
        signer_serial: str,
        before_commit=None,
        in_transaction=None,
    ) -> CommitResult:
        """Index a bundle whose files are all in ``objects/`` (verified): one transaction.

        Returns ``duplicate=True`` (and writes nothing) when the bundle is already stored.
        Raises StoreError when a referenced file is missing (nothing is written).
        ``before_commit`` / ``in_transaction`` are test hooks, called before BEGIN and
        just before COMMIT.
        """
        files: dict[str, tuple[int, str]] = {}
        for im in bm.images:
            files.setdefault(im.record.sha256, (im.size, "image"))
        if bm.report_sha256 is not None:
            files.setdefault(bm.report_sha256, (bm.report_size, "report"))
        if bm.report_sha256 is not None and files[bm.report_sha256][1] != "report":
            raise KindError(f"report.json of bundle {bm.bundle_id[:12]}… is also one of its images")
        with self._lock:
            if self.has_bundle(bm.bundle_id):
                return CommitResult(True, len(bm.images), 0)
            # Under the lock: a concurrent push may have indexed one of these blobs as the other kind.
            for sha, kind in self.kinds(set(files)).items():
                if kind != files[sha][1]:
                    raise KindError(f"sha256 {sha[:16]}… is stored in the pool as {with_article(kind)}, "
                                    f"bundle {bm.bundle_id[:12]}… names it as {with_article(files[sha][1])}")
            # Verify presence under the lock: discard_unindexed also runs under it.
            for sha, (size, _) in files.items():
                p = self.object_path(sha)
                try:
                    st = p.stat()
                except FileNotFoundError:
                    raise StoreError(f"file {sha[:12]}… of bundle {bm.bundle_id[:12]}… is not in the store") from None
                if st.st_size != size:
                    raise StoreError(f"file {sha[:12]}… has {st.st_size} bytes, expected {size}")
            if before_commit is not None:
                before_commit()
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                n_new = 0
                for sha, (size, kind) in files.items():
                    cur = db.execute("INSERT OR IGNORE INTO objects(sha256, size, kind) VALUES (?,?,?)", (sha, size, kind))
                    if kind == "image":
                        n_new += cur.rowcount
                db.execute(
                    "INSERT INTO bundles(bundle_id, site_id, generator_sha256, config_sha256, generator_round, created,"
                    " received, n_images, n_bytes, report_sha256, signer_serial, manifest, signature)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        bm.bundle_id,
                        bm.site_id,
                        bm.generator_sha256,
                        bm.config_sha256,
                        bm.generator_round,
                        bm.created,
                        _utc_now(),
                        len(bm.images),
                        bm.total_bytes,
                        bm.report_sha256,
                        signer_serial,
                        manifest_bytes,
                        signature,
                    ),
                )
                db.executemany(
                    "INSERT INTO bundle_images(bundle_id, idx, image_id, sha256, class_name, label, method, record)"
                    " VALUES (?,?,?,?,?,?,?,?)",
                    [
                        (
                            bm.bundle_id,
                            i,
                            im.record.id,
                            im.record.sha256,
                            im.record.class_name,
                            im.record.label,
                            im.record.method,
                            json.dumps(im.record.to_dict(), sort_keys=True),
                        )
                        for i, im in enumerate(bm.images)
                    ],
                )
                if in_transaction is not None:
                    in_transaction()
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return CommitResult(False, len(bm.images), n_new)

    # ------------------------------------------------------------ garbage

    def collect_garbage(self) -> tuple[int, int]:
        """Remove staging leftovers and unindexed object files. Only when no upload runs (start-up).

        Returns (staging entries removed, object files removed).
        """
        with self._lock:
            n_staging = 0
            for entry in list(self.staging.iterdir()) if self.staging.is_dir() else []:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                n_staging += 1
            indexed = {r[0] for r in self._db.execute("SELECT sha256 FROM objects")}
            n_obj = 0
            for path in self._object_files():
                if path.name not in indexed:
                    path.unlink(missing_ok=True)
                    n_obj += 1
            if n_obj:
                self.sync_dirs(set())
        return n_staging, n_obj

    def _object_files(self) -> Iterator[Path]:
        if not self.objects.is_dir():
            return
        for sub in sorted(self.objects.iterdir()):
            if sub.is_dir():
                yield from sorted(sub.iterdir())
            else:
                yield sub

    # ------------------------------------------------------------ reads

    def list_bundles(self, site_id: str | None = None) -> list[dict]:
        q = (
            "SELECT bundle_id, site_id, n_images, n_bytes, created, received, generator_sha256, config_sha256"
            " FROM bundles"
        )
        args: tuple = ()
        q += f" WHERE site_id NOT IN ({HIDDEN})"
        if site_id:
            q += " AND site_id=?"
            args = (site_id,)
        q += " ORDER BY site_id, received, bundle_id"
        with self._lock:
            rows = self._db.execute(q, args).fetchall()
            counts: dict[str, tuple[dict, dict]] = {}
            for bid, cls, method, n in self._db.execute(
                "SELECT bundle_id, class_name, method, COUNT(*) FROM bundle_images GROUP BY bundle_id, class_name, method"
            ):
                per_class, per_method = counts.setdefault(bid, ({}, {}))
                per_class[cls] = per_class.get(cls, 0) + n
                per_method[method] = per_method.get(method, 0) + n
        keys = ("bundle_id", "site_id", "n_images", "n_bytes", "created", "received", "generator_sha256", "config_sha256")
        out = []
        for r in rows:
            d = dict(zip(keys, r))
            d["per_class"], d["per_method"] = counts.get(d["bundle_id"], ({}, {}))
            out.append(d)
        return out

    def catalog(self, site_id: str | None = None) -> list[dict]:
        q = (
            "SELECT bi.bundle_id, b.site_id, bi.sha256, bi.class_name, o.size, bi.record, b.generator_sha256,"
            " b.config_sha256, b.generator_round, b.created"
            " FROM bundle_images bi JOIN bundles b ON b.bundle_id = bi.bundle_id JOIN objects o ON o.sha256 = bi.sha256"
        )
        args: tuple = ()
        q += f" WHERE b.site_id NOT IN ({HIDDEN})"
        if site_id:
            q += " AND b.site_id=?"
            args = (site_id,)
        q += " ORDER BY b.site_id, b.received, bi.bundle_id, bi.idx"
        keys = (
            "bundle_id",
            "site_id",
            "sha256",
            "class_name",
            "size",
            "record",
            "generator_sha256",
            "config_sha256",
            "generator_round",
            "created",
        )
        with self._lock:
            return [dict(zip(keys, r)) for r in self._db.execute(q, args)]

    def indexed_size(self, sha256: str, hidden: bool = False) -> int | None:
        """Size of an indexed image; with ``hidden`` (some site is quarantined) only if a visible bundle has it."""
        q = "SELECT size FROM objects WHERE sha256=? AND kind='image'"
        if hidden:
            q += (" AND EXISTS (SELECT 1 FROM bundle_images bi JOIN bundles b ON b.bundle_id = bi.bundle_id"
                  f" WHERE bi.sha256 = objects.sha256 AND b.site_id NOT IN ({HIDDEN}))")
        with self._lock:
            row = self._db.execute(q, (sha256,)).fetchone()
        return None if row is None else row[0]

    # ------------------------------------------------------------ quotas and quarantine

    def site_usage(self, site_id: str) -> tuple[int, int]:
        """(bytes, images) of the site's stored bundles, quarantined ones included (they are on disk)."""
        with self._lock:
            row = self._db.execute("SELECT COALESCE(SUM(n_bytes), 0), COALESCE(SUM(n_images), 0) FROM bundles"
                                   " WHERE site_id=?", (site_id,)).fetchone()
        return int(row[0]), int(row[1])

    def hidden_sites(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute(HIDDEN)}

    def quarantine_list(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT site_id, quarantined, since, reason, revoked_at FROM site_state"
                                    " ORDER BY site_id").fetchall()
        return [dict(zip(("site_id", "quarantined", "since", "reason", "revoked_at"), r)) for r in rows]

    def quarantine(self, site_id: str, reason: str, revoked_at: str | None = None) -> bool:
        """Hide a site's bundles from readers (kept on disk). Returns False when it already was hidden."""
        with self._lock:
            row = self._db.execute("SELECT quarantined FROM site_state WHERE site_id=?", (site_id,)).fetchone()
            self._db.execute(
                "INSERT INTO site_state(site_id, quarantined, since, reason, revoked_at) VALUES (?,1,?,?,?)"
                " ON CONFLICT(site_id) DO UPDATE SET quarantined=1, since=excluded.since, reason=excluded.reason,"
                " revoked_at=COALESCE(excluded.revoked_at, site_state.revoked_at)",
                (site_id, _utc_now(), reason, revoked_at))
        return not (row and row[0])

    def quarantine_revoked(self, site_id: str, revoked_at: str) -> bool:
        """Quarantine a revoked site, once per revocation (a restore after it stays restored)."""
        with self._lock:
            row = self._db.execute("SELECT revoked_at FROM site_state WHERE site_id=?", (site_id,)).fetchone()
            if row is not None and row[0] == revoked_at:
                return False
            return self.quarantine(site_id, f"site revoked at {revoked_at}", revoked_at)

    def restore(self, site_id: str) -> tuple[int, int]:
        """Make a quarantined site's bundles visible again. Returns (bundles, images) restored."""
        with self._lock:
            row = self._db.execute("SELECT quarantined FROM site_state WHERE site_id=?", (site_id,)).fetchone()
            if not row or not row[0]:
                raise StoreError(f"site {site_id!r} is not quarantined in {self.root}")
            self._db.execute("UPDATE site_state SET quarantined=0, since=?, reason='restored' WHERE site_id=?",
                             (_utc_now(), site_id))
            n = self._db.execute("SELECT COUNT(*), COALESCE(SUM(n_images), 0) FROM bundles WHERE site_id=?",
                                 (site_id,)).fetchone()
        return int(n[0]), int(n[1])

    # ------------------------------------------------------------ check

    def check(self, progress=None) -> CheckReport:
        """Verify every indexed file (exists, size, sha256) and the index's own consistency."""
        rep = CheckReport()
        with self._lock:
            ic = self._db.execute("PRAGMA integrity_check").fetchall()
            objects = self._db.execute("SELECT sha256, size FROM objects").fetchall()
            wrong_kind = self._db.execute(
                "SELECT bi.bundle_id, bi.idx, o.kind FROM bundle_images bi JOIN objects o ON o.sha256 = bi.sha256"
                " WHERE o.kind != 'image'"
            ).fetchall()
            wrong_kind += self._db.execute(
                "SELECT b.bundle_id, -1, o.kind FROM bundles b JOIN objects o ON o.sha256 = b.report_sha256"
                " WHERE o.kind != 'report'"
            ).fetchall()
            bundles = self._db.execute("SELECT bundle_id, n_images, report_sha256, manifest FROM bundles").fetchall()
            rows = self._db.execute("SELECT bundle_id, idx, sha256 FROM bundle_images ORDER BY bundle_id, idx").fetchall()
            dangling = self._db.execute(
                "SELECT bi.bundle_id, bi.idx FROM bundle_images bi LEFT JOIN objects o ON o.sha256 = bi.sha256"
                " WHERE o.sha256 IS NULL"
            ).fetchall()
            orphan_rows = self._db.execute(
                "SELECT DISTINCT bi.bundle_id FROM bundle_images bi LEFT JOIN bundles b ON b.bundle_id = bi.bundle_id"
                " WHERE b.bundle_id IS NULL"
            ).fetchall()
        if [r[0] for r in ic] != ["ok"]:
            rep.problems.append("SQLite integrity_check: " + "; ".join(str(r[0]) for r in ic))
        rep.n_objects, rep.n_bundles = len(objects), len(bundles)
        for bid, idx in dangling:
            rep.problems.append(f"bundle {bid[:12]}… image {idx}: references a file that is not indexed")
        for bid, idx, kind in wrong_kind:
            what = "report.json" if idx < 0 else f"image {idx}"
            want = "report" if idx < 0 else "image"
            rep.problems.append(f"bundle {bid[:12]}… {what}: references a file indexed as {with_article(kind)}, not {with_article(want)}")
        for (bid,) in orphan_rows:
            rep.problems.append(f"image rows of bundle {bid[:12]}… without a bundle row")
        by_bundle: dict[str, list[str]] = {}
        for bid, _idx, sha in rows:
            by_bundle.setdefault(bid, []).append(sha)
        for bid, n_images, report_sha, manifest in bundles:
            shas = by_bundle.get(bid, [])
            if len(shas) != n_images:
                rep.problems.append(f"bundle {bid[:12]}…: {len(shas)} image rows, n_images says {n_images}")
            try:
                bm = parse_bundle_manifest(bytes(manifest))
            except BundleError as err:
                rep.problems.append(f"bundle {bid[:12]}…: stored manifest invalid: {err}")
                continue
            if bm.bundle_id != bid or [im.record.sha256 for im in bm.images] != shas:
                rep.problems.append(f"bundle {bid[:12]}…: image rows differ from its signed manifest")
            if bm.report_sha256 != report_sha:
                rep.problems.append(f"bundle {bid[:12]}…: report differs from its signed manifest")
        indexed = set()
        for i, (sha, size) in enumerate(objects):
            indexed.add(sha)
            p = self.object_path(sha)
            if not p.is_file():
                rep.problems.append(f"object {sha}: file missing ({p})")
                continue
            digest, actual = sha256_file(p)
            if actual != size:
                rep.problems.append(f"object {sha}: {actual} bytes, index says {size}")
            elif digest != sha:
                rep.problems.append(f"object {sha}: content hashes to {digest}")
            if progress is not None:
                progress(i + 1, len(objects))
        for path in self._object_files():
            if path.name not in indexed:
                rep.garbage.append(f"unindexed file {path.relative_to(self.root)}")
        if self.staging.is_dir():
            for entry in sorted(self.staging.iterdir()):
                rep.garbage.append(f"staging leftover {entry.relative_to(self.root)}")
        return rep
