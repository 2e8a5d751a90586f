"""Per-photo work over all cores, for a stage's Run: `map` streams results with a progress bar, and
`map_resumable` also commits them in chunks, so a killed stage rerun with the same fingerprint
(Run.resume) keeps every finished chunk: a pre-empted VM loses at most the chunk each worker was on,
not the hours of a Kaggle-scale stage.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import pickle
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tqdm import tqdm

from whaleid.pipeline.files import fault_point, write_bytes

PARTIAL = ".partial"   # WORK/<stage>/.partial/<map>-<i>.pickle: committed chunks, deleted with the manifest written


class PhotoWork:
    """Mixin of stage.Run: needs stage, session (workers, progress), dir, resume, run_key,
    partial_stats and echo()."""

    # -- per-item work over all cores
    def map(self, fn: Callable, items: Iterable, desc: str, total: int | None = None,
            chunksize: int = 16) -> Iterator:
        """fn over items in order, in `workers` processes, with a progress bar; results stream."""
        items = list(items) if total is None else items
        total = len(items) if total is None else total
        bar = self._bar(desc, total)
        if self.workers <= 1 or total < 2 * chunksize:
            yield from tqdm(map(fn, items), **bar)
            return
        with self._pool() as pool:
            yield from tqdm(pool.imap(fn, items, chunksize=chunksize), **bar)

    def _bar(self, desc: str, total: int) -> dict:
        return dict(total=total, desc=f"[{self.stage.name}] {desc}", disable=not self.session.progress,
                    unit="img", dynamic_ncols=True, mininterval=0.5)

    def _pool(self):
        if "tensorflow" in sys.modules:
            # TensorFlow's threads make fork unsafe and spawn costs seconds of imports; decoding and
            # OpenCV release the GIL, so threads keep the model fed (predict, evaluate).
            return multiprocessing.pool.ThreadPool(self.workers)
        return multiprocessing.get_context("fork").Pool(self.workers)

    def partial_path(self, name: str, index: int) -> Path:
        slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
        return self.dir / PARTIAL / f"{slug}-{index:05d}.pickle"

    def load_chunk(self, path: Path, keys: list[str]):
        """The results committed in `path` by this stage with the same fingerprint and the same items
        (their keys), else None: a chunk of another run, other items or a damaged file is ignored."""
        if not self.resume:
            return None
        try:
            with open(path, "rb") as f:
                saved = pickle.load(f)  # written by this stage in this work folder (like its checkpoints)
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, IndexError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("run") != self.run_key or saved.get("keys") != keys:
            return None
        return saved.get("results")

    def save_chunk(self, path: Path, keys: list[str], results: list) -> None:
        _save_chunk(path, self.run_key, keys, results)

    def map_resumable(self, fn: Callable, items: Iterable, desc: str, key: Callable[[Any], str],
                      chunk: int = 64, name: str | None = None) -> Iterator:
        """fn over items, results in order, like map(); results are committed in chunks so that a stage
        killed part way and rerun with the same fingerprint (Run.resume) keeps every finished chunk.

        The items are cut into chunks of at most `chunk` (about 1/16 of them when they are few), a
        function of their number only, so a resumed run cuts them the same way whatever --workers.
        Each chunk runs whole in one worker, which writes its results atomically to
        WORK/<stage>/.partial/<name>-<i>.pickle before handing them back: a SIGKILL loses at most the
        chunk each worker was on. `key(item)` names an item (e.g. the photo's name, not its path); a
        committed chunk is used only when this run's fingerprint and its items' keys are the ones it
        was computed for. fn must be picklable and deterministic, its results picklable: the resumed
        run's artifacts are then those of an uninterrupted run. The .partial folder is deleted once
        the stage's manifest is written."""
        items = list(items)
        name = name or desc
        size = max(1, min(chunk, -(-len(items) // 16)))
        jobs, done = [], {}
        for i, start in enumerate(range(0, len(items), size)):
            part = items[start:start + size]
            keys = [str(key(x)) for x in part]
            path = self.partial_path(name, i)
            results = self.load_chunk(path, keys)
            if results is not None and len(results) == len(part):
                done[i] = results
            jobs.append((i, path, keys, part))
        todo = [(fn, str(path), self.run_key, keys, part) for i, path, keys, part in jobs if i not in done]
        self.partial_stats[name] = {"items": len(items), "chunk": size, "chunks": len(jobs),
                                    "kept": len(done), "computed": len(todo)}
        if done:
            kept = sum(len(r) for r in done.values())
            self.echo(f"{name}: resuming, {len(done)} of {len(jobs)} chunks ({kept} of {len(items)} items) "
                      f"kept from the interrupted run")
        if self.workers <= 1 or len(todo) < 2:
            computed, pool = map(_chunk_job, todo), None
        else:
            pool = self._pool()
            computed = pool.imap(_chunk_job, todo, chunksize=1)
        try:
            with tqdm(**self._bar(desc, len(items))) as bar:
                for i, _, _, part in jobs:
                    results = done.pop(i, None)
                    if results is None:
                        results = next(computed)
                        fault_point(f"{self.stage.name}.chunk")
                    bar.update(len(part))
                    yield from results
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()



def _save_chunk(path, run_key: str, keys: list[str], results: list) -> None:
    write_bytes(Path(path), pickle.dumps({"run": run_key, "keys": keys, "results": results},
                                         protocol=pickle.HIGHEST_PROTOCOL))



def _chunk_job(job) -> list:
    """Worker of map_resumable: one chunk, committed before its results are handed back."""
    fn, path, run_key, keys, part = job
    results = [fn(x) for x in part]
    _save_chunk(path, run_key, keys, results)
    return results
