"""Gallery vectors kept between runs: retrieval heads embed every gallery photo on each evaluate and
predict run, and at Kaggle size that is 25k photos, most of predict's forward pass beside the test
photos' 4 TTA versions (scripts/bench_predict.py). A vector depends only on the trained model, the
gallery file's pixels (augment's images) and the input size, so WORK/gallery_cache/<key>.npz keeps
them under a key of those three: predict reuses what evaluate embedded (the training split's
photos), and a predict rerun for a new threshold or rerank setting embeds nothing again. Any other
model or augment run is another key; the files of other keys are deleted when one is written.
"""
from __future__ import annotations

import hashlib
import io
from typing import Callable

import numpy as np

from whaleid.pipeline.files import write_bytes
from whaleid.pipeline.stage import Run

FOLDER = "gallery_cache"


def key(run: Run) -> str | None:
    """The cache key, or None (no caching) when train's or augment's manifest lacks a digest."""
    model = ((run.session.manifest("train") or {}).get("artifacts") or {}).get("model.keras")
    images = ((run.session.manifest("augment") or {}).get("artifacts") or {}).get("images")
    if not model or not images:
        return None
    text = f"{model}|{images}|{run.setting('run.image_size')}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def vectors(run: Run, files: list[str], embed: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """The vectors of gallery `files` (augment image names) in order: cached ones read back, the
    others embedded by `embed(files)` and added to the cache."""
    k = key(run)
    if k is None:
        return embed(files)
    folder = run.work / FOLDER
    path = folder / f"{k}.npz"
    known: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            known = dict(zip(z["files"].tolist(), z["vectors"]))
    except (OSError, ValueError, KeyError):
        known = {}
    missing = [f for f in dict.fromkeys(files) if f not in known]
    if missing:
        got = embed(missing)
        known.update(zip(missing, np.asarray(got, np.float32)))
        buf = io.BytesIO()
        names = list(known)
        np.savez(buf, files=np.array(names, dtype=str), vectors=np.stack([known[n] for n in names]))
        write_bytes(path, buf.getvalue())
        for old in folder.glob("*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
    if files and len(missing) < len(dict.fromkeys(files)):
        run.echo(f"gallery: {len(files) - len(missing)} of {len(files)} vectors from {path}")
    return np.stack([known[f] for f in files]) if files else embed(files)
