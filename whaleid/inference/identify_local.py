"""identify with rerank.method = local: the batch photos' own local features (preprocess/keypoints.py,
at keypoints.* from each photo's box), which the ranking path (inference/ranking.py) matches against
the catalogue's (the keypoints stage's) as it does for predict's test photos. Photos accepted since
training (gallery_added) have no local features: their inliers count 0, the embedding alone ranks them.

For the review page, the best matching catalogue photo by local features of each of the first PAIRS
candidates is drawn beside the new photo with the inliers joined (report/drawing.py's pair_image),
when the data folder the catalogue's photos are in is where WORK remembers it.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from whaleid.data import images
from whaleid.inference.review import jpeg_bytes
from whaleid.pipeline.stage import Run
from whaleid.pipeline.workfolder import read_record
from whaleid.preprocess import keypoints
from whaleid.report.drawing import pair_image

STORE = "keypoints.npz"   # WORK/identify/<batch>/keypoints.npz: the batch photos' local features
PREFIX = "batch:"         # batch photos' names in the store (never a catalogue photo's name)
PAIR_SIDE = 400           # px: the longer side of a drawn pair in the review page
PAIRS = 3                 # candidates per photo drawn (each pair ~15 kB in the page)


def batch_features(run: Run, table: pd.DataFrame) -> Path:
    """The batch photos' features (their box crops), written to the batch's folder."""
    method = run.setting("keypoints.method")
    mirror = run.setting("train.flip_ids") and run.setting("predict.mirror_is_same")
    work = partial(keypoints._one, margin=run.setting("augment.margin"), side=run.setting("keypoints.side"),
                   method=method, max_points=run.setting("keypoints.max_points"), mirror=mirror,
                   mask=run.setting("keypoints.mask"))
    keypoints.prepare(method, run.setting("keypoints.mask"))
    jobs = [(PREFIX + r.photo, r.source, (int(r.x0), int(r.y0), int(r.x1), int(r.y1))) for r in table.itertuples()]
    results = []
    for name, got, error in run.map(work, jobs, "local features", chunksize=4):
        if error is None:
            results.append((name, *got))
    return keypoints.write_store(run, STORE, keypoints.pack(results, method, mirror))


def _pair(job, reranker, boxes: dict, train: Path, margin: float, side: int):
    """Worker: (photo, {id: (JPEG of the pair with its inliers joined, caption)})."""
    photo, source, box, ids = job
    out = {}
    for ident in ids:
        n, match, mirrored, qxy, gxy = reranker.best(PREFIX + photo, ident)
        if match is None or n == 0 or match not in boxes:
            continue
        try:
            q = keypoints.crop_photo(source, box, margin, side)
            g = keypoints.crop_photo(train / match, boxes[match], margin, side)
        except images.BadImage:
            continue
        picture = pair_image(q[:, ::-1] if mirrored else q, g, qxy, gxy)
        out[ident] = (jpeg_bytes(np.asarray(picture), side=PAIR_SIDE), f"{n} matched points with {match}"
                      + (" (mirrored)" if mirrored else ""))
    return photo, out


def pairs(run: Run, reranker, table: pd.DataFrame, rankings: dict) -> tuple[dict, str]:
    """({photo: {candidate id: (pair JPEG, caption)}}, a note when none could be drawn)."""
    data = read_record(run.work).get("data")
    if not data or not (Path(data) / "train").is_dir():
        return {}, (f"matched points are drawn from the catalogue's photos, in the data folder WORK was run with "
                    f"({data}), which is not here")
    boxes = {r.Image: (int(r.x0), int(r.y0), int(r.x1), int(r.y1))
             for r in run.read_csv("boxes", "BB_TRAIN.csv").itertuples()}
    work = partial(_pair, reranker=reranker, boxes=boxes, train=Path(data) / "train",
                   margin=run.setting("augment.margin"), side=run.setting("keypoints.side"))
    jobs = [(r.photo, r.source, (int(r.x0), int(r.y0), int(r.x1), int(r.y1)), rankings[r.photo][0][:PAIRS])
            for r in table.itertuples()]
    return dict(run.map(work, jobs, "draw matched points", chunksize=4)), ""
