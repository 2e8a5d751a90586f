"""Content fingerprints: a file's is the sha256 of its bytes, a folder's the sha256 of its files'
relative names and content hashes. Nothing about where a folder lives or when its files were written
enters, so a work or data folder copied by any means (cp -r, rsync, a bucket sync, another machine,
another absolute path) is up to date where its contents are, and a touched photo changes nothing.

Reading 33k photos (~6 GB) costs minutes, so HashState remembers each file's hash by its stat (the
DVC way) in WORK/.whaleid_state: a rerun stats the files and reads only new or changed ones, in
parallel threads.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

BLOCK = 1 << 20
STATE = ".whaleid_state"   # WORK/.whaleid_state: the content hashes of files seen before (a cache)
RACY_NS = 2_000_000_000    # a file changed this recently is hashed again next time (timestamp granularity)
TREE = "tree:"             # a folder's fingerprint: sha256 over (relative name, sha256) of its files
LEGACY_TREE = "files:"     # the earlier fingerprint of a folder: names, sizes and mtimes (still accepted)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _hash_or_error(path: str) -> tuple[str, int]:
    """(sha256, bytes read), or a marker naming the error for a file that cannot be read (the stage
    that reads it reports it; a file that becomes readable again then changes the fingerprint)."""
    try:
        return sha256_file(path), os.path.getsize(path)
    except OSError as e:
        return f"unreadable:{type(e).__name__}", 0


class HashState:
    """Content hashes of files remembered by (path, size, mtime_ns, ctime_ns, inode), the DVC way: a
    file whose stat is unchanged is not read again, so checking 33k photos costs a stat each. Kept in
    WORK/.whaleid_state (SQLite); losing or corrupting it costs a rehash, never a wrong answer: the
    table is only a cache of content hashes. ctime is in the key because no tool can set it: a
    same-size edit whose mtime was put back (cp -p, rsync -t, a bucket sync) is still seen. A file
    that changed less than RACY_NS before it was hashed is not remembered (it could change again
    within the file system's timestamp granularity and keep its stat)."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self.rows: dict[str, tuple] | None = None
        self.pending: list[tuple] = []
        self.db = None
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
        return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino

    def _load(self) -> None:
        if self.rows is not None:
            return
        self.rows = {}
        if self.path is None or not self.path.parent.is_dir():
            return
        for attempt in range(2):
            try:
                self.db = sqlite3.connect(str(self.path), timeout=10, check_same_thread=False)
                self.db.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, "
                                "mtime INTEGER, ctime INTEGER, inode INTEGER, sha256 TEXT)")
                for path, *key, digest in self.db.execute("SELECT path, size, mtime, ctime, inode, sha256 FROM hashes"):
                    if isinstance(digest, str) and len(digest) == 64:
                        self.rows[path] = (*key, digest)
                return
            except sqlite3.Error:  # corrupt, or not a database: start afresh (it is only a cache)
                self.rows = {}
                with contextlib.suppress(Exception):
                    self.db.close()
                self.db = None
                if attempt == 0:
                    with contextlib.suppress(OSError):
                        self.path.unlink()

    def adopt(self, other: "HashState") -> None:
        """Take over what an in-memory state learnt (it was opened before the work folder existed)."""
        with self.lock:
            self._load()
            for path, row in (other.rows or {}).items():
                self.rows[path] = row
                self.pending.append((path, *row))
            self._flush()

    def lookup_many(self, entries) -> list[str | None]:
        """lookup() for many (_, path, stat) at once (one lock, no per-file overhead: 100k files)."""
        with self.lock:
            self._load()
            rows = self.rows
        out = []
        for _, path, st in entries:
            row = rows.get(path)
            out.append(row[4] if row is not None and (row[0], row[1], row[2], row[3]) ==
                       (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) else None)
        hits = sum(d is not None for d in out)
        self.hits += hits
        self.misses += len(out) - hits
        return out

    def lookup(self, path: str, st: os.stat_result) -> str | None:
        with self.lock:
            self._load()
            row = self.rows.get(path)
        if row is not None and tuple(row[:4]) == self.stat_key(st):
            self.hits += 1
            return row[4]
        self.misses += 1
        return None

    def store(self, path: str, st: os.stat_result, digest: str) -> None:
        if len(digest) != 64 or time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS:
            return
        with self.lock:
            self._load()
            self.rows[path] = (*self.stat_key(st), digest)
            self.pending.append((path, *self.stat_key(st), digest))
            if len(self.pending) >= 5000:
                self._flush()

    def _flush(self) -> None:
        rows, self.pending = self.pending, []
        if not rows or self.db is None:
            return
        try:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.Error:
            pass  # busy or broken: the hashes are recomputed next time

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def close(self) -> None:
        with self.lock:
            self._flush()
            if self.db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self.db.close()
            self.db, self.rows = None, None


def file_digest(path: Path, state: HashState | None = None) -> str:
    """sha256 of a file's content, from `state` when its stat is unchanged."""
    path = os.path.abspath(path)
    if state is None:
        return _hash_or_error(path)[0]
    st = os.stat(path)
    digest = state.lookup(path, st)
    if digest is None:
        digest = _hash_or_error(path)[0]
        state.store(path, st, digest)
    return digest


def folder_files(path: Path) -> list[tuple[str, str, os.stat_result]]:
    """(relative posix name, absolute path, stat) of every file under `path`, sorted by name; names
    starting with "." (files and folders) are not part of a folder's content."""
    out = []
    stack = [(os.path.abspath(path), "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:  # deleted while we looked
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    stack.append((entry.path, f"{prefix}{entry.name}/"))
                    continue
                st = entry.stat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append((prefix + entry.name, entry.path, st))
    out.sort(key=lambda e: e[0])
    return out


def digest_folder(path: Path, state: HashState | None = None, workers: int = 1, report=None) -> str:
    """Fingerprint of a folder from its content: sha256 over each file's relative name and sha256, so
    a copy anywhere (cp -r, rsync, a bucket, another machine) has the fingerprint of its original,
    and a touched file keeps it. Files whose stat `state` knows are not read; the others are hashed
    in `workers` threads (hashlib and file reads release the GIL), and `report(text)` hears how many
    and how fast when that took a while."""
    entries = folder_files(path)
    digests: dict[str, str] = {}
    todo = []
    known = state.lookup_many(entries) if state is not None else [None] * len(entries)
    for (rel, p, st), digest in zip(entries, known):
        if digest is None:
            todo.append((rel, p, st))
        else:
            digests[rel] = digest
    if todo:
        t0 = time.perf_counter()
        paths = [p for _, p, _ in todo]
        if workers > 1 and len(todo) > 8:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                hashed = list(pool.map(_hash_or_error, paths, chunksize=64))
        else:
            hashed = [_hash_or_error(p) for p in paths]
        nbytes = 0
        for (rel, p, st), (digest, size) in zip(todo, hashed):
            digests[rel] = digest
            nbytes += size
            if state is not None:
                state.store(p, st, digest)
        if state is not None:
            state.flush()
        seconds = time.perf_counter() - t0
        if report is not None and (seconds >= 2.0 or len(todo) >= 2000):
            report(f"hashed {len(todo):,} files ({nbytes / 1e9:.2f} GB) of {path} in {seconds:.1f}s "
                   f"({nbytes / 1e6 / max(seconds, 1e-9):.0f} MB/s, {workers} thread(s)); "
                   f"{len(entries) - len(todo):,} unchanged files from the state cache")
    h = hashlib.sha256()
    for rel, _, _ in entries:
        h.update(f"{rel}\0{digests[rel]}\n".encode())
    return TREE + h.hexdigest()


def legacy_digest_folder(path: Path) -> str:
    """The earlier folder fingerprint (names, sizes, mtimes), to honour manifests written before
    content fingerprints: a work folder made by an earlier whaleid stays up to date where it was."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = os.path.join(root, name)
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return LEGACY_TREE + h.hexdigest()


def fingerprint(path: Path, state: HashState | None = None, workers: int = 1, report=None) -> str | None:
    """sha256 of a file's content, a content tree digest for a folder (digest_folder), None when absent."""
    path = Path(path)
    if path.is_dir():
        return digest_folder(path, state, workers, report)
    if path.is_file():
        return file_digest(path, state)
    return None


def matches(recorded, path: Path, state: HashState | None = None, workers: int = 1, report=None) -> bool:
    """Does `path` now have the fingerprint `recorded`? (A folder fingerprint of an earlier whaleid,
    names + sizes + mtimes, is compared as it was made.)"""
    if isinstance(recorded, str) and recorded.startswith(LEGACY_TREE):
        return Path(path).is_dir() and legacy_digest_folder(path) == recorded
    return fingerprint(path, state, workers, report) == recorded
