"""The learned matchers' matches of photo pairs, kept on disk across runs (WORK/match_cache/).

LightGlue costs ~0.2-1 s a pair on CPU and an evaluate re-ranks ~30 pairs a query, so rerunning it to
try a fusion, a RANSAC threshold or a new_whale threshold used to cost an hour a seed. A pair's matches
depend only on the two photos' features and the matcher, so the cache is content-addressed: a photo is
named by a digest of its (points, descriptors, size) and the matcher's name, and a changed keypoints
artifact simply misses (nothing to invalidate). One file per query view holds its pairs, written
atomically when the query is done: a killed run keeps every finished query.

  WORK/match_cache/<matcher>/<digest[:2]>/<query digest>.npz   per gallery digest g: g/q, g/g (indices into
                                                               the two photos' keypoints), g/p (probabilities)
"""
from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from pathlib import Path

import numpy as np

from whaleid.pipeline.files import write_bytes

FOLDER = "match_cache"


def digest(features: tuple) -> str:
    """A photo view's name in the cache: its keypoints, descriptors and crop size."""
    points, desc, size = features
    h = hashlib.blake2b(digest_size=16)
    for a in (np.ascontiguousarray(points), np.ascontiguousarray(desc)):
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    h.update(str(tuple(int(v) for v in size)).encode())
    return h.hexdigest()


class MatchCache:
    """Matches of (query view, gallery photo) pairs by one matcher; `directory` None: nothing kept."""

    def __init__(self, directory: Path | None, matcher: str):
        self.folder = Path(directory) / FOLDER / matcher if directory is not None else None
        self.matcher = matcher
        self._lock = threading.Lock()
        self._loaded: dict[str, dict] = {}   # query digest -> gallery digest -> (q, g, p), read from disk
        self._new: dict[str, dict] = {}      # query digest -> gallery digest -> (q, g, p), not yet written
        self.hits = self.misses = 0

    def __getstate__(self):  # a process pool's worker gets the folder, not the lock or what was read
        return {"folder": self.folder, "matcher": self.matcher}

    def __setstate__(self, state):
        self.__init__(None, state["matcher"])
        self.folder = state["folder"]

    def path(self, query: str) -> Path:
        return self.folder / query[:2] / f"{query}.npz"

    def _read(self, query: str) -> dict:
        try:
            with np.load(self.path(query), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return {}  # absent, or damaged: recomputed and rewritten
        out = {}
        for key in arrays:
            g, part = key.rsplit("/", 1)
            if part == "q" and f"{g}/g" in arrays and f"{g}/p" in arrays:
                out[g] = (arrays[key].astype(int), arrays[f"{g}/g"].astype(int), arrays[f"{g}/p"].astype(np.float32))
        return out

    def matches(self, q: tuple, g: tuple, compute):
        """`compute(q, g)`'s (indices into q, into g, probabilities), read back when this pair was matched
        before by this matcher."""
        if self.folder is None:
            return compute(q, g)
        qd, gd = digest(q), digest(g)
        with self._lock:
            if qd not in self._loaded:
                self._loaded[qd] = self._read(qd)
            got = self._new.get(qd, {}).get(gd) or self._loaded[qd].get(gd)
        if got is not None:
            self.hits += 1
            return got
        self.misses += 1
        got = compute(q, g)
        with self._lock:
            self._new.setdefault(qd, {})[gd] = tuple(np.asarray(a) for a in got)
        return got

    def flush(self, q: tuple | None = None) -> None:
        """Write the new pairs (of query view `q`, else of every query) beside those on disk, atomically,
        and forget what was read: call it when a query is done."""
        if self.folder is None:
            return
        with self._lock:
            keys = [digest(q)] if q is not None else list(self._new)
            for qd in keys:
                new = self._new.pop(qd, {})
                self._loaded.pop(qd, None)
                if not new:
                    continue
                pairs = {**self._read(qd), **new}
                arrays = {}
                for gd, (qi, gi, p) in pairs.items():
                    arrays[f"{gd}/q"] = np.asarray(qi, np.int32)
                    arrays[f"{gd}/g"] = np.asarray(gi, np.int32)
                    arrays[f"{gd}/p"] = np.asarray(p, np.float16)
                buf = io.BytesIO()
                np.savez_compressed(buf, **arrays)
                write_bytes(self.path(qd), buf.getvalue())
