"""identify with rerank.method = local: a batch re-ranked as predict re-ranks test photos
(scoring/rerank.py): the batch photos' local features (preprocess/keypoints.py, at keypoints.* from
each photo's box) verified against the catalogue's (the keypoints stage's), by RANSAC inliers, and
fused with the embedding score by the calibration evaluate fitted on validation. Photos accepted since
training (gallery_added) have no local features: their inliers count 0, the embedding alone ranks them.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from ..pipeline.stage import Run, StageError
from ..pipeline.stages import CALIBRATION
from ..preprocess import keypoints
from ..preprocess.augment import FLIP
from ..scoring import rerank

STORE = "keypoints.npz"   # WORK/identify/<batch>/keypoints.npz: the batch photos' local features
PREFIX = "batch:"         # batch photos' names in the store (never a catalogue photo's name)


def enabled(get) -> bool:
    """`get(dotted_key)`: is local re-ranking on (and does this whaleid have it)?"""
    try:
        return get("rerank.method") == "local"
    except KeyError:
        return False


def inputs(session) -> dict[str, Path]:
    """What a re-ranked batch reads besides its stages: evaluate's fusion and the catalogue's features."""
    return {CALIBRATION: session.work / "evaluate" / CALIBRATION, "keypoints.npz": session.work / "keypoints" / STORE}


def fusion(run: Run) -> rerank.Fusion:
    path = run.work / "evaluate" / CALIBRATION
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    if data.get("method") != "local":
        raise StageError(f"rerank.method = local fuses scores by the calibration evaluate fits on validation, and {path} "
                         f"has none: run whaleid evaluate --work {run.work} --set rerank.method=local first")
    return rerank.Fusion.from_json(data)


def batch_features(run: Run, table: pd.DataFrame) -> Path:
    """The batch photos' features (their box crops), written to the batch's folder."""
    method = run.setting("keypoints.method")
    mirror = run.setting("train.flip_ids") and run.setting("predict.mirror_is_same")
    work = partial(keypoints._one, margin=run.setting("augment.margin"), side=run.setting("keypoints.side"),
                   method=method, max_points=run.setting("keypoints.max_points"), mirror=mirror)
    jobs = [(PREFIX + r.photo, r.source, (int(r.x0), int(r.y0), int(r.x1), int(r.y1))) for r in table.itertuples()]
    results = []
    for name, got, error in run.map(work, jobs, "local features", chunksize=4):
        if error is None:
            results.append((name, *got))
    return keypoints.write_store(run, STORE, keypoints.pack(results, method, mirror))


def reranked(run: Run, rankings: dict, table: pd.DataFrame, gallery: pd.DataFrame, k: int) -> dict:
    """{photo: (ids, fused scores), k best} from {photo: (ids, embedding scores)} of rerank.candidates+ ids."""
    fused_by = fusion(run)
    store = keypoints.Store(keypoints.store_path(run.session, "keypoints"), batch_features(run, table))
    photos_of: dict[str, list[str]] = {}
    plain = gallery[~gallery.Id.str.endswith(FLIP)].drop_duplicates("Image")
    for image, ident in zip(plain.Image, plain.Id):
        photos_of.setdefault(str(ident), []).append(str(image))
    matcher = rerank.Matcher(keypoints.binary(store.method), run.setting("rerank.ratio"),
                             run.setting("rerank.geometry"), run.setting("rerank.ransac_px"))
    mirror = run.setting("train.flip_ids") and run.setting("predict.mirror_is_same")
    reranker = rerank.Reranker(store, photos_of, matcher, run.setting("rerank.candidates"), mirror)
    names = list(rankings)
    counts = rerank.local_scores(run, reranker, [PREFIX + p for p in names], [rankings[p] for p in names])
    run.echo(f"re-ranked by local features: median {np.median([c[0] for c in counts]) if counts else 0:.0f} "
             f"inliers for the first candidate")
    return {p: rerank.fused_ranking(rankings[p], n, fused_by, k) for p, n in zip(names, counts)}
